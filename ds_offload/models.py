"""A small GPT used by the tests, the demo, the examples and the benchmark.

It ships inside the package so that nothing needs a download: the reference shape of the benchmark
(hidden 2048, 16 layers, 16 heads, vocab 32000) and the tiny shape of the CPU tests are the same class.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512
    hidden: int = 64
    num_layers: int = 4
    num_heads: int = 4
    seq_len: int = 32
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.hidden
        self.num_heads = cfg.num_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer; `blocks` is the list of transformer layers that offloading acts on."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln, self.head = nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def synthetic_batch(cfg: GPTConfig, batch_size: int, step: int = 0, device="cpu"):
    """A deterministic batch of token ids with next-token targets, the same on every machine."""
    g = torch.Generator().manual_seed(1234 + step)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g)
    return idx.to(device), torch.roll(idx, -1, 1).to(device)


# The named GPT shapes, written here only: the demo, `ds-offload estimate --model`, the examples and the
# benchmark read them. tiny: the CPU tests (seconds); small: the demo on a GPU (memory differences visible);
# reference: the benchmark's reference shape; wide: the benchmark's wide shape.
GPT_SHAPES = {
    "tiny-gpt": GPTConfig(vocab_size=512, hidden=64, num_layers=4, num_heads=4, seq_len=32),
    "small-gpt": GPTConfig(vocab_size=32000, hidden=1024, num_layers=8, num_heads=16, seq_len=1024),
    "reference-gpt": GPTConfig(vocab_size=32000, hidden=2048, num_layers=16, num_heads=16, seq_len=2048),
    "wide-gpt": GPTConfig(vocab_size=32000, hidden=4096, num_layers=8, num_heads=16, seq_len=4096),
}
REFERENCE_GPT = GPT_SHAPES["reference-gpt"]
WIDE_GPT = GPT_SHAPES["wide-gpt"]


def learnable_batch(cfg: GPTConfig, batch_size: int, step: int = 0, device="cpu", alphabet: int = 32,
                    jump: float = 0.1):
    """Like `synthetic_batch`, but with structure a small model picks up within a few dozen steps.

    Uniform random tokens have nothing to learn (the loss sits at log(vocab) however well the run goes), so a
    demo on them does not look like training. Here every sequence walks one fixed random cycle through
    `alphabet` of the vocabulary's tokens, jumping to a random point of the cycle with probability `jump`:
    which tokens occur is learnt in the first steps, the successor rule after, and the loss keeps falling
    towards the noise floor. The cycle and every batch come from fixed CPU seeds, so each machine sees the
    same data (the CPU generator does not depend on the platform).
    """
    k = min(alphabet, cfg.vocab_size)
    cycle = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(4321))[:k]
    g = torch.Generator().manual_seed(8765 + step)
    t = torch.arange(cfg.seq_len + 1)  # one extra token: the last position's target is a real successor
    start = torch.randint(0, k, (batch_size, t.numel()), generator=g)  # where a walk (re)starts
    jumps = torch.rand(batch_size, t.numel(), generator=g) < jump
    jumps[:, 0] = True
    last = torch.where(jumps, t, 0).cummax(dim=1).values  # the latest (re)start at or before each position
    seq = cycle[(start.gather(1, last) + t - last) % k]
    return seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)
