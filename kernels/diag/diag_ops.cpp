// The diagonal ops on the CPU and their autograd, in C++ (see ../csrc/common.h): a call
// from eager Python or compiled code reaches the kernel through the dispatcher with no
// Python on the way.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../csrc/checks.h"
#include "../csrc/common.h"
#include "checks.h"
#include "kernels.h"
#include "ops.h"

namespace sparsefx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y[rows, out_len] = bias (or zeros) + the diagonals applied to the rows of x (see
// kernels.h), in the compute dtype `dtype`
Tensor apply_diagonals(const Tensor& x_rows, const Tensor& values, const Tensor& offsets,
                       int64_t mod, bool gather, int64_t out_len, const OptionalTensor& bias,
                       at::ScalarType dtype) {
  Tensor x = as_compute(x_rows, dtype), v = as_compute(values, dtype);
  Tensor b = bias.has_value() ? as_compute(*bias, dtype) : Tensor();
  Tensor offsets64 = offsets_in_range(offsets, mod);
  Tensor y = at::empty({x.size(0), out_len}, x.options());
  if (dtype == at::kFloat) {
    diag_apply(DiagApply{x.data_ptr<float>(), v.data_ptr<float>(), offsets64.data_ptr<int64_t>(),
                         b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                         x.size(0), v.size(0), v.size(1), mod, gather});
  } else {
    y.copy_(b.defined() ? b.expand_as(y) : at::zeros_like(y));
    diag_apply_plain<double>(x.data_ptr<double>(), v.data_ptr<double>(),
                             offsets64.data_ptr<int64_t>(), y.data_ptr<double>(), x.size(0),
                             v.size(0), v.size(1), mod, gather);
  }
  return y;
}

// ------------------------------------------------------------------------- diag: CPU

Tensor diag_linear_cpu(const Tensor& x, const Tensor& values, const Tensor& offsets,
                       int64_t out_features, const OptionalTensor& bias) {
  constexpr const char* op = "sparsefx.diag_linear";
  check_cpu(op, "x", x);
  const int64_t in_features = features(x);
  check_diag(op, x, "x", values, offsets, out_features, in_features, bias);
  Tensor y = apply_diagonals(x.reshape({-1, in_features}), values, offsets,
                             std::max(out_features, in_features),
                             /*gather=*/out_features < in_features, out_features, bias,
                             compute_dtype(x.scalar_type()));
  return as_result(y, x.scalar_type()).view(with_last(x, out_features));
}

// grad_out @ W: the transpose of a diagonal matrix is diagonal, so this is the forward kernel
// with the gather and scatter forms swapped
Tensor diag_linear_grad_input_cpu(const Tensor& grad_out, const Tensor& values,
                                  const Tensor& offsets, int64_t in_features) {
  constexpr const char* op = "sparsefx.diag_linear_grad_input";
  check_cpu(op, "grad_out", grad_out);
  const int64_t out_features = features(grad_out);
  check_diag(op, grad_out, "grad_out", values, offsets, out_features, in_features);
  Tensor grad_x = apply_diagonals(grad_out.reshape({-1, out_features}), values, offsets,
                                  std::max(out_features, in_features),
                                  /*gather=*/out_features >= in_features, in_features,
                                  std::nullopt, compute_dtype(grad_out.scalar_type()));
  return as_result(grad_x, grad_out.scalar_type()).view(with_last(grad_out, in_features));
}

// gradient of values[K, L]: the kept diagonals of grad_out.T @ x only
Tensor diag_linear_grad_values_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& values,
                                   const Tensor& offsets) {
  constexpr const char* op = "sparsefx.diag_linear_grad_values";
  check_cpu(op, "x", x);
  check_diag(op, x, "x", values, offsets, features(grad_out), features(x));
  check_diag(op, grad_out, "grad_out", values, offsets, features(grad_out), features(x),
             std::nullopt, /*structure=*/false);
  check_rows_match(op, grad_out, x);
  const int64_t out_features = grad_out.size(-1), in_features = x.size(-1);
  const int64_t mod = std::max(out_features, in_features);
  const auto dtype = compute_dtype(x.scalar_type());
  Tensor grad_rows = as_compute(grad_out.reshape({-1, out_features}), dtype);
  Tensor x_rows = as_compute(x.reshape({-1, in_features}), dtype);
  // wide (out < in): grad[k, t] = sum grad_out[:, t] * x[:, (t + d) % in]; tall: the reverse
  const bool wide = out_features < in_features;
  const Tensor& a = wide ? grad_rows : x_rows;
  const Tensor& b = wide ? x_rows : grad_rows;
  Tensor offsets64 = offsets_in_range(offsets, mod);
  Tensor grad = at::empty({offsets64.size(0), a.size(1)}, a.options());
  if (dtype == at::kFloat) {
    diag_values_grad(DiagValuesGrad{a.data_ptr<float>(), b.data_ptr<float>(),
                                    offsets64.data_ptr<int64_t>(), grad.data_ptr<float>(),
                                    a.size(0), grad.size(0), grad.size(1), mod});
  } else {
    diag_values_grad_plain<double>(a.data_ptr<double>(), b.data_ptr<double>(),
                                   offsets64.data_ptr<int64_t>(), grad.data_ptr<double>(),
                                   a.size(0), grad.size(0), grad.size(1), mod);
  }
  return as_result(grad, x.scalar_type());
}


// --------------------------------------------------------------------------- autograd

class DiagLinearFunction : public torch::autograd::Function<DiagLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& offsets, c10::SymInt out_features,
                        const OptionalTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, values, offsets});
    ctx->saved_data["has_bias"] = has_bias(bias);
    return diag_linear_op().call(x, values, offsets, std::move(out_features), bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &offsets = saved[2];
    const Tensor& grad_out = grads[0];
    Tensor grad_x, grad_values, grad_bias;
    if (ctx->needs_input_grad(kX))
      grad_x = diag_grad_input_op().call(grad_out, values, offsets, x.sym_size(-1));
    if (ctx->needs_input_grad(kValues))
      grad_values = diag_grad_values_op().call(grad_out, x, values, offsets);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(kBias))
      grad_bias = bias_grad(grad_out);
    return {grad_x, grad_values, Tensor(), Tensor(), grad_bias};
  }
};

Tensor diag_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& offsets,
                            c10::SymInt out_features, const OptionalTensor& bias) {
  return DiagLinearFunction::apply(x, values, offsets, std::move(out_features), bias);
}

}  // namespace
}  // namespace sparsefx

TORCH_LIBRARY_IMPL(sparsefx, CPU, m) {
  m.impl("diag_linear", &sparsefx::diag_linear_cpu);
  m.impl("diag_linear_grad_input", &sparsefx::diag_linear_grad_input_cpu);
  m.impl("diag_linear_grad_values", &sparsefx::diag_linear_grad_values_cpu);
}

TORCH_LIBRARY_IMPL(sparsefx, Autograd, m) {
  m.impl("diag_linear", &sparsefx::diag_linear_autograd);
}
