"""Train a 90 %-diagonal-sparse vision transformer with DynaDiag on handwritten digits, next
to the same model trained dense.

    python examples/quickstart.py                          # ViT, diag 90 %, dynadiag, compiled
    python examples/quickstart.py --pattern fanin          # SRigL on constant fan-in
    python examples/quickstart.py --model mlp --no-compile --pattern unstructured

The digits ship with scikit-learn: nothing is downloaded. ``sparsefx.transform`` makes the
model's Linears sparse (the 10-way head, and the ViT's 4-pixel patch embedding, stay
dense), ``torch.compile`` compiles it (``--no-compile`` to run eagerly), and
``sparsefx.DST`` moves its structure while it trains. The script prints the per-layer
report, test accuracy next to the dense model trained the same way, and the inference speed
of both, measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparsefx
from common import accuracy, digits, inference_ms, mlp, train
from vit import vit

DEFAULT_METHOD = {"diag": "dynadiag", "fanin": "srigl", "nm": "rigl", "unstructured": "rigl"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", choices=list(DEFAULT_METHOD), default="diag")
    parser.add_argument("--method", choices=sparsefx.dst.METHODS, default=None,
                        help="DST method (default: dynadiag for diag, srigl for fanin, "
                             "rigl otherwise)")
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    method = args.method or DEFAULT_METHOD[args.pattern]
    epochs = args.epochs or {"mlp": 15, "vit": 30}[args.model]
    lr = args.lr or {"mlp": 3e-3, "vit": 2e-3}[args.model]

    started = time.perf_counter()
    data = digits(args.seed, args.device)
    dense = (mlp(args.hidden, args.seed) if args.model == "mlp"
             else vit(args.seed, dim=args.dim, depth=args.depth)).to(args.device)
    # the same initial weights, sparsified: a random structure (training from scratch); the
    # 10-way head (and the ViT's 4-pixel patch embedding) stay dense, as is usual
    sparse = sparsefx.transform(dense, args.pattern, args.sparsity, init="random",
                                seed=args.seed, keep_first_dense=args.model == "vit",
                                keep_last_dense=True)
    models = {"dense": dense, args.pattern: sparse}
    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    dst_options = {} if args.delta_t is None else {"delta_t": args.delta_t}
    seconds, dst = {}, None
    for name, model in models.items():
        begin = time.perf_counter()
        manager = train(model, data, epochs, args.batch_size, lr, name, args.seed,
                        method=None if name == "dense" else method, runner=runners[name],
                        **dst_options)
        seconds[name] = time.perf_counter() - begin
        dst = manager or dst
    print(dst)
    print()
    print(sparsefx.report(sparse))
    print(f"\ntest accuracy (digits, 450 held-out images) and training time"
          f"{' (including compilation)' if args.compile else ''}:")
    for name, model in runners.items():
        models[name].eval()
        print(f"  {name:12s} {accuracy(model, data):.2%}   trained in {seconds[name]:.1f} s")
    print(f"\ninference on {args.device}, median of a timed autorange in this run:")
    for batch in (1, 256):
        times = {name: inference_ms(model, batch, args.device) for name, model in runners.items()}
        print(f"  batch {batch:3d}: dense {times['dense']:.3f} ms, {args.pattern} "
              f"{times[args.pattern]:.3f} ms -> {times['dense'] / times[args.pattern]:.2f}x "
              "vs dense")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
