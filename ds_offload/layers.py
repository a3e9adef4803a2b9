"""Finding a model's transformer layers, so users never have to name them.

Offloading acts per layer in forward order; getting the list wrong would offload the wrong tensors or none,
so the search is explicit about what it found and `layers=` always wins.
"""
from collections import Counter

import torch.nn as nn

from .errors import ConfigError

# Where the common causal-LM families keep their layer lists (Llama/Mistral/Qwen, GPT-2, GPT-NeoX, OPT,
# Falcon/Bloom, T5-style encoders, our own GPT).
KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers",
               "model.language_model.layers", "language_model.layers", "decoder.layers", "encoder.layer",
               "layers", "blocks", "h")


def unwrap(model):
    """The user's module beneath DeepSpeed's engine or DDP-style wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _get(model, dotted):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _same_class_blocks(lst):
    if len(lst) == 0:
        return 0
    cls, count = Counter(type(m) for m in lst).most_common(1)[0]
    return count if count == len(lst) else 0


_LAYERS_FIX = ("Fix: pass the layer list itself (e.g. layers=model.blocks) or its dotted path "
               "(e.g. layers='model.layers').")


def _bad_layers(what):
    return ConfigError([("layers", f"layers= must be a dotted path (str) or a non-empty sequence of nn.Modules "
                                   f"(an nn.ModuleList, nn.Sequential, list or tuple); got {what}. {_LAYERS_FIX}")])


def _describe(obj):
    if isinstance(obj, nn.Module):
        return f"a single {type(obj).__name__} module"
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _explicit_layers(model, layers):
    """The layers named by `layers=` (a dotted path or a sequence of modules), checked; raises ConfigError."""
    if isinstance(layers, str):
        found = _get(model, layers) if layers else None
        if not isinstance(found, (nn.ModuleList, nn.Sequential, list, tuple)):
            raise ConfigError([("layers", f"'{layers}' is not a list of modules on {type(model).__name__}. "
                                          "Fix: pass the dotted path of the transformer layer list, "
                                          "e.g. layers='model.layers'.")])
        where, seq = layers, found
    elif isinstance(layers, (nn.ModuleList, nn.Sequential, list, tuple)):
        where, seq = "layers=", layers
    else:
        raise _bad_layers(_describe(layers))
    seq = list(seq)
    if not seq:
        name = f"'{layers}' on {type(model).__name__}" if isinstance(layers, str) else _describe(layers)
        raise ConfigError([("layers", f"layers= names an empty layer list ({name}); it must be a dotted path or "
                                      f"a non-empty sequence of nn.Modules. {_LAYERS_FIX}")])
    bad = [i for i, m in enumerate(seq) if not isinstance(m, nn.Module)]
    if bad:
        raise _bad_layers(f"a sequence whose item {bad[0]} is {_describe(seq[bad[0]])}, not an nn.Module")
    return seq, where


def find_layers(model, layers=None):
    """(list of layer modules in forward order, where they were found).

    `layers` may be a non-empty module list / sequence of modules or a dotted attribute path (anything else is
    a ConfigError naming `layers`); otherwise the known paths are tried, then the largest nn.ModuleList made of
    one block class.
    """
    model = unwrap(model)
    if layers is not None:
        return _explicit_layers(model, layers)
    for path in KNOWN_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and _same_class_blocks(found) >= 1:
            return list(found), path
    best, best_name = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and _same_class_blocks(mod) > (len(best) if best else 0):
            best, best_name = mod, name
    if best is not None:
        return list(best), best_name
    return [], None
