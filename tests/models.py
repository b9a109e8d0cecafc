"""Small models with the architectures the transform must handle, written out in full."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 8))


class SmallCNN(nn.Module):
    """Convolutions (left alone) and a two-layer linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: nn.MultiheadAttention and an MLP."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Conv1D(nn.Module):
    """GPT-2's layer: the weight stored as (in, out), applied with addmm."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.02)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class GPTBlock(nn.Module):
    """Causal attention through Conv1D layers; an MLP on raw parameters through F.linear."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = Conv1D(width, 3 * width), Conv1D(width, width)
        self.w_fc = nn.Parameter(torch.randn(4 * width, width) * 0.02)
        self.b_fc = nn.Parameter(torch.zeros(4 * width))
        self.w_out = nn.Parameter(torch.randn(width, 4 * width) * 0.02)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(attention.transpose(1, 2).reshape(batch, length, width))
        h = F.gelu(F.linear(self.ln_2(x), self.w_fc, self.b_fc))
        return x + h @ self.w_out.t()


class TinyGPT(nn.Module):
    """A GPT-style LM whose top-level forward has data-dependent control flow (so it cannot
    be traced whole) and whose head is tied to the token embedding."""

    def __init__(self, vocab: int = 50, width: int = 32, heads: int = 4, layers: int = 2,
                 context: int = 16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(GPTBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        if int(idx.max()) >= self.wte.num_embeddings:  # data-dependent: fx cannot trace it
            raise ValueError("token id out of range")
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
