"""A small character-level transformer language model, trained on the Python standard
library's own source code (present on every machine: nothing is downloaded).

The text is the ``.py`` files at the top level of the running interpreter's standard
library, read as bytes (a 256-symbol vocabulary) in sorted order and concatenated; the
last tenth is held out for validation. The model is GPT-like: byte and position
embeddings, ``depth`` causal pre-norm blocks (``vit.Block``), a LayerNorm and a Linear
head over the 256 bytes. Every matmul with a weight is an ``nn.Linear``.
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import Block


@dataclass
class CharLMConfig:
    vocab: int = 256  # bytes: no tokenizer to build or ship
    context: int = 64  # characters the model sees; a few lines of code
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0  # the model sees each character about once: nothing to regularise


class CharLM(nn.Module):
    def __init__(self, config: CharLMConfig | None = None):
        super().__init__()
        self.config = config = config or CharLMConfig()
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Parameter(torch.randn(1, config.context, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, time]`` (bytes) -> next-byte logits ``[batch, time, vocab]``."""
        x = self.embed(tokens) + self.position[:, :tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def charlm(seed: int, **config) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(CharLMConfig(**config))


def stdlib_text(size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train, validation, source)``: the first ``size`` bytes of the standard library's
    top-level ``.py`` files (sorted by name), split 90/10, as uint8 tensors."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(folder.glob("*.py")):
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= size:
            break
    data = b"".join(chunks)[:size]
    if len(data) < size:
        raise RuntimeError(f"the standard library at {folder} holds {len(data)} bytes of "
                           f"top-level .py source; expected at least {size}")
    text = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = int(0.9 * size)
    return text[:split], text[split:], f"{folder} ({len(chunks)} files)"


def windows(text: torch.Tensor, starts: torch.Tensor, context: int):
    """Inputs and next-byte targets for the windows starting at ``starts``."""
    index = starts[:, None] + torch.arange(context + 1)
    chunk = text[index].long()
    return chunk[:, :-1], chunk[:, 1:]


def random_batches(text: torch.Tensor, steps: int, batch_size: int, context: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield windows(text, torch.randint(0, len(text) - context - 1, (batch_size,),
                                          generator=generator), context)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def validation_loss(model, text: torch.Tensor, context: int, batch_size: int = 256) -> float:
    """Mean next-byte cross-entropy (nats) over every non-overlapping window of ``text``."""
    model.eval()
    starts = torch.arange(0, len(text) - context - 1, context)
    total = 0.0
    for chunk in starts.split(batch_size):
        inputs, targets = windows(text, chunk, context)
        total += lm_loss(model(inputs), targets).item() * len(chunk)
    return total / len(starts)


def perplexity(loss: float) -> float:
    return math.exp(loss)
