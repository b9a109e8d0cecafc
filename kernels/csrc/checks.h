// Argument checks every pattern's ops share, with the messages of kernels/_checks.py (each
// pattern's own checks: its checks.h, with the messages of its checks.py).
//
// The two must say the same thing: the C++ checks guard real CPU calls, the Python ones the
// fake (tracing) and CUDA paths, and tests/test_errors.py holds both to the same messages.
// Shape, dtype and device checks run on every call; the value checks on a structure tensor
// (range, distinctness) read its data, so they run once per structure version (see
// structure_cache.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "structure_cache.h"

namespace sparsefx {

// ------------------------------------------------------------------------------ formatting

// A shape as Python prints a tuple: (3, 6), (5,), ().
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A dtype as Python prints it: torch.float32, torch.int64, ...
inline std::string dtype_str(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {
      std::string name = c10::toString(dtype);
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      return "torch." + name;
    }
  }
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
         dtype == at::kDouble;
}

inline bool is_integer_dtype(at::ScalarType dtype) {
  return !at::isFloatingType(dtype) && !at::isComplexType(dtype) && dtype != at::kBool;
}

// ------------------------------------------------------------------------ operand checks

struct Operand {
  const char* name;
  const at::Tensor* tensor;  // nullptr: absent (an optional operand left out)
};

// Every operand one floating dtype on one device (the first operand's).
inline void check_float_operands(const char* op, std::initializer_list<Operand> operands) {
  const Operand* first = nullptr;
  for (const Operand& operand : operands) {
    if (operand.tensor == nullptr) continue;
    const at::Tensor& tensor = *operand.tensor;
    if (first == nullptr) {
      first = &operand;
      TORCH_CHECK_TYPE(is_float_dtype(tensor.scalar_type()), op, ": ", operand.name, ".dtype is ",
                       dtype_str(tensor.scalar_type()),
                       ": expected one of float16, bfloat16, float32, float64");
      continue;
    }
    const at::Tensor& reference = *first->tensor;
    TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), op, ": ", operand.name,
                     ".dtype is ", dtype_str(tensor.scalar_type()), ": expected ",
                     dtype_str(reference.scalar_type()), ", the dtype of ", first->name);
    TORCH_CHECK_VALUE(tensor.device() == reference.device(), op, ": ", operand.name, " is on ",
                      tensor.device().str(), ": expected ", reference.device().str(),
                      ", the device of ", first->name);
  }
}

inline void check_structure_tensor(const char* op, const char* name, const at::Tensor& structure,
                                   const at::Device& device, int64_t ndim) {
  TORCH_CHECK_TYPE(is_integer_dtype(structure.scalar_type()), op, ": ", name, ".dtype is ",
                   dtype_str(structure.scalar_type()),
                   ": expected an integer dtype (int32 or int64; int16/int8/uint8 also accepted)");
  TORCH_CHECK_VALUE(structure.device() == device, op, ": ", name, " is on ",
                    structure.device().str(), ": expected ", device.str(),
                    ", the device of the values");
  TORCH_CHECK_VALUE(structure.dim() == ndim, op, ": ", name, " has shape ",
                    shape_str(structure.sizes()), ": expected ", ndim, " dimension",
                    ndim > 1 ? "s" : "");
}

inline void check_activations(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name,
                    " is a 0-d tensor: expected shape [..., features]");
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias,
                       int64_t out_features) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias has shape ",
                    shape_str(bias->sizes()), ": expected (", out_features, ",)");
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), op, ": ", name, " is on ",
                    x.device().str(), ": expected cpu or cuda");
}

inline void check_last_dim(const char* op, const char* name, const at::Tensor& tensor,
                           int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(tensor.size(-1) == expected, op, ": ", name, " has shape ",
                    shape_str(tensor.sizes()), ": expected last dimension ", expected, " (", what,
                    ")");
}

inline void check_rows_match(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  auto leading = [](const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 1); };
  TORCH_CHECK_VALUE(leading(grad_out) == leading(x), op, ": grad_out has leading dims ",
                    shape_str(leading(grad_out)), ": expected ", shape_str(leading(x)),
                    ", the leading dims of x");
}

inline int64_t features(const at::Tensor& x) { return x.dim() ? x.size(-1) : 0; }

}  // namespace sparsefx
