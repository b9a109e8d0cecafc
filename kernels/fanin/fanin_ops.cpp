// The fan-in ops on the CPU and their autograd, in C++ (see ../csrc/common.h): a call
// from eager Python or compiled code reaches the kernel through the dispatcher with no
// Python on the way.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../csrc/checks.h"
#include "../csrc/common.h"
#include "checks.h"
#include "kernels.h"

namespace sparsefx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;


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

// ------------------------------------------------------------------------ fanin: CPU

// Activations for the fan-in kernels: feature-major (see kernels.h). `rows` [batch,
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

using FaninLinearSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                    const OptionalTensor&);
using GradInputSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt);
using FaninGradValuesSignature = Tensor(const Tensor&, const Tensor&, const Tensor&);

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

Tensor fanin_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& indices,
                             const OptionalTensor& bias) {
  return FaninLinearFunction::apply(x, values, indices, bias);
}

}  // namespace
}  // namespace sparsefx

TORCH_LIBRARY_IMPL(sparsefx, CPU, m) {
  m.impl("fanin_linear", &sparsefx::fanin_linear_cpu);
  m.impl("fanin_linear_grad_input", &sparsefx::fanin_linear_grad_input_cpu);
  m.impl("fanin_linear_grad_values", &sparsefx::fanin_linear_grad_values_cpu);
}

TORCH_LIBRARY_IMPL(sparsefx, Autograd, m) {
  m.impl("fanin_linear", &sparsefx::fanin_linear_autograd);
}
