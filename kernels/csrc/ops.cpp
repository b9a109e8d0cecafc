// The sparsefx ops on the CPU, and their autograd, in C++: a call from eager Python or from
// compiled code reaches the kernel through the dispatcher with no Python on the way.
//
// The schemas are defined in Python (kernels/ops.py, one place for every backend); this file
// registers, for the ops defined there:
//   CPU      -- argument checks (checks.h; structure value checks once per structure
//               version), fp16/bf16 upcast to fp32, leading dims, bias, the kernels;
//   Autograd -- one C++ autograd function per public op, serving every device: its backward
//               calls the gradient *ops* through the dispatcher, so torch.compile traces them
//               and CUDA tensors reach the Triton kernels registered from Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>


#include "checks.h"
#include "diag_cpu.h"
#include "fanin_cpu.h"

namespace sparsefx {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ------------------------------------------------------------------------------ helpers

// fp16 / bf16 compute in fp32; fp64 stays fp64 (for gradcheck)
at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` as a contiguous tensor of `dtype`; no copy when it already is one
Tensor as_compute(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// `t` cast to `dtype` in contiguous layout (one pass at most)
Tensor as_result(const Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.contiguous();
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// the shape of `t` with its last dimension replaced by `last`
std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// int64 offsets, each verified to lie in [0, mod): the kernels index activations with them,
// and a structure edited behind the version counter (through .data) must not make them read
// outside their inputs. O(K) per call.
Tensor offsets_in_range(const Tensor& offsets, int64_t mod) {
  Tensor flat = offsets.to(at::kLong).contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  for (int64_t k = 0; k < flat.numel(); ++k) {
    TORCH_CHECK_INDEX(data[k] >= 0 && data[k] < mod, "sparsefx diag kernel: offset ", data[k],
                      " lies outside [0, ", mod, ")");
  }
  return flat;
}

// the C++ kernels read int16, int32 and int64 ids directly; other ids are converted per call
Tensor native_indices(const Tensor& indices) {
  const auto dtype = indices.scalar_type();
  if (dtype == at::kShort || dtype == at::kInt || dtype == at::kLong) return indices.contiguous();
  return indices.to(at::kInt).contiguous();
}

#define SPARSEFX_DISPATCH_INDEX(index_tensor, ...)                                    \
  [&] {                                                                               \
    switch ((index_tensor).scalar_type()) {                                           \
      case at::kShort: {                                                              \
        using index_t = int16_t;                                                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kInt: {                                                                \
        using index_t = int32_t;                                                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kLong: {                                                               \
        using index_t = int64_t;                                                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      default:                                                                        \
        TORCH_CHECK(false, "indices must be int16, int32 or int64, got ",             \
                    (index_tensor).scalar_type());                                    \
    }                                                                                 \
  }()

// Every id in [0, in), checked on every call (O(out * k), vectorised): the kernels index
// activations with them, and a structure edited behind the version counter (through .data)
// must not make them read outside their inputs.
void check_ids_in_range(const Tensor& ids, int64_t in) {
  const bool inside = SPARSEFX_DISPATCH_INDEX(ids, [&] {
    return ids_in_range(ids.data_ptr<index_t>(), ids.numel(), in);
  });
  TORCH_CHECK_INDEX(inside, "sparsefx fan-in kernel: an index lies outside [0, ", in, ")");
}

// y[rows, out_len] = bias (or zeros) + the diagonals applied to the rows of x (see
// diag_cpu.h), in the compute dtype `dtype`
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

// ------------------------------------------------------------------------ fanin: CPU

// Activations for the fan-in kernels: feature-major (see fanin_cpu.h). `rows` [batch,
// features] in the compute dtype becomes [features, batch] (width = batch), or, float32
// above one block of columns, [chunks, features, kBlockColumns] (width = kBlockColumns).
struct FeatureMajor {
  Tensor data;
  int64_t width;
};

FeatureMajor feature_major(const Tensor& rows_in) {
  const Tensor rows = rows_in.contiguous();
  const int64_t batch = rows.size(0), features = rows.size(1);
  if (rows.scalar_type() != at::kFloat) return {rows.t().contiguous(), batch};
  const int64_t width = batch <= kBlockColumns ? batch : kBlockColumns;
  Tensor data = batch <= kBlockColumns
                    ? at::empty({features, batch}, rows.options())
                    : at::empty({ceil_div(batch, width), features, width}, rows.options());
  if (batch > 0) {
    to_feature_major(rows.data_ptr<float>(), batch, features, width, data.data_ptr<float>());
  }
  return {data, width};
}

// [batch, features] in `dtype` from a feature-major result of `features` features
Tensor batch_major(const Tensor& data, int64_t width, int64_t batch, int64_t features,
                   at::ScalarType dtype) {
  if (data.scalar_type() != at::kFloat || batch == 0) return as_result(data.t(), dtype);
  Tensor rows = at::empty({batch, features}, data.options());
  from_feature_major(data.data_ptr<float>(), batch, features, width, rows.data_ptr<float>());
  return as_result(rows, dtype);
}

Tensor fanin_linear_cpu(const Tensor& x, const Tensor& values, const Tensor& indices,
                        const OptionalTensor& bias) {
  constexpr const char* op = "sparsefx.fanin_linear";
  check_cpu(op, "x", x);
  const int64_t in_features = features(x);
  check_fanin(op, x, "x", &values, indices, in_features, bias);
  const auto dtype = compute_dtype(x.scalar_type());
  const FeatureMajor xt = feature_major(x.reshape({-1, in_features}).to(dtype));
  Tensor v = as_compute(values, dtype), ids = native_indices(indices);
  check_ids_in_range(ids, in_features);
  Tensor b = bias.has_value() ? as_compute(*bias, dtype) : Tensor();
  const int64_t out_features = values.size(0), batch = x.numel() / in_features;
  Tensor yt = xt.data.dim() == 3
                  ? at::empty({xt.data.size(0), out_features, xt.width}, v.options())
                  : at::empty({out_features, batch}, v.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_fanin_forward", [&] {
    SPARSEFX_DISPATCH_INDEX(ids, [&] {
      fanin_forward<scalar_t, index_t>(
          xt.data.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ids.data_ptr<index_t>(),
          b.defined() ? b.data_ptr<scalar_t>() : nullptr, yt.data_ptr<scalar_t>(), batch,
          out_features, v.size(1), in_features, xt.width);
    });
  });
  return batch_major(yt, xt.width, batch, out_features, x.scalar_type())
      .view(with_last(x, out_features));
}

// The structure by input column for `indices` (ids already range-checked): built once per
// structure version, then taken from the structure cache.
template <typename E, typename I>
std::shared_ptr<const FaninColumns<E>> columns_of(const Tensor& indices, const I* ids,
                                                  int64_t in_features) {
  auto& cache = structure_cache();
  const int64_t width = sizeof(E);
  if (auto found = cache.find(indices, kFaninTranspose, in_features, width))
    return std::static_pointer_cast<const FaninColumns<E>>(found);
  auto built = fanin_columns_of<E>(ids, indices.size(0), indices.size(1), in_features);
  cache.remember(indices, kFaninTranspose, in_features, width, built);
  return built;
}

Tensor fanin_linear_grad_input_cpu(const Tensor& grad_out, const Tensor& values,
                                   const Tensor& indices, int64_t in_features) {
  constexpr const char* op = "sparsefx.fanin_linear_grad_input";
  check_cpu(op, "grad_out", grad_out);
  check_fanin(op, grad_out, "grad_out", &values, indices, in_features);
  check_last_dim(op, "grad_out", grad_out, values.size(0), "out features, rows of values");
  const auto dtype = compute_dtype(grad_out.scalar_type());
  const int64_t out_features = values.size(0), batch = grad_out.numel() / out_features;
  const FeatureMajor grad_t = feature_major(grad_out.reshape({-1, out_features}).to(dtype));
  Tensor v = as_compute(values, dtype), ids = native_indices(indices);
  check_ids_in_range(ids, in_features);
  Tensor grad_xt;
  if (dtype == at::kFloat) {
    // a gather over each input's entries, like the forward's over each output's
    grad_xt = grad_t.data.dim() == 3
                  ? at::empty({grad_t.data.size(0), in_features, grad_t.width}, v.options())
                  : at::empty({in_features, batch}, v.options());
    const bool narrow = values.size(0) <= 65536 && values.size(1) <= 65536;
    SPARSEFX_DISPATCH_INDEX(ids, [&] {
      const index_t* id_data = ids.data_ptr<index_t>();
      if (narrow) {
        fanin_input_grad_by_columns(grad_t.data.data_ptr<float>(), v.data_ptr<float>(),
                                    *columns_of<uint16_t>(indices, id_data, in_features),
                                    grad_xt.data_ptr<float>(), batch, out_features, in_features,
                                    v.size(1), grad_t.width);
      } else {
        fanin_input_grad_by_columns(grad_t.data.data_ptr<float>(), v.data_ptr<float>(),
                                    *columns_of<int32_t>(indices, id_data, in_features),
                                    grad_xt.data_ptr<float>(), batch, out_features, in_features,
                                    v.size(1), grad_t.width);
      }
    });
  } else {
    grad_xt = at::zeros({in_features, batch}, v.options());
    SPARSEFX_DISPATCH_INDEX(ids, [&] {
      fanin_input_grad<double, index_t>(grad_t.data.data_ptr<double>(), v.data_ptr<double>(),
                                        ids.data_ptr<index_t>(), grad_xt.data_ptr<double>(),
                                        batch, v.size(0), v.size(1), in_features);
    });
  }
  return batch_major(grad_xt, grad_t.width, batch, in_features, grad_out.scalar_type())
      .view(with_last(grad_out, in_features));
}

Tensor fanin_linear_grad_values_cpu(const Tensor& grad_out, const Tensor& x,
                                    const Tensor& indices) {
  constexpr const char* op = "sparsefx.fanin_linear_grad_values";
  check_cpu(op, "x", x);
  check_fanin(op, x, "x", nullptr, indices, features(x));
  check_fanin(op, grad_out, "grad_out", nullptr, indices, features(x), std::nullopt,
              /*structure=*/false);
  check_float_operands(op, {{"x", &x}, {"grad_out", &grad_out}});
  check_last_dim(op, "grad_out", grad_out, indices.size(0), "out features, rows of indices");
  check_rows_match(op, grad_out, x);
  const auto dtype = compute_dtype(x.scalar_type());
  const int64_t in_features = x.size(-1), batch = x.numel() / in_features;
  const FeatureMajor grad_t =
      feature_major(grad_out.reshape({-1, grad_out.size(-1)}).to(dtype));
  const FeatureMajor xt = feature_major(x.reshape({-1, in_features}).to(dtype));
  Tensor ids = native_indices(indices);
  check_ids_in_range(ids, in_features);
  Tensor grad = at::empty({ids.size(0), ids.size(1)}, xt.data.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparsefx_fanin_values_grad", [&] {
    SPARSEFX_DISPATCH_INDEX(ids, [&] {
      fanin_values_grad<scalar_t, index_t>(
          grad_t.data.data_ptr<scalar_t>(), xt.data.data_ptr<scalar_t>(),
          ids.data_ptr<index_t>(), grad.data_ptr<scalar_t>(), batch, ids.size(0), ids.size(1),
          in_features, xt.width);
    });
  });
  return as_result(grad, x.scalar_type());
}

// --------------------------------------------------------------------------- autograd

using DiagLinearSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                                   const OptionalTensor&);
using GradInputSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt);
using DiagGradValuesSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&);
using FaninLinearSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                    const OptionalTensor&);
using FaninGradValuesSignature = Tensor(const Tensor&, const Tensor&, const Tensor&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The handles are looked up once, on first use (the schemas are defined from Python, after
// this library is loaded).
const c10::TypedOperatorHandle<DiagLinearSignature>& diag_linear_op() {
  static auto handle = op_handle<DiagLinearSignature>("sparsefx::diag_linear");
  return handle;
}
const c10::TypedOperatorHandle<GradInputSignature>& diag_grad_input_op() {
  static auto handle = op_handle<GradInputSignature>("sparsefx::diag_linear_grad_input");
  return handle;
}
const c10::TypedOperatorHandle<DiagGradValuesSignature>& diag_grad_values_op() {
  static auto handle = op_handle<DiagGradValuesSignature>("sparsefx::diag_linear_grad_values");
  return handle;
}
const c10::TypedOperatorHandle<FaninLinearSignature>& fanin_linear_op() {
  static auto handle = op_handle<FaninLinearSignature>("sparsefx::fanin_linear");
  return handle;
}
const c10::TypedOperatorHandle<GradInputSignature>& fanin_grad_input_op() {
  static auto handle = op_handle<GradInputSignature>("sparsefx::fanin_linear_grad_input");
  return handle;
}
const c10::TypedOperatorHandle<FaninGradValuesSignature>& fanin_grad_values_op() {
  static auto handle = op_handle<FaninGradValuesSignature>("sparsefx::fanin_linear_grad_values");
  return handle;
}

// sum of grad_out over its leading dims, accumulated in fp32 (fp64 for fp64)
Tensor bias_grad(const Tensor& grad_out) {
  std::vector<c10::SymInt> rows_by_out{-1, grad_out.sym_size(-1)};
  return grad_out.reshape_symint(rows_by_out)
      .sum(0, /*keepdim=*/false, compute_dtype(grad_out.scalar_type()))
      .to(grad_out.scalar_type());
}

bool has_bias(const OptionalTensor& bias) { return bias.has_value() && bias->defined(); }

// Autograd edges exist for tensor inputs only: x 0, values 1, structure 2, bias 3 (if given).
constexpr size_t kX = 0, kValues = 1, kBias = 3;

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

class FaninLinearFunction : public torch::autograd::Function<FaninLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& indices, const OptionalTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, values, indices});
    ctx->saved_data["has_bias"] = has_bias(bias);
    return fanin_linear_op().call(x, values, indices, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &indices = saved[2];
    const Tensor& grad_out = grads[0];
    Tensor grad_x, grad_values, grad_bias;
    if (ctx->needs_input_grad(kX))
      grad_x = fanin_grad_input_op().call(grad_out, values, indices, x.sym_size(-1));
    if (ctx->needs_input_grad(kValues))
      grad_values = fanin_grad_values_op().call(grad_out, x, indices);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(kBias))
      grad_bias = bias_grad(grad_out);
    return {grad_x, grad_values, Tensor(), grad_bias};
  }
};

Tensor diag_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& offsets,
                            c10::SymInt out_features, const OptionalTensor& bias) {
  return DiagLinearFunction::apply(x, values, offsets, std::move(out_features), bias);
}

Tensor fanin_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& indices,
                             const OptionalTensor& bias) {
  return FaninLinearFunction::apply(x, values, indices, bias);
}

}  // namespace
}  // namespace sparsefx

TORCH_LIBRARY_IMPL(sparsefx, CPU, m) {
  m.impl("diag_linear", &sparsefx::diag_linear_cpu);
  m.impl("diag_linear_grad_input", &sparsefx::diag_linear_grad_input_cpu);
  m.impl("diag_linear_grad_values", &sparsefx::diag_linear_grad_values_cpu);
  m.impl("fanin_linear", &sparsefx::fanin_linear_cpu);
  m.impl("fanin_linear_grad_input", &sparsefx::fanin_linear_grad_input_cpu);
  m.impl("fanin_linear_grad_values", &sparsefx::fanin_linear_grad_values_cpu);
}

TORCH_LIBRARY_IMPL(sparsefx, Autograd, m) {
  m.impl("diag_linear", &sparsefx::diag_linear_autograd);
  m.impl("fanin_linear", &sparsefx::fanin_linear_autograd);
}
