// What every pattern's C++ ops share: dtypes, result layout, the bias gradient, and the
// dispatcher handles their autograd functions call the gradient ops through.
//
// The schemas are defined in Python (each pattern's kernels/<pattern>/op.py); each pattern's
// <pattern>_ops.cpp registers, for its ops:
//   CPU      -- argument checks (checks.h and the pattern's own; structure value checks once
//               per structure version), fp16/bf16 upcast to fp32, leading dims, bias, the
//               kernels;
//   Autograd -- one C++ autograd function per public op, serving every device: its backward
//               calls the gradient *ops* through the dispatcher, so torch.compile traces them
//               and CUDA tensors reach the Triton kernels registered from Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <vector>

namespace sparsefx {

using at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

// fp16 / bf16 compute in fp32; fp64 stays fp64 (for gradcheck)
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` as a contiguous tensor of `dtype`; no copy when it already is one
inline Tensor as_compute(const Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// `t` cast to `dtype` in contiguous layout (one pass at most)
inline Tensor as_result(const Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t.contiguous();
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// the shape of `t` with its last dimension replaced by `last`
inline std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  auto sizes = t.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// The typed handle of the op `name`, looked up when first called for (the schemas are
// defined from Python, after this library is loaded).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// sum of grad_out over its leading dims, accumulated in fp32 (fp64 for fp64)
inline Tensor bias_grad(const Tensor& grad_out) {
  std::vector<c10::SymInt> rows_by_out{-1, grad_out.sym_size(-1)};
  return grad_out.reshape_symint(rows_by_out)
      .sum(0, /*keepdim=*/false, compute_dtype(grad_out.scalar_type()))
      .to(grad_out.scalar_type());
}

inline bool has_bias(const OptionalTensor& bias) { return bias.has_value() && bias->defined(); }

// Autograd edges exist for tensor inputs only: x 0, values 1, structure 2, bias 3 (if given).
constexpr size_t kX = 0, kValues = 1, kBias = 3;

}  // namespace sparsefx
