"""Train a 90 %-diagonal-sparse vision transformer with DynaDiag on handwritten digits, next
to the same model trained dense; then time both at a realistic width.

    python examples/quickstart.py                          # ViT, diag 90 %, dynadiag, compiled
    python examples/quickstart.py --pattern fanin          # SRigL on constant fan-in
    python examples/quickstart.py --model mlp --no-compile --pattern unstructured

The digits ship with scikit-learn: nothing is downloaded. ``sparsefx.transform`` makes the
model's Linears sparse (the 10-way head, and the ViT's 4-pixel patch embedding, stay
dense), ``torch.compile`` compiles it (``--no-compile`` to run eagerly), and
``sparsefx.DST`` moves its structure while it trains. The script prints the per-layer
report and test accuracy next to the dense model trained the same way.

Then speed. The digits model is 128 wide: at that width a layer's matmul takes a few
microseconds, dense or sparse, and the call itself is most of it. So the speed is measured on
the same architecture at ViT-B/16's widths (768, MLP 3072; ``--speed-width``), random weights
(speed does not depend on them), transformed with the same options: inference at batch 1 and
256, and a training step with AdamW and ``DST.step()``, dense and sparse interleaved in the
same run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sparsefx
from common import accuracy, digits, interleaved_ms, mlp, train
from sparsefx.registry import PATTERNS
from vit import vit


def build(args, seed: int, **width):
    """The dense model of ``args`` and its sparse twin (the same initial weights, a random
    structure: training from scratch); the 10-way head (and the ViT's 4-pixel patch
    embedding) stay dense, as is usual."""
    if args.model == "mlp":
        dense = mlp(width.get("hidden", args.hidden), seed)
    else:
        dense = vit(seed, dim=width.get("dim", args.dim), depth=args.depth,
                    heads=width.get("heads", 4))
    dense = dense.to(args.device)
    sparse = sparsefx.transform(dense, args.pattern, args.sparsity, init="random", seed=seed,
                                keep_first_dense=args.model == "vit", keep_last_dense=True)
    return dense, sparse


def speed(args, method: str) -> None:
    """Inference at batch 1 and 256 and one training step, dense against sparse, at a
    realistic width."""
    width = args.speed_width
    # every model here runs one forward function: drop the digits models' compiled graphs,
    # so that dynamo's per-function cache (8 entries) holds all of the ones timed below
    torch._dynamo.reset()
    shape = (dict(hidden=width) if args.model == "mlp"
             else dict(dim=width, heads=max(1, width // 64)))
    dense, sparse = build(args, args.seed, **shape)
    models = {"dense": dense, args.pattern: sparse}
    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {batch: torch.randn(batch, 64, generator=generator).to(args.device)
              for batch in (1, 256)}

    def inference(runner, batch):
        def run():
            with torch.no_grad():
                runner(inputs[batch])
        return run

    # a training step as the quickstart takes it: forward, backward, AdamW, DST.step() (the
    # structure updates every 100 steps are left out of the timing, where they would also
    # recompile: benchmarks/bench_dst_overhead.py measures what they add)
    batch = inputs[256][:args.batch_size]
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(args.device)
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dst = (None if name == "dense" else
               sparsefx.DST(model, optimizer, method=method, total_steps=10**6,
                            delta_t=10**6))

        def step(runner=runners[name], optimizer=optimizer, dst=dst):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(runner(batch), labels).backward()
            optimizer.step()
            if dst is not None:
                dst.step()
        steps[name] = step
    begin = time.perf_counter()
    for step in steps.values():  # compile (when compiling) and warm up outside the timing
        step(), step()
    for model in models.values():
        model.eval()
    for batch_size in (1, 256):
        for runner in runners.values():
            inference(runner, batch_size)()
    warm = time.perf_counter() - begin

    what = (f"{args.model.upper()} at width {width}"
            + (f" (MLP {4 * width}), {args.depth} blocks, 17 tokens" if args.model == "vit"
               else ""))
    print(f"\nspeed: {what}, random weights, {args.pattern} at {args.sparsity:.0%} with the "
          f"same options, {'compiled' if args.compile else 'eager'}, on {args.device} "
          f"({torch.get_num_threads()} threads); median of {args.rounds} interleaved rounds "
          f"(compiling and warm-up took {warm:.0f} s):")
    for batch_size in (1, 256):
        times = interleaved_ms({name: inference(runner, batch_size)
                                for name, runner in runners.items()}, rounds=args.rounds)
        report_line(f"inference, batch {batch_size}", times, args.pattern)
    for model in models.values():
        model.train()
    times = interleaved_ms(steps, rounds=args.rounds)
    report_line(f"training step, batch {args.batch_size}", times, args.pattern)


def report_line(what: str, times: dict, pattern: str) -> None:
    ratio = times["dense"] / times[pattern]
    print(f"  {what:26s} dense {times['dense']:8.2f} ms   {pattern} {times[pattern]:8.2f} ms"
          f"   -> {ratio:.2f}x {'faster' if ratio >= 1 else 'SLOWER'} than dense")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=list(PATTERNS), default="diag")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default=None,
                        help="DST method (default: the pattern's own, " + ", ".join(
                            f"{name} {p.default_method}" for name, p in PATTERNS.items()) + ")")
    parser.add_argument("--sparsity", type=float, default=0.9, help="ignored by nm (2:4)")
    parser.add_argument("--delta-t", type=int, default=None,
                        help="steps between DST updates (default: sparsefx.DST's)")
    parser.add_argument("--model", choices=["mlp", "vit"], default="vit")
    parser.add_argument("--epochs", type=int, default=None, help="default: 15 (mlp), 30 (vit)")
    parser.add_argument("--hidden", type=int, default=1024, help="mlp: 64-hidden-hidden-10")
    parser.add_argument("--dim", type=int, default=128, help="vit: embedding width")
    parser.add_argument("--depth", type=int, default=2, help="vit: blocks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 (mlp), 2e-3 (vit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="train and time both models through torch.compile")
    parser.add_argument("--speed-width", type=int, default=768,
                        help="width of the model the speed is measured on (ViT-B/16's 768 by "
                             "default; the mlp's hidden width); 0 skips the measurement")
    parser.add_argument("--rounds", type=int, default=5, help="speed: interleaved rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    method = args.method or PATTERNS[args.pattern].default_method
    epochs = args.epochs or {"mlp": 15, "vit": 30}[args.model]
    lr = args.lr or {"mlp": 3e-3, "vit": 2e-3}[args.model]

    started = time.perf_counter()
    data = digits(args.seed, args.device)
    dense, sparse = build(args, args.seed)
    models = {"dense": dense, args.pattern: sparse}
    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    dst_options = {} if args.delta_t is None else {"delta_t": args.delta_t}
    dst = None
    for name, model in models.items():
        manager = train(model, data, epochs, args.batch_size, lr, name, args.seed,
                        method=None if name == "dense" else method, runner=runners[name],
                        **dst_options)
        dst = manager or dst
    print(dst)
    print()
    print(sparsefx.report(sparse))
    print("\ntest accuracy (digits, 450 held-out images):")
    for name, model in runners.items():
        models[name].eval()
        print(f"  {name:12s} {accuracy(model, data):.2%}")
    if args.speed_width:
        speed(args, method)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
