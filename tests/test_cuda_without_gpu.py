"""The CUDA path, checked without a GPU.

What makes the ops safe to record into CUDA graphs (``torch.compile(mode="reduce-overhead")``):
while a capture runs, nothing derived from a structure is reused from an earlier call (the
recorded kernels must re-derive it at every replay), no structure check reads the structure on
the host, and the derivations have no data-dependent step (which would synchronise).
tests/test_gpu.py replays a compiled model across structure updates on a GPU. And what
torch.compile traces on a GPU: every op has a CUDA kernel, and the ops and their gradient ops
run on fake CUDA tensors."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsefx
from sparsefx.kernels import _checks, _structure_cache, patterns
from sparsefx.kernels.blockdiag import torch_kernels as blockdiag_torch

OPS = torch.ops.sparsefx


@pytest.fixture
def capturing(monkeypatch):
    """Every structure on every device counts as being captured."""
    monkeypatch.setattr(_structure_cache, "capturing", lambda tensor: True)


def _blockdiag(out_features=64, in_features=32, groups=8, cosets=(1, 6)):
    offsets = patterns.blockdiag_offsets(out_features, in_features, groups,
                                         torch.tensor(cosets))
    values = torch.randn(offsets.numel(), min(out_features, in_features))
    return values, offsets


def test_derived_results_are_rebuilt_on_every_captured_call(capturing):
    offsets = torch.arange(4)
    builds = []
    for _ in range(3):
        _structure_cache.derived(offsets, "key", lambda: builds.append(1))
    assert len(builds) == 3


def test_no_structure_check_runs_while_capturing(capturing):
    checked = []
    _checks.verify_once("op", torch.tensor([0]), lambda tensor: checked.append(tensor))
    assert checked == []


def test_a_structure_written_in_place_reaches_the_next_captured_call(capturing):
    """As a replay after a DST update: the layout comes from the offsets as they are now."""
    values, offsets = _blockdiag()
    x = torch.randn(130, 32)  # blocked: the batched GEMMs
    with sparsefx.kernels.use_cpu_kernels("torch"):
        OPS.blockdiag_linear(x, values, offsets, 64, 8)
        offsets.copy_(patterns.blockdiag_offsets(64, 32, 8, torch.tensor([3, 4])))
        y = OPS.blockdiag_linear(x, values, offsets, 64, 8)
    weight = patterns.diag_to_dense(values, offsets, 64, 32)
    torch.testing.assert_close(y, x @ weight.T)


def test_the_blockdiag_layout_has_no_data_dependent_step():
    """Under fake tensors a data-dependent op (unique, nonzero, .item()) raises."""
    _, offsets = _blockdiag()
    real = blockdiag_torch._build_layout(offsets, 64, 32, 8)
    with FakeTensorMode() as mode:
        fake = blockdiag_torch._build_layout(mode.from_tensor(offsets), 64, 32, 8)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]


def test_every_op_has_a_cuda_kernel():
    """A CUDA registration, or (the growth ops, plain PyTorch) one for every device."""
    names = [name for name in dir(OPS) if not name.startswith("_")]
    assert {"diag_linear", "fanin_linear", "blockdiag_linear"} <= set(names)
    for name in names:
        if isinstance(getattr(OPS, name), torch._ops.OpOverloadPacket):
            assert any(torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsefx::{name}", key)
                       for key in ("CUDA", "CompositeExplicitAutograd")), name


@pytest.mark.parametrize("pattern", ["diag", "fanin", "blockdiag"])
def test_the_ops_and_their_gradient_ops_trace_on_fake_cuda_tensors(pattern):
    """What torch.compile's tracing sees on a GPU: each op and its gradient ops on (fake)
    CUDA tensors, shapes and devices right, without a GPU. (Not through autograd: on a
    CPU-only build the autograd engine cannot take a CUDA device guard, and aborts.)"""
    layer = sparsefx.transform(torch.nn.Sequential(torch.nn.Linear(32, 64)), pattern, 0.75)[0]

    def fake_cuda(tensor):  # (a fake holds no data: only the shape, dtype and device count)
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cuda")

    with FakeTensorMode():
        x, grad_out = fake_cuda(torch.empty(7, 32)), fake_cuda(torch.empty(7, 64))
        values, structure = fake_cuda(layer.values), fake_cuda(layer.structure)
        if pattern == "fanin":
            outputs = (OPS.fanin_linear(x, values, structure),
                       OPS.fanin_linear_grad_input(grad_out, values, structure, 32),
                       OPS.fanin_linear_grad_values(grad_out, x, structure))
        elif pattern == "diag":
            outputs = (OPS.diag_linear(x, values, structure, 64),
                       OPS.diag_linear_grad_input(grad_out, values, structure, 32),
                       OPS.diag_linear_grad_values(grad_out, x, values, structure))
        else:
            groups = layer.groups
            outputs = (OPS.blockdiag_linear(x, values, structure, 64, groups),
                       OPS.blockdiag_linear_grad_input(grad_out, values, structure, 32, groups),
                       OPS.blockdiag_linear_grad_values(grad_out, x, values, structure, groups))
    assert [tuple(t.shape) for t in outputs] == [(7, 64), (7, 32), tuple(values.shape)]
    assert all(t.device.type == "cuda" for t in outputs)
