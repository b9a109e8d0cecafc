"""Bad input raises TypeError/ValueError naming the argument, the value and what was expected:
never a crash, never a silently wrong result."""
import re

import pytest
import torch

from sparsefx.kernels import use_cpu_kernels

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
    # a wrong input width names x, the input, not the layer's values
    (dict(x=torch.randn(4, 4)), ValueError,
     r"x has shape \(4, 4\): expected last dimension >= 6 \(in_features: values \(3, 6\)"),
    (dict(out_features=12, x=torch.randn(4, 4), bias=None), ValueError,
     r"x has shape \(4, 4\): expected last dimension 6 \(in_features: values \(3, 6\) hold "
     r"diagonals of length L = min\(out_features, in_features\) = 6 < out_features = 12\)"),
    (dict(values=torch.randn(3, 7)), ValueError, r"values has shape \(3, 7\).*L = .*min\(6, 10\)"),
    # values (3, 5) fit a (6, 5) layer: the 10-wide x is what does not fit
    (dict(values=torch.randn(3, 5)), ValueError, r"x has shape \(4, 10\): expected last "
     r"dimension 5 \(in_features: values \(3, 5\)"),
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


# checks that read a structure's values: fake tensors carry no data, so tracing skips them
_DATA_CHECKS = re.compile(r"offsets holds|repeats|\\\] = ")


@pytest.fixture(params=["native", "torch", "fake"])
def check_path(request):
    """Where the checks run: the C++ CPU kernels, the Python ones (CUDA's and the PyTorch
    fallback's), or the fake implementations that torch.compile traces with. All three must
    give the same message."""
    if request.param == "fake":
        yield "fake"
        return
    with use_cpu_kernels(request.param):
        yield request.param


def run_on(path, call, args, error, message):
    if path == "fake":
        if _DATA_CHECKS.search(message):
            pytest.skip("a value check: needs the structure's data")
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            args = {name: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                    for name, value in args.items()}
            with pytest.raises(error, match=message) as info:
                call(args)
        return info
    with pytest.raises(error, match=message) as info:
        call(args)
    return info


@pytest.mark.parametrize("changes,error,message", DIAG_CASES)
def test_diag_linear_rejects(check_path, changes, error, message):
    info = run_on(check_path, call_diag, diag_args(**changes), error, message)
    assert "sparsefx.diag_linear" in str(info.value)


FANIN_CASES = [
    (dict(indices=torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32)), ValueError,
     r"indices has shape \(5, 3\): expected \(6, 3\)"),
    (dict(indices=torch.tensor([[0, 1, 10]] * 6, dtype=torch.int32)), ValueError,
     r"indices\[0, 2\] = 10: expected column ids in \[0, in_features\) = \[0, 10\), "
     r"in_features being the last dimension of x \(4, 10\)"),
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
def test_fanin_linear_rejects(check_path, changes, error, message):
    info = run_on(check_path, call_fanin, fanin_args(**changes), error, message)
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
    args = diag_args(x=torch.randn(4, 4))

    @torch.compile(fullgraph=True, backend="eager")
    def run(x, values, offsets, bias):
        return OPS.diag_linear(x, values, offsets, 6, bias)

    with pytest.raises(Exception, match=re.escape("x has shape (4, 4): expected last dimension >= 6")):
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
    """A structure edited behind the op's back (through ``.data``: the version counter does
    not see it, so the cached value checks do not run again) must not make a kernel read
    outside its inputs: the C++ kernels bounds-check ids and offsets themselves."""
    x, grad_out = torch.randn(3, 6), torch.randn(3, 2)
    values = torch.randn(2, 2)
    indices = torch.tensor([[0, 1], [2, 3]], dtype=index_dtype)
    OPS.fanin_linear(x, values, indices)  # checked once, remembered
    indices.data[1, 1] = 1000
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        OPS.fanin_linear(x, values, indices)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        OPS.fanin_linear_grad_input(grad_out, values, indices, 6)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        OPS.fanin_linear_grad_values(grad_out, x, indices)

    x, grad_out = torch.randn(3, 10), torch.randn(3, 6)
    values, offsets = torch.randn(3, 6), torch.tensor([0, 4, 9], dtype=index_dtype)
    OPS.diag_linear(x, values, offsets, 6)
    offsets.data[2] = 1000
    with pytest.raises(IndexError, match=r"offset 1000 lies outside \[0, 10\)"):
        OPS.diag_linear(x, values, offsets, 6)
    with pytest.raises(IndexError, match=r"offset 1000 lies outside \[0, 10\)"):
        OPS.diag_linear_grad_input(grad_out, values, offsets, 10)
    with pytest.raises(IndexError, match=r"offset 1000 lies outside \[0, 10\)"):
        OPS.diag_linear_grad_values(grad_out, x, values, offsets)


@pytest.mark.parametrize("rows", [(), (1,), (3,)])
def test_a_call_leaves_its_inputs_untouched(check_path, rows):
    """Forward and backward write only their results (the bias of a one-row input once came
    back as the output's storage)."""
    if check_path == "fake":
        pytest.skip("fake tensors hold no data")
    diag, fanin = diag_args(x=torch.randn(*rows, 10)), fanin_args(x=torch.randn(*rows, 10))
    for args, call in ((diag, call_diag), (fanin, call_fanin)):
        tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
        before = {k: v.clone() for k, v in tensors.items()}
        for name in ("x", "values", "bias"):
            tensors[name].requires_grad_()
        call(args).sum().backward()
        for name, tensor in before.items():
            assert torch.equal(tensors[name].detach(), tensor), name


def test_a_failed_call_leaves_its_inputs_untouched():
    args = diag_args(offsets=torch.tensor([4, 0, 4]))
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError):
        call_diag(args)
    for name, tensor in before.items():
        assert torch.equal(args[name], tensor), name
