"""Fine-tune a small Hugging Face causal LM with the Trainer, dense against dynamic-sparse.

    python examples/hf_trainer.py                          # diag + DynaDiag at 90 %
    python examples/hf_trainer.py --pattern fanin --method srigl --steps 600

The model is a GPT-2 built from its config (nothing is downloaded), reading bytes. The text
is the Python standard library's own source (the ``.py`` files next to ``os``), split into a
training and a validation part by file. The sparse run is the dense one plus three lines:
``sparsefx.transform`` of the model, and ``DSTCallback`` in the Trainer's callbacks, which
builds ``sparsefx.DST`` from the Trainer's optimizer and ``max_steps``, steps it once per
optimizer step (gradient accumulation included), and saves its state with each checkpoint.
Prints the validation loss (nats per byte) and perplexity of both.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch
import transformers

import sparsefx
from sparsefx.integrations.transformers import DSTCallback


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive windows of ``length`` bytes of ``text``, as GPT-2 inputs and labels."""

    def __init__(self, text: bytes, length: int):
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        self.windows = data[:len(data) // length * length].view(-1, length)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def stdlib_text(max_bytes: int) -> tuple[bytes, bytes]:
    """About ``max_bytes`` of standard-library source, files sorted by name: the first 90 %
    of the files for training, the rest for validation."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    chunks, total = [], 0
    for path in files:
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    cut = max(1, int(len(chunks) * 0.9))
    return b"".join(chunks[:cut]), b"".join(chunks[cut:])


def run(label: str, args, train, valid, sparse: bool) -> float:
    config = transformers.GPT2Config(n_layer=args.layers, n_head=4, n_embd=args.width,
                                     vocab_size=256, n_positions=args.context)
    torch.manual_seed(args.seed)
    model = transformers.GPT2LMHeadModel(config)
    callbacks = []
    if sparse:
        model = sparsefx.transform(model, args.pattern, args.sparsity, init="random",
                                   seed=args.seed)
        callbacks.append(DSTCallback(method=args.method, delta_t=args.delta_t, seed=args.seed))
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="sparsefx-trainer-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=2,
        learning_rate=args.lr, warmup_steps=args.steps // 10, lr_scheduler_type="cosine",
        weight_decay=0.01, logging_steps=max(1, args.steps // 5), save_strategy="no",
        report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, dataloader_num_workers=0, per_device_eval_batch_size=16)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=train,
                                   eval_dataset=valid, callbacks=callbacks)
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    if sparse:
        print(sparsefx.report(model))
    print(f"{label}: validation loss {loss:.3f} nats/byte, perplexity {math.exp(loss):.2f}")
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=list(sparsefx.registry.PATTERNS), default="diag")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default="dynadiag")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--delta-t", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--text-bytes", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_text, valid_text = stdlib_text(args.text_bytes)
    train, valid = (ByteWindows(text, args.context) for text in (train_text, valid_text))
    print(f"{len(train_text):,} training bytes, {len(valid_text):,} validation bytes")
    dense = run("dense", args, train, valid, sparse=False)
    sparse = run(f"{args.pattern}/{args.method} {args.sparsity:.0%}", args, train, valid,
                 sparse=True)
    print(f"\nsparse - dense validation loss: {sparse - dense:+.3f} nats/byte")


if __name__ == "__main__":
    main()
