"""What makes the ops safe to record into CUDA graphs (``torch.compile(mode="reduce-overhead")``),
checked on the CPU: while a capture runs, nothing derived from a structure is reused from an
earlier call (the recorded kernels must re-derive it at every replay), no structure check
reads the structure on the host, and the derivations have no data-dependent step (which
would synchronise). tests/test_gpu.py replays a compiled model across DST updates on a GPU."""
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
