"""Dense references, tolerances and hypothesis strategies shared by the op tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from sparsefx.kernels import patterns

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# sizes: small odd ones, and ones that straddle the CPU kernels' 256-wide tiles and the
# Triton blocks (16..128), so every partial-tile path runs
feature_sizes = st.one_of(st.integers(1, 40), st.sampled_from([63, 65, 127, 129, 255, 257, 300]))
leading_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
sparsities = st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99])


def error_bound(dtype: torch.dtype, terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Largest error allowed for a sum of ``terms`` products whose absolute values sum to
    ``magnitude``: accumulation in fp32 (fp64 for fp64) costs at most ``terms * eps_acc``
    relative to ``magnitude`` (the classic dot-product bound), and rounding the result to
    ``dtype`` -- twice where a bias is added after the cast -- ``2 * eps(dtype)``."""
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    eps_acc, eps_out = torch.finfo(accumulate).eps, torch.finfo(dtype).eps
    return (terms * eps_acc + 2 * eps_out) * magnitude + torch.finfo(dtype).tiny


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor,
                              magnitude: torch.Tensor, terms: int, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    bound = error_bound(actual.dtype, terms, magnitude.double())
    excess = (actual.double() - expected.double()).abs() - bound
    assert (excess <= 0).all(), (
        f"{what}: worst error exceeds its bound by {excess.max().item():.3g} "
        f"(dtype {actual.dtype}, {terms} terms)")


@dataclass
class DenseCheck:
    """Runs an op and the dense reference (``F.linear`` in float64 on the materialised W)
    on the same inputs, and compares output and every gradient."""
    weight: torch.Tensor  # dense W in the op's dtype (exactly the values the op stores)
    stored: tuple         # (rows, cols) of every stored value, for the values gradient
    terms: int            # products summed per output element (an upper bound)
    terms_grad_x: int     # products summed per input-gradient element (an upper bound)

    def compare(self, run_op, x, values, bias, grad_out_seed: int = 0):
        x = x.detach().requires_grad_()
        values = values.detach().requires_grad_()
        bias = None if bias is None else bias.detach().requires_grad_()
        y = run_op(x, values, bias)
        generator = torch.Generator().manual_seed(grad_out_seed)
        grad_out = torch.randn(y.shape, generator=generator).to(device=y.device, dtype=y.dtype)
        y.backward(grad_out)

        x64 = x.detach().double().requires_grad_()
        w64 = self.weight.detach().double().requires_grad_()
        b64 = None if bias is None else bias.detach().double().requires_grad_()
        y64 = F.linear(x64, w64, b64)
        y64.backward(grad_out.double())

        abs_bias = 0 if bias is None else bias.detach().double().abs()
        y_magnitude = F.linear(x64.detach().abs(), w64.detach().abs()) + abs_bias
        assert_close_to_reference(y, y64, y_magnitude, self.terms, "output")

        g = grad_out.double()
        dx_magnitude = g.abs() @ w64.detach().abs()
        assert_close_to_reference(x.grad, x64.grad, dx_magnitude, self.terms_grad_x, "grad x")

        rows = max(1, x64.reshape(-1, x64.shape[-1]).shape[0])
        flat_g = g.reshape(-1, g.shape[-1]).abs()
        flat_x = x64.detach().reshape(-1, x64.shape[-1]).abs()
        dw_magnitude = (flat_g.T @ flat_x)[self.stored]
        assert_close_to_reference(values.grad, w64.grad[self.stored], dw_magnitude, rows,
                                  "grad values")
        if bias is not None:
            assert_close_to_reference(bias.grad, b64.grad, flat_g.sum(0), rows, "grad bias")


def diag_case(out_features, in_features, sparsity, dtype, generator):
    """Random diagonal structure at ``sparsity`` with its dense reference."""
    num_kept = patterns.diag_num_kept(out_features, in_features, sparsity)
    offsets = patterns.random_diag_offsets(out_features, in_features, num_kept, generator)
    _, length = patterns.diag_geometry(out_features, in_features)
    values = torch.randn(num_kept, length, generator=generator).to(dtype)
    weight = patterns.diag_to_dense(values, offsets, out_features, in_features)
    stored = patterns.diag_coordinates(offsets, out_features, in_features)
    return values, offsets, DenseCheck(weight, stored, terms=num_kept, terms_grad_x=num_kept)


def blockdiag_case(groups, out_block, in_block, sparsity, dtype, generator):
    """Random whole cosets (``g`` of them, blocks ``out_block x in_block``) at ``sparsity``
    with their dense reference."""
    out_features, in_features = groups * out_block, groups * in_block
    cosets = torch.randperm(groups, generator=generator)[
        :patterns.blockdiag_num_cosets(groups, sparsity)]
    offsets = patterns.blockdiag_offsets(out_features, in_features, groups, cosets)
    _, length = patterns.diag_geometry(out_features, in_features)
    values = torch.randn(offsets.numel(), length, generator=generator).to(dtype)
    weight = patterns.diag_to_dense(values, offsets, out_features, in_features)
    stored = patterns.diag_coordinates(offsets, out_features, in_features)
    terms = offsets.numel()  # c * max(out, in) / g: at least a row's and a column's count
    return values, offsets, DenseCheck(weight, stored, terms=terms, terms_grad_x=terms)


def fanin_case(out_features, in_features, sparsity, dtype, generator):
    fan_in = patterns.fanin_num_kept(in_features, sparsity)
    indices = patterns.random_fanin_indices(out_features, in_features, fan_in, generator)
    values = torch.randn(out_features, fan_in, generator=generator).to(dtype)
    weight = patterns.fanin_to_dense(values, indices, in_features)
    rows = torch.arange(out_features)[:, None].expand_as(indices)
    return values, indices, DenseCheck(weight, (rows, indices.long()), terms=fan_in,
                                       terms_grad_x=out_features)


def masked_reference(original, sparse, stored_in_out):
    """``original`` with each weight that ``sparse`` rewrote multiplied by its sparsity mask:
    the dense model with the same structure baked in. ``stored_in_out(name, owner)`` says
    whether that weight is stored as (in, out) (GPT-2's Conv1D, ``x @ w``), so its mask is
    transposed."""
    import copy

    from sparsefx.layers import SPARSE_LAYERS

    reference = copy.deepcopy(original)
    parameters = dict(reference.named_parameters())
    with torch.no_grad():
        for name, layer in sparse.named_modules():
            if isinstance(layer, SPARSE_LAYERS):
                owner = reference.get_submodule(name.rpartition(".")[0])
                leaf = name.rpartition(".")[2]
                if isinstance(owner, torch.nn.MultiheadAttention) and leaf != "out_proj":
                    # the projection sparsefx.attention made of its q/k/v weights
                    weight = (owner.in_proj_weight.chunk(3)["qkv".index(leaf[0])]
                              if owner._qkv_same_embed_dim else getattr(owner, f"{leaf}_weight"))
                else:
                    weight = parameters.get(f"{name}.weight" if name else "weight",
                                            parameters.get(name))
                mask = (layer.dense_weight() != 0).to(weight.dtype)
                weight.mul_(mask.T if stored_in_out(name, owner) else mask)
    return reference
