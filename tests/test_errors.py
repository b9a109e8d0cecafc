"""Bad input raises TypeError/ValueError naming the argument, the value and what was expected:
never a crash, never a silently wrong result."""
import re

import pytest
import torch

from sparsefx.kernels import cpu

OPS = torch.ops.sparsefx


def diag_args(**changes):
    """Valid diag_linear arguments (out=6, in=10: P=10, L=6, K=3) with ``changes`` applied."""
    args = dict(x=torch.randn(4, 10), values=torch.randn(3, 6),
                offsets=torch.tensor([0, 4, 9]), out_features=6, bias=torch.randn(6))
    args.update(changes)
    return args


def fanin_args(**changes):
    args = dict(x=torch.randn(4, 10), values=torch.randn(6, 3),
                indices=torch.tensor([[0, 1, 2]] * 6, dtype=torch.int32), bias=torch.randn(6))
    args.update(changes)
    return args


def call_diag(args):
    return OPS.diag_linear(args["x"], args["values"], args["offsets"], args["out_features"],
                           args["bias"])


def call_fanin(args):
    return OPS.fanin_linear(args["x"], args["values"], args["indices"], args["bias"])


DIAG_CASES = [
    # (changes, error type, pattern the message must contain)
    (dict(x=torch.randn(4, 4)), ValueError, r"values has shape \(3, 6\).*L = .*min\(6, 4\) = 4"),
    (dict(values=torch.randn(3, 5)), ValueError, r"values has shape \(3, 5\).*expected \[K, L\]"),
    (dict(values=torch.randn(3, 6, 1)), ValueError, r"values has shape \(3, 6, 1\)"),
    (dict(offsets=torch.tensor([0, 4])), ValueError, r"offsets has 2 entries: expected K = 3"),
    (dict(offsets=torch.tensor([[0, 4, 9]])), ValueError, r"offsets has shape \(1, 3\)"),
    (dict(offsets=torch.tensor([0, 4, 10])), ValueError,
     r"offsets holds 10 .*expected offsets in \[0, P\).* = 10"),
    (dict(offsets=torch.tensor([0, -1, 4])), ValueError, r"offsets holds -1"),
    (dict(offsets=torch.tensor([4, 0, 4])), ValueError, r"offsets repeats offset 4"),
    (dict(offsets=torch.tensor([0.0, 4.0, 9.0])), TypeError,
     r"offsets.dtype is torch.float32: expected an integer dtype"),
    (dict(offsets=torch.tensor([True, False, True])), TypeError, r"offsets.dtype is torch.bool"),
    (dict(values=torch.randn(11, 6), offsets=torch.arange(11)), ValueError,
     r"K = 11 diagonals: expected 1 <= K <= P = .* = 10"),
    (dict(values=torch.randn(0, 6), offsets=torch.arange(0)), ValueError, r"K = 0"),
    (dict(out_features=0), ValueError, r"out_features=0: expected an int >= 1"),
    (dict(x=torch.randn(4, 10, dtype=torch.float64)), TypeError,
     r"x.dtype is torch.float64: expected torch.float32, the dtype of values"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, r"bias.dtype is torch.float16"),
    (dict(x=torch.randint(0, 3, (4, 10)), values=torch.randint(0, 3, (3, 6)), bias=None),
     TypeError, r"values.dtype is torch.int64: expected one of float16"),
    (dict(bias=torch.randn(5)), ValueError, r"bias has shape \(5,\): expected \(6,\)"),
    (dict(x=torch.randn(4, 10, device="meta")), ValueError, r"x is on meta: expected cpu"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x is a 0-d tensor"),
]


@pytest.mark.parametrize("changes,error,message", DIAG_CASES)
def test_diag_linear_rejects(changes, error, message):
    with pytest.raises(error, match=message) as info:
        call_diag(diag_args(**changes))
    assert "sparsefx.diag_linear" in str(info.value)


FANIN_CASES = [
    (dict(indices=torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32)), ValueError,
     r"indices has shape \(5, 3\): expected \(6, 3\)"),
    (dict(indices=torch.tensor([[0, 1, 10]] * 6, dtype=torch.int32)), ValueError,
     r"indices\[0, 2\] = 10: expected column ids in \[0, in_features\) = \[0, 10\)"),
    (dict(indices=torch.tensor([[0, 1, 2]] * 5 + [[-3, 1, 2]], dtype=torch.int32)), ValueError,
     r"indices\[5, 0\] = -3"),
    (dict(indices=torch.tensor([[0, 1, 2]] * 5 + [[4, 7, 4]], dtype=torch.int32)), ValueError,
     r"indices row 5 repeats column 4"),
    (dict(indices=torch.zeros(6, 3)), TypeError, r"indices.dtype is torch.float32"),
    (dict(x=torch.randn(4, 2)), ValueError, r"k = 3 entries: expected 1 <= k <= in_features = 2"),
    (dict(values=torch.randn(6, 3).half()), TypeError,
     r"x.dtype is torch.float32: expected torch.float16"),
    (dict(values=torch.randn(6, 3, device="meta")), ValueError, r"x is on cpu: expected meta"),
    (dict(bias=torch.randn(7)), ValueError, r"bias has shape \(7,\): expected \(6,\)"),
]


@pytest.mark.parametrize("changes,error,message", FANIN_CASES)
def test_fanin_linear_rejects(changes, error, message):
    with pytest.raises(error, match=message) as info:
        call_fanin(fanin_args(**changes))
    assert "sparsefx.fanin_linear" in str(info.value)


def test_meta_tensors_propagate_shapes():
    """On the meta device the ops only compute shapes (through their fake implementations)."""
    y = OPS.diag_linear(torch.randn(2, 4, 10, device="meta"), torch.randn(3, 6, device="meta"),
                        torch.tensor([0, 4, 9], device="meta"), 6)
    assert y.shape == (2, 4, 6) and y.device.type == "meta"


def test_non_tensor_operand_is_named():
    # the dispatcher checks the schema before the op runs; its message names the argument
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Tensor' for argument 'x'"):
        call_fanin(fanin_args(x=[[1.0] * 10]))


def test_errors_surface_at_compile_time():
    """Shape errors come from the fake implementation too, so a compiled model fails while
    tracing with the same message."""
    args = diag_args(values=torch.randn(3, 5))

    @torch.compile(fullgraph=True, backend="eager")
    def run(x, values, offsets, bias):
        return OPS.diag_linear(x, values, offsets, 6, bias)

    with pytest.raises(Exception, match=re.escape("values has shape (3, 5)")):
        run(args["x"], args["values"], args["offsets"], args["bias"])


def test_gradient_ops_check_their_operands():
    with pytest.raises(ValueError, match=r"grad_out has shape \(4, 5\): expected last dimension 6"):
        OPS.fanin_linear_grad_input(torch.randn(4, 5), torch.randn(6, 3),
                                    torch.tensor([[0, 1, 2]] * 6), 10)
    with pytest.raises(ValueError, match=r"grad_out has leading dims \(3,\): expected \(4,\)"):
        OPS.diag_linear_grad_values(torch.randn(3, 6), torch.randn(4, 10), torch.randn(3, 6),
                                    torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match=r"grad_out.dtype is torch.float64"):
        OPS.fanin_linear_grad_values(torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 10),
                                     torch.tensor([[0, 1, 2]] * 6))


@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_native_kernels_never_read_outside_the_input(index_dtype):
    """The C++ kernels bounds-check every id themselves (a structure edited behind the op's
    back, e.g. through ``.data``, must not read foreign memory)."""
    native = cpu.load_native()
    bad = torch.tensor([[0, 1], [2, 1000]], dtype=index_dtype)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        native.fanin_forward(torch.randn(6, 3), torch.randn(2, 2), bad)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        native.fanin_input_grad(torch.randn(2, 3), torch.randn(2, 2), bad, 6)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        native.fanin_values_grad(torch.randn(2, 3), torch.randn(6, 3), bad)


def test_a_failed_call_leaves_its_inputs_untouched():
    args = diag_args(offsets=torch.tensor([4, 0, 4]))
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError):
        call_diag(args)
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), name
