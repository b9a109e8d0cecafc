"""Back out of sparsity: save, reload, densify and export a trained sparse model.

    python examples/densify_export.py                     # writes into a temporary folder
    python examples/densify_export.py --out exported/

Trains a diag-sparse MLP on scikit-learn's digits with DST (a few epochs), then:

1. saves its ``state_dict`` and loads it into a fresh ``sparsefx.transform`` of the same
   dense model (made with another random structure: loading brings the trained one);
2. ``sparsefx.densify`` turns every sparse layer back into ``nn.Linear`` (what a runtime
   without sparsefx can execute) and checks the outputs agree;
3. ``torch.export`` exports the dense model to a ``.pt2`` archive and reloads it; the
   sparse model exports too, with the ``sparsefx`` ops in its graph.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import sparsefx
from common import accuracy, digits, mlp, train  # this folder is on sys.path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sparsefx-"))
    out.mkdir(parents=True, exist_ok=True)

    data = digits(args.seed)
    dense = mlp(args.hidden, args.seed)
    sparse = sparsefx.transform(dense, "diag", 0.9, init="random", seed=args.seed,
                                keep_last_dense=True)
    train(sparse, data, args.epochs, batch_size=64, lr=3e-3, label="diag", seed=args.seed,
          method="dynadiag", delta_t=25)
    sparse.eval()
    print(f"\ntrained sparse model: {accuracy(sparse, data):.2%} test accuracy")
    x_test = data[2]

    # 1. state_dict round trip: the structure buffers travel with the values
    torch.save(sparse.state_dict(), out / "sparse_state.pt")
    reloaded = sparsefx.transform(dense, "diag", 0.9, init="random", seed=args.seed + 1,
                                  keep_last_dense=True)
    reloaded.load_state_dict(torch.load(out / "sparse_state.pt", weights_only=True))
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x_test), sparse(x_test))
    print(f"1. state_dict saved to {out / 'sparse_state.pt'} and reloaded: same outputs")

    # 2. densify: plain nn.Linear layers, the same function
    plain = sparsefx.densify(sparse).eval()
    with torch.no_grad():
        expected, got = sparse(x_test), plain(x_test)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # fp32 summation order
    print(f"2. densified: {type(plain[0]).__name__} layers, largest output difference "
          f"{(got - expected).abs().max().item():.1e}, accuracy {accuracy(plain, data):.2%}")

    # 3. torch.export of both
    example, batch = (x_test[:4],), {0: torch.export.Dim("batch")}
    exported = torch.export.export(plain, example, dynamic_shapes=(batch,))
    torch.export.save(exported, out / "dense.pt2")
    loaded = torch.export.load(out / "dense.pt2")
    with torch.no_grad():
        assert torch.allclose(loaded.module()(x_test), plain(x_test))
    sparse_program = torch.export.export(sparse, example, dynamic_shapes=(batch,))
    with torch.no_grad():
        torch.testing.assert_close(sparse_program.module()(x_test), sparse(x_test))
    sparse_ops = sorted({str(node.target) for node in sparse_program.graph.nodes
                         if "sparsefx" in str(node.target)})
    print(f"3. exported the dense model to {out / 'dense.pt2'} and reloaded it; the sparse "
          f"model exports too, calling {', '.join(sparse_ops)}")


if __name__ == "__main__":
    main()
