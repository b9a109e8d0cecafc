// What the diagonal ops share with the blocked-diagonal ones: the dispatcher handles (the
// autograd calls the gradient ops through them; the blocked-diagonal ops hand the calls they
// do not block to them) and the guard on the offsets the kernels index activations with.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "../csrc/common.h"

namespace sparsefx {

using DiagLinearSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                                   const OptionalTensor&);
using DiagGradInputSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                      c10::SymInt);
using DiagGradValuesSignature = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&);

// int64 offsets, each verified to lie in [0, mod): the kernels index activations with them,
// and a structure edited behind the version counter (through .data) must not make them read
// outside their inputs. O(K) per call.
inline Tensor offsets_in_range(const Tensor& offsets, int64_t mod) {
  Tensor flat = offsets.to(at::kLong).contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  for (int64_t k = 0; k < flat.numel(); ++k) {
    TORCH_CHECK_INDEX(data[k] >= 0 && data[k] < mod, "sparsefx diagonal kernels: offset ",
                      data[k], " lies outside [0, ", mod, ")");
  }
  return flat;
}

inline const c10::TypedOperatorHandle<DiagLinearSignature>& diag_linear_op() {
  static auto handle = op_handle<DiagLinearSignature>("sparsefx::diag_linear");
  return handle;
}
inline const c10::TypedOperatorHandle<DiagGradInputSignature>& diag_grad_input_op() {
  static auto handle = op_handle<DiagGradInputSignature>("sparsefx::diag_linear_grad_input");
  return handle;
}
inline const c10::TypedOperatorHandle<DiagGradValuesSignature>& diag_grad_values_op() {
  static auto handle = op_handle<DiagGradValuesSignature>("sparsefx::diag_linear_grad_values");
  return handle;
}

}  // namespace sparsefx
