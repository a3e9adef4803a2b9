"""The shape facts of a model that the memory model needs (`ModelSpec`), from a GPT config, a transformers
config.json, KEY=VALUE text, or a named shape."""
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelSpec:
    """The shape facts the estimate needs; `params` is the exact count when known."""
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int = 0          # MLP width; 0 means 4 * hidden
    kv_heads: int = 0              # 0 means heads (multi-head attention)
    gated_mlp: bool = False        # SwiGLU-style MLP (gate, up, down)
    tied_embeddings: bool = False
    seq_len: int = 0               # the model's own sequence length, used when --seq-len is not given
    params: int = 0                # total parameter count; 0 means computed from the shape
    layer_params: int = 0          # parameters of one transformer layer; 0 means computed

    def __post_init__(self):
        self.intermediate = self.intermediate or 4 * self.hidden
        self.kv_heads = self.kv_heads or self.heads
        if not self.layer_params:
            self.layer_params = self.layer_linear_params() + self._layer_small_params()
        if not self.params:
            emb = self.vocab * self.hidden
            self.params = self.layers * self.layer_params + emb * (1 if self.tied_embeddings else 2) + 2 * self.hidden

    @property
    def kv_dim(self):
        return self.hidden // self.heads * self.kv_heads

    def layer_linear_params(self):
        """Weights of the layer's matrix multiplications (what autocast keeps bf16 copies of)."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        attn = d * (d + 2 * kv) + d * d
        mlp = (3 if self.gated_mlp else 2) * d * i
        return attn + mlp

    def _layer_small_params(self):
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        # biases (the GPT of ds_offload.models has them) and two LayerNorms
        return (d + 2 * kv) + d + i + d + 4 * d


def spec_from_gpt(cfg, name="gpt"):
    """Exact for ds_offload.models.GPT (LayerNorms, biased linears, untied head)."""
    return ModelSpec(name=name, layers=cfg.num_layers, hidden=cfg.hidden, heads=cfg.num_heads, vocab=cfg.vocab_size,
                     seq_len=cfg.seq_len)


def _first(d, *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def spec_from_hf_config(path):
    """From a transformers config.json (llama, mistral, qwen, gpt2, gpt-neox, opt, ...): shape from its fields,
    parameter count exact when transformers can build the model on the meta device."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = json.loads(path.read_text())
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if not (hidden and layers and heads):
        raise ValueError(f"{path}: needs hidden_size, num_hidden_layers and num_attention_heads (or the GPT-2 names)")
    act = str(_first(cfg, "hidden_act", "activation_function", default="gelu"))
    model_type = cfg.get("model_type", "")
    gated = act in ("silu", "swiglu", "swish") and model_type not in ("gpt_neox", "gpt2", "opt")
    spec = ModelSpec(name=str(path), layers=int(layers), hidden=int(hidden), heads=int(heads),
                     vocab=int(_first(cfg, "vocab_size", default=32000)),
                     intermediate=int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=0) or 0),
                     kv_heads=int(_first(cfg, "num_key_value_heads", default=0) or 0), gated_mlp=gated,
                     tied_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gpt2")),
                     # the context window can be 128k; estimate at a typical training length unless told
                     seq_len=min(int(_first(cfg, "max_position_embeddings", "n_positions", default=0) or 0), 4096))
    exact = _count_hf_params(cfg)
    if exact:
        total, per_layer = exact
        spec.params = total
        spec.layer_params = per_layer or spec.layer_params
    return spec


def _count_hf_params(cfg_dict):
    try:
        import torch
        import transformers
        config = transformers.AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lists = [m for m in model.modules() if type(m).__name__ == "ModuleList" and len(m) > 1]
    per_layer = sum(p.numel() for p in lists[0][0].parameters()) if lists else 0
    return total, per_layer


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _number(text):
    text = text.strip().lower().replace("_", "")
    if text and text[-1] in _SUFFIX:
        return float(text[:-1]) * _SUFFIX[text[-1]]
    return float(text)


def spec_from_kv(text):
    """`params=1.3B,layers=24,hidden=2048[,heads=16,vocab=50257,seq=2048,ffn=8192,kv_heads=..,gated=1]`."""
    vals = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"'{item}' is not KEY=VALUE (e.g. params=1.3B,layers=24,hidden=2048)")
        k, v = item.split("=", 1)
        vals[k.strip().lower()] = v.strip()
    known = {"params", "layers", "hidden", "heads", "vocab", "seq", "ffn", "kv_heads", "gated"}
    unknown = set(vals) - known
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    for k in ("layers", "hidden"):
        if k not in vals:
            raise ValueError(f"{k}= is required (e.g. params=1.3B,layers=24,hidden=2048)")
    hidden = int(_number(vals["hidden"]))
    heads = int(_number(vals.get("heads", str(max(1, hidden // 128)))))
    spec = ModelSpec(name=text, layers=int(_number(vals["layers"])), hidden=hidden, heads=heads,
                     vocab=int(_number(vals.get("vocab", "32000"))), intermediate=int(_number(vals.get("ffn", "0"))),
                     kv_heads=int(_number(vals.get("kv_heads", "0"))), gated_mlp=vals.get("gated", "0") in ("1", "true"),
                     seq_len=int(_number(vals.get("seq", "0"))))
    if "params" in vals:
        total = int(_number(vals["params"]))
        emb = spec.vocab * spec.hidden * 2
        spec.params = total
        spec.layer_params = max(1, (total - emb) // spec.layers) if total > emb else max(1, total // spec.layers)
    return spec


def named_models():
    """The named GPT shapes `parse_model` knows (ds_offload.models.GPT_SHAPES)."""
    from ..models import GPT_SHAPES
    return GPT_SHAPES


def parse_model(text):
    """A named GPT shape (`tiny-gpt`, `reference-gpt`, ...: ds_offload.models.GPT_SHAPES), a transformers
    config.json (or its folder), or KEY=VALUE,..."""
    shapes = named_models()
    if text in shapes:
        return spec_from_gpt(shapes[text], name=text)
    if "=" in text:
        return spec_from_kv(text)
    if Path(text).exists():
        return spec_from_hf_config(text)
    raise ValueError(f"'{text}' is not a known model ({', '.join(shapes)}), an existing config.json, "
                     "or params=...,layers=...,hidden=...")
