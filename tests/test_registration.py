"""The ops as torch.library ops: opcheck, gradcheck in float64, torch.compile(fullgraph=True)
forward and backward with no graph break."""
import pytest
import torch
import torch._dynamo

from sparsefx.kernels import patterns, use_cpu_kernels

OPS = torch.ops.sparsefx


def _diag_inputs(out_features, in_features, leading, dtype=torch.float32, sparsity=0.5,
                 bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_kept = patterns.diag_num_kept(out_features, in_features, sparsity)
    offsets = patterns.random_diag_offsets(out_features, in_features, num_kept, generator)
    _, length = patterns.diag_geometry(out_features, in_features)
    x = torch.randn(*leading, in_features, generator=generator, dtype=dtype)
    values = torch.randn(num_kept, length, generator=generator, dtype=dtype)
    b = torch.randn(out_features, generator=generator, dtype=dtype) if bias else None
    return x, values, offsets, b


def _fanin_inputs(out_features, in_features, leading, dtype=torch.float32, sparsity=0.5,
                  bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fan_in = patterns.fanin_num_kept(in_features, sparsity)
    indices = patterns.random_fanin_indices(out_features, in_features, fan_in, generator)
    x = torch.randn(*leading, in_features, generator=generator, dtype=dtype)
    values = torch.randn(out_features, fan_in, generator=generator, dtype=dtype)
    b = torch.randn(out_features, generator=generator, dtype=dtype) if bias else None
    return x, values, indices, b


SHAPES = [(8, 8, (3,)), (12, 5, (2, 3)), (5, 12, ()), (7, 9, (0,)), (16, 4, (2, 1, 3))]


@pytest.mark.parametrize("out_features,in_features,leading", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_diag(out_features, in_features, leading, bias):
    x, values, offsets, b = _diag_inputs(out_features, in_features, leading, bias=bias)
    x.requires_grad_()
    values.requires_grad_()
    torch.library.opcheck(OPS.diag_linear, (x, values, offsets, out_features, b))
    grad_out = torch.randn(*leading, out_features)
    torch.library.opcheck(OPS.diag_linear_grad_input, (grad_out, values.detach(), offsets,
                                                       in_features))
    torch.library.opcheck(OPS.diag_linear_grad_values, (grad_out, x.detach(), values.detach(),
                                                        offsets))


@pytest.mark.parametrize("out_features,in_features,leading", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fanin(out_features, in_features, leading, bias):
    x, values, indices, b = _fanin_inputs(out_features, in_features, leading, bias=bias)
    x.requires_grad_()
    values.requires_grad_()
    args = (x, values, indices, b) if bias else (x, values, indices)
    torch.library.opcheck(OPS.fanin_linear, args)
    grad_out = torch.randn(*leading, out_features)
    torch.library.opcheck(OPS.fanin_linear_grad_input, (grad_out, values.detach(), indices,
                                                        in_features))
    torch.library.opcheck(OPS.fanin_linear_grad_values, (grad_out, x.detach(), indices))


@pytest.mark.parametrize("out_features,in_features,leading", SHAPES)
def test_gradcheck_diag(out_features, in_features, leading):
    x, values, offsets, b = _diag_inputs(out_features, in_features, leading, torch.float64)
    inputs = (x.requires_grad_(), values.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x, v, b: OPS.diag_linear(x, v, offsets, out_features, b), inputs)


@pytest.mark.parametrize("out_features,in_features,leading", SHAPES)
def test_gradcheck_fanin(out_features, in_features, leading):
    x, values, indices, b = _fanin_inputs(out_features, in_features, leading, torch.float64)
    inputs = (x.requires_grad_(), values.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, v, b: OPS.fanin_linear(x, v, indices, b), inputs)


class _DiagMLP(torch.nn.Module):
    """Two diagonal layers (tall then wide) around a nonlinearity."""

    def __init__(self, width=24, hidden=40, out=10, sparsity=0.75):
        super().__init__()
        self.shapes = [(hidden, width), (out, hidden)]
        generator = torch.Generator().manual_seed(0)
        for i, (o, n) in enumerate(self.shapes):
            k = patterns.diag_num_kept(o, n, sparsity)
            offsets = patterns.random_diag_offsets(o, n, k, generator)
            _, length = patterns.diag_geometry(o, n)
            self.register_buffer(f"offsets{i}", offsets)
            setattr(self, f"values{i}", torch.nn.Parameter(torch.randn(k, length) * 0.3))
            setattr(self, f"bias{i}", torch.nn.Parameter(torch.zeros(o)))

    def forward(self, x):
        h = OPS.diag_linear(x, self.values0, self.offsets0, self.shapes[0][0], self.bias0)
        return OPS.diag_linear(torch.relu(h), self.values1, self.offsets1, self.shapes[1][0],
                               self.bias1)


class _FaninMLP(torch.nn.Module):
    def __init__(self, width=24, hidden=40, out=10, sparsity=0.75):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        for i, (o, n) in enumerate([(hidden, width), (out, hidden)]):
            k = patterns.fanin_num_kept(n, sparsity)
            self.register_buffer(f"indices{i}", patterns.random_fanin_indices(o, n, k, generator))
            setattr(self, f"values{i}", torch.nn.Parameter(torch.randn(o, k) * 0.3))
            setattr(self, f"bias{i}", torch.nn.Parameter(torch.zeros(o)))

    def forward(self, x):
        h = OPS.fanin_linear(x, self.values0, self.indices0, self.bias0)
        return OPS.fanin_linear(torch.relu(h), self.values1, self.indices1, self.bias1)


@pytest.mark.parametrize("model_cls", [_DiagMLP, _FaninMLP])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_backward(model_cls, dynamic):
    torch._dynamo.reset()
    eager, compiled_model = model_cls(), model_cls()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=dynamic)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        model(x).square().mean().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(),
                                                compiled_model.named_parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)
    explanation = torch._dynamo.explain(compiled_model)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compiled_model_sees_in_place_structure_change():
    """A structure buffer edited in place (as the DST manager will) is picked up by the
    compiled model without recompiling."""
    torch._dynamo.reset()
    model = _DiagMLP()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 24)
    compiled(x)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        offsets = model.offsets0
        free = sorted(set(range(40)) - set(offsets.tolist()))
        offsets[0] = free[0]
    torch.testing.assert_close(compiled(x), model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_structure_checked_once_until_it_changes(kernels):
    """The value checks on a structure tensor run once, and again after any in-place write
    (which bumps its version counter), on the C++ path and the Python one alike."""
    x, values, offsets, b = _diag_inputs(8, 12, (3,))
    with use_cpu_kernels(kernels):
        OPS.diag_linear(x, values, offsets, 8, b)
        # a repeat written behind the version counter: not seen, so not checked again
        offsets.data[1] = offsets[0]
        OPS.diag_linear(x, values, offsets, 8, b)
        offsets.add_(0)  # an in-place write, even one that changes nothing, means re-check
        with pytest.raises(ValueError, match="repeats offset"):
            OPS.diag_linear(x, values, offsets, 8, b)


@pytest.mark.parametrize("pattern", ["diag", "fanin"])
def test_flop_counter_counts_stored_multiply_adds(pattern):
    """FlopCounterMode sees 2 FLOPs per stored multiply-add in the forward and in each of
    the two gradient ops -- the dense count scaled by the stored fraction."""
    from torch.utils.flop_counter import FlopCounterMode

    out_features, in_features, rows = 40, 24, 6
    make = _diag_inputs if pattern == "diag" else _fanin_inputs
    x, values, structure, bias = make(out_features, in_features, (2, 3), sparsity=0.75)
    x.requires_grad_()
    values.requires_grad_()
    if pattern == "diag":
        run = lambda: OPS.diag_linear(x, values, structure, out_features, bias)
    else:
        run = lambda: OPS.fanin_linear(x, values, structure, bias)
    stored = values.numel()
    with FlopCounterMode(display=False) as counter:
        y = run()
    assert counter.get_total_flops() == 2 * rows * stored
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * (2 * rows * stored)


def test_source_folders_imported_by_their_own_names_are_the_package():
    """Run from the repository root, ``kernels`` and ``passes`` are importable as top-level
    packages too, and transformers probes for a ``kernels`` package (the Hub's). Such an
    import must give the one ``sparsefx.kernels`` (no second registration of the ops) and
    must not pass for the Hub's package."""
    import subprocess
    import sys
    from pathlib import Path

    import sparsefx

    probe = ("import kernels, passes, sparsefx\n"
             "assert kernels is sparsefx.kernels and passes is sparsefx.passes\n"
             "from transformers.utils.import_utils import is_kernels_available\n"
             "assert not is_kernels_available()\n")
    root = Path(sparsefx.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", probe], cwd=root, check=True, timeout=300)


def test_other_cpu_kernels_asked_for_at_import_build_nothing(tmp_path):
    """``SPARSEFX_CPU_KERNELS=torch`` at import (a GPU run, a machine without a compiler)
    builds and logs nothing; the ops run on the fallback, and asking for the native kernels
    later says why they are missing."""
    import os
    import subprocess
    import sys

    probe = ("import logging, torch, sparsefx\n"
             "from sparsefx import kernels\n"
             "assert kernels.cpu_kernels() == 'torch', kernels.cpu_kernels()\n"
             "layer = sparsefx.transform(torch.nn.Sequential(torch.nn.Linear(16, 8)), 'diag', 0.5)\n"
             "layer(torch.randn(3, 16)).sum().backward()\n"
             "try:\n"
             "    kernels.use_cpu_kernels('native').__enter__()\n"
             "except ValueError as error:\n"
             "    assert 'SPARSEFX_CPU_KERNELS' in str(error) and 'not built' in str(error)\n"
             "else:\n"
             "    raise AssertionError('native kernels selected without a build')\n")
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    env = {**os.environ, "SPARSEFX_CPU_KERNELS": "torch", "TORCH_EXTENSIONS_DIR": str(extensions)}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert list(extensions.iterdir()) == []
    assert "native" not in run.stderr and "building" not in run.stderr, run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU")
def test_triton_cpu_kernels_refuse_an_interpreter_that_cannot_run_them(monkeypatch):
    """Triton 3.6's interpreter with NumPy >= 2.4 fails on every kernel here: asked for the
    Triton CPU kernels, sparsefx says so instead of failing inside the first op."""
    from sparsefx import kernels
    from sparsefx.kernels import triton_runtime
    before = kernels.cpu_kernels()
    monkeypatch.setattr(triton_runtime, "interpreter_problem",
                        lambda: "Triton 3.6.0's interpreter cannot run a loop (triton#9171)")
    with pytest.raises(ValueError, match="triton CPU kernels cannot run here: Triton 3.6.0"):
        with use_cpu_kernels("triton"):
            pass
    assert kernels.cpu_kernels() == before
