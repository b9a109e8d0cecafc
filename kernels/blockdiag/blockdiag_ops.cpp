// The blocked-diagonal ops on the CPU and their autograd, in C++ (see ../csrc/common.h and
// kernels.h). The batched GEMMs pay for gathering the input columns by residue and for
// laying the values out as blocks; they beat the diagonal kernel only with many activation
// rows and blocks of at least kBlockedMinOutBlock outputs (measured: benchmarks/bench.py,
// layers). Other calls go to the diag ops, whose semantics these share: a blockdiag layer is
// a diag layer whose offsets are whole cosets.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <memory>

#include "../csrc/checks.h"
#include "../csrc/common.h"
#include "../diag/ops.h"
#include "checks.h"
#include "kernels.h"

namespace sparsefx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kBlockedMinRows = 128, kBlockedMinOutBlock = 64;

// whether a call on `rows` activation rows takes the batched GEMMs
bool blocked(int64_t rows, int64_t out_features, int64_t groups) {
  return rows >= kBlockedMinRows && out_features / groups >= kBlockedMinOutBlock;
}

// The layout of `offsets` (checked), built once per structure version.
std::shared_ptr<const BlockLayout> layout_of(const Tensor& offsets, int64_t out_features,
                                             int64_t in_features, int64_t groups) {
  auto& cache = structure_cache();
  const int64_t shape = (out_features << 31) | in_features;
  if (auto found = cache.find(offsets, kBlockdiagBlocks, shape, groups))
    return std::static_pointer_cast<const BlockLayout>(found);
  Tensor flat = offsets_in_range(offsets, std::max(out_features, in_features));
  auto built = std::make_shared<const BlockLayout>(block_layout(
      flat.data_ptr<int64_t>(), flat.numel(), out_features, in_features, groups));
  cache.remember(offsets, kBlockdiagBlocks, shape, groups, built);
  return built;
}

// The stacked blocks [g, c * in/g, out/g] holding `values`, in the compute dtype `dtype`.
// Laid out on every call: blocks kept with the values (keyed by their version counter) went
// stale under writes through .data, which gradcheck and user code make.
Tensor blocks_of(const BlockLayout& layout, const Tensor& values, at::ScalarType dtype) {
  Tensor compute = as_compute(values, dtype);
  Tensor blocks = at::empty({layout.groups, layout.stacked(), layout.out_block},
                            compute.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_blockdiag_blocks", [&] {
    move_values(layout, compute.data_ptr<scalar_t>(), blocks.data_ptr<scalar_t>(), true);
  });
  return blocks;
}

// [g, rows, c * in/g]: the input columns each block-row reads
Tensor columns_of(const BlockLayout& layout, const Tensor& x_rows) {
  Tensor a = at::empty({layout.groups, x_rows.size(0), layout.stacked()}, x_rows.options());
  AT_DISPATCH_FLOATING_TYPES(x_rows.scalar_type(), "sparsefx_blockdiag_columns", [&] {
    gather_columns(layout, x_rows.data_ptr<scalar_t>(), x_rows.size(0), a.data_ptr<scalar_t>());
  });
  return a;
}

// [g, rows, out/g]: the output gradient's columns grouped by residue
Tensor residue_rows_of(const BlockLayout& layout, const Tensor& grad_rows) {
  Tensor out = at::empty({layout.groups, grad_rows.size(0), layout.out_block},
                         grad_rows.options());
  AT_DISPATCH_FLOATING_TYPES(grad_rows.scalar_type(), "sparsefx_blockdiag_rows", [&] {
    move_rows(layout, grad_rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              grad_rows.size(0), static_cast<const scalar_t*>(nullptr), false);
  });
  return out;
}

Tensor blockdiag_linear_cpu(const Tensor& x, const Tensor& values, const Tensor& offsets,
                            int64_t out_features, int64_t groups, const OptionalTensor& bias) {
  constexpr const char* op = "sparsefx.blockdiag_linear";
  check_cpu(op, "x", x);
  const int64_t in_features = features(x);
  check_blockdiag(op, x, "x", values, offsets, out_features, in_features, groups, bias);
  const int64_t rows = x.numel() / in_features;
  if (!blocked(rows, out_features, groups))
    return diag_linear_op().call(x, values, offsets, out_features, bias);
  const auto dtype = compute_dtype(x.scalar_type());
  const auto layout = layout_of(offsets, out_features, in_features, groups);
  Tensor products = at::bmm(columns_of(*layout, as_compute(x.reshape({-1, in_features}), dtype)),
                            blocks_of(*layout, values, dtype));
  Tensor b = bias.has_value() ? as_compute(*bias, dtype) : Tensor();
  Tensor y = at::empty({rows, out_features}, products.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_blockdiag_forward", [&] {
    move_rows(*layout, y.data_ptr<scalar_t>(), products.data_ptr<scalar_t>(), rows,
              b.defined() ? b.data_ptr<scalar_t>() : nullptr, true);
  });
  return as_result(y, x.scalar_type()).view(with_last(x, out_features));
}

Tensor blockdiag_linear_grad_input_cpu(const Tensor& grad_out, const Tensor& values,
                                       const Tensor& offsets, int64_t in_features,
                                       int64_t groups) {
  constexpr const char* op = "sparsefx.blockdiag_linear_grad_input";
  check_cpu(op, "grad_out", grad_out);
  const int64_t out_features = features(grad_out);
  check_blockdiag(op, grad_out, "grad_out", values, offsets, out_features, in_features, groups);
  const int64_t rows = grad_out.numel() / out_features;
  if (!blocked(rows, out_features, groups))
    return diag_grad_input_op().call(grad_out, values, offsets, in_features);
  const auto dtype = compute_dtype(grad_out.scalar_type());
  const auto layout = layout_of(offsets, out_features, in_features, groups);
  Tensor grad_rows = as_compute(grad_out.reshape({-1, out_features}), dtype);
  Tensor grad_columns = at::bmm(residue_rows_of(*layout, grad_rows),
                                blocks_of(*layout, values, dtype).transpose(1, 2));
  Tensor grad_x = at::empty({rows, in_features}, grad_columns.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_blockdiag_grad_input", [&] {
    scatter_columns(*layout, grad_columns.data_ptr<scalar_t>(), rows,
                    grad_x.data_ptr<scalar_t>());
  });
  return as_result(grad_x, grad_out.scalar_type()).view(with_last(grad_out, in_features));
}

Tensor blockdiag_linear_grad_values_cpu(const Tensor& grad_out, const Tensor& x,
                                        const Tensor& values, const Tensor& offsets,
                                        int64_t groups) {
  constexpr const char* op = "sparsefx.blockdiag_linear_grad_values";
  check_cpu(op, "x", x);
  const int64_t out_features = features(grad_out), in_features = features(x);
  check_blockdiag(op, x, "x", values, offsets, out_features, in_features, groups);
  check_diag(op, grad_out, "grad_out", values, offsets, out_features, in_features,
             std::nullopt, /*structure=*/false);
  check_rows_match(op, grad_out, x);
  const int64_t rows = x.numel() / in_features;
  if (!blocked(rows, out_features, groups))
    return diag_grad_values_op().call(grad_out, x, values, offsets);
  const auto dtype = compute_dtype(x.scalar_type());
  const auto layout = layout_of(offsets, out_features, in_features, groups);
  Tensor columns = columns_of(*layout, as_compute(x.reshape({-1, in_features}), dtype));
  Tensor grad_blocks = at::bmm(
      columns.transpose(1, 2),
      residue_rows_of(*layout, as_compute(grad_out.reshape({-1, out_features}), dtype)))
                           .contiguous();
  Tensor grad = at::empty(values.sizes(), grad_blocks.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_blockdiag_grad_values", [&] {
    move_values(*layout, grad.data_ptr<scalar_t>(), grad_blocks.data_ptr<scalar_t>(), false);
  });
  return as_result(grad, x.scalar_type());
}

// --------------------------------------------------------------------------- autograd

using BlockdiagLinearSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                        c10::SymInt, c10::SymInt, const OptionalTensor&);
using BlockdiagGradInputSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                           c10::SymInt, c10::SymInt);
using BlockdiagGradValuesSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, c10::SymInt);

const c10::TypedOperatorHandle<BlockdiagLinearSignature>& blockdiag_linear_op() {
  static auto handle = op_handle<BlockdiagLinearSignature>("sparsefx::blockdiag_linear");
  return handle;
}
const c10::TypedOperatorHandle<BlockdiagGradInputSignature>& blockdiag_grad_input_op() {
  static auto handle =
      op_handle<BlockdiagGradInputSignature>("sparsefx::blockdiag_linear_grad_input");
  return handle;
}
const c10::TypedOperatorHandle<BlockdiagGradValuesSignature>& blockdiag_grad_values_op() {
  static auto handle =
      op_handle<BlockdiagGradValuesSignature>("sparsefx::blockdiag_linear_grad_values");
  return handle;
}

class BlockdiagLinearFunction : public torch::autograd::Function<BlockdiagLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& offsets, c10::SymInt out_features, c10::SymInt groups,
                        const OptionalTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, values, offsets});
    ctx->saved_data["has_bias"] = has_bias(bias);
    ctx->saved_data["groups"] = groups;
    return blockdiag_linear_op().call(x, values, offsets, std::move(out_features),
                                      std::move(groups), bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &offsets = saved[2];
    const c10::SymInt groups = ctx->saved_data["groups"].toSymInt();
    const Tensor& grad_out = grads[0];
    Tensor grad_x, grad_values, grad_bias;
    if (ctx->needs_input_grad(kX))
      grad_x = blockdiag_grad_input_op().call(grad_out, values, offsets, x.sym_size(-1), groups);
    if (ctx->needs_input_grad(kValues))
      grad_values = blockdiag_grad_values_op().call(grad_out, x, values, offsets, groups);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(kBias))
      grad_bias = bias_grad(grad_out);
    return {grad_x, grad_values, Tensor(), Tensor(), Tensor(), grad_bias};
  }
};

Tensor blockdiag_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& offsets,
                                 c10::SymInt out_features, c10::SymInt groups,
                                 const OptionalTensor& bias) {
  return BlockdiagLinearFunction::apply(x, values, offsets, std::move(out_features),
                                        std::move(groups), bias);
}

}  // namespace
}  // namespace sparsefx

TORCH_LIBRARY_IMPL(sparsefx, CPU, m) {
  m.impl("blockdiag_linear", &sparsefx::blockdiag_linear_cpu);
  m.impl("blockdiag_linear_grad_input", &sparsefx::blockdiag_linear_grad_input_cpu);
  m.impl("blockdiag_linear_grad_values", &sparsefx::blockdiag_linear_grad_values_cpu);
}

TORCH_LIBRARY_IMPL(sparsefx, Autograd, m) {
  m.impl("blockdiag_linear", &sparsefx::blockdiag_linear_autograd);
}
