// Argument checks of the sparse linear ops, with the messages of kernels/_checks.py.
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


// ---------------------------------------------------------------------------- value checks

// Distinct offsets in [0, P): the messages of patterns.check_diag_offsets.
inline void check_diag_offsets(const char* op, const at::Tensor& offsets, int64_t num_candidates) {
  auto flat = offsets.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  const int64_t count = flat.numel();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(data[i] >= 0 && data[i] < num_candidates, op, ": offsets holds ", data[i],
                      " (at position ", i, "): expected offsets in [0, P) with P = "
                      "max(out_features, in_features) = ", num_candidates);
  }
  std::vector<int64_t> ordered(data, data + count);
  std::sort(ordered.begin(), ordered.end());
  for (int64_t i = 1; i < count; ++i) {
    TORCH_CHECK_VALUE(ordered[i] != ordered[i - 1], op, ": offsets repeats offset ", ordered[i],
                      ": expected distinct diagonals");
  }
}

// Distinct ids in [0, in) within every row: the messages of patterns.check_fanin_indices.
// `x` is the input whose width is in_features, when that is where in_features came from.
inline void check_fanin_indices(const char* op, const at::Tensor& indices, int64_t in_features,
                                const at::Tensor* x) {
  auto flat = indices.to(at::kLong).contiguous();
  const int64_t rows = flat.size(0), fan_in = flat.size(1);
  const int64_t* data = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows * fan_in; ++i) {
    if (data[i] >= 0 && data[i] < in_features) continue;
    TORCH_CHECK_VALUE(false, op, ": indices[", i / fan_in, ", ", i % fan_in, "] = ", data[i],
                      ": expected column ids in [0, in_features) = [0, ", in_features, ")",
                      x ? ", in_features being the last dimension of x " : "",
                      x ? shape_str(x->sizes()) : "");
  }
  // a bitmap per row: O(k) per row, no sort unless a row repeats an id
  std::vector<uint8_t> seen(static_cast<size_t>(in_features), 0);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t* ids = data + row * fan_in;
    bool repeats = false;
    for (int64_t j = 0; j < fan_in; ++j) {
      repeats |= seen[ids[j]] != 0;
      seen[ids[j]] = 1;
    }
    for (int64_t j = 0; j < fan_in; ++j) seen[ids[j]] = 0;
    if (repeats) {
      std::vector<int64_t> ordered(ids, ids + fan_in);
      std::sort(ordered.begin(), ordered.end());
      for (int64_t j = 1; j < fan_in; ++j) {
        TORCH_CHECK_VALUE(ordered[j] != ordered[j - 1], op, ": indices row ", row,
                          " repeats column ", ordered[j],
                          ": expected distinct column ids within a row");
      }
    }
  }
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

// Checks shared by the diagonal op and its gradient ops. `x` is the op's activation operand
// (the input or the output gradient). Where the input's width decides in_features and the
// values could belong to a layer of some other width, the input is named, not the values.
inline void check_diag(const char* op, const at::Tensor& x, const char* x_name,
                       const at::Tensor& values, const at::Tensor& offsets, int64_t out_features,
                       int64_t in_features, const std::optional<at::Tensor>& bias = std::nullopt,
                       bool structure = true) {
  check_float_operands(op, {{"values", &values}, {x_name, &x},
                            {"bias", bias.has_value() ? &*bias : nullptr}});
  check_activations(op, x_name, x);
  check_structure_tensor(op, "offsets", offsets, values.device(), 1);
  TORCH_CHECK_VALUE(out_features >= 1, op, ": out_features=", out_features,
                    ": expected an int >= 1");
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features = ", in_features, ": expected >= 1");
  const int64_t num_candidates = std::max(out_features, in_features);
  const int64_t length = std::min(out_features, in_features);
  if (values.dim() == 2 && values.size(1) != length && values.size(1) <= out_features &&
      values.size(1) >= 1 && std::string(x_name) == "x") {
    const int64_t stored = values.size(1);
    if (stored < out_features) {
      TORCH_CHECK_VALUE(false, op, ": x has shape ", shape_str(x.sizes()),
                        ": expected last dimension ", stored, " (in_features: values ",
                        shape_str(values.sizes()), " hold diagonals of length L = "
                        "min(out_features, in_features) = ", stored, " < out_features = ",
                        out_features, ")");
    }
    TORCH_CHECK_VALUE(false, op, ": x has shape ", shape_str(x.sizes()),
                      ": expected last dimension >= ", out_features, " (in_features: values ",
                      shape_str(values.sizes()), " hold diagonals of length L = "
                      "min(out_features, in_features) = out_features = ", out_features, ")");
  }
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(1) == length, op, ": values has shape ",
                    shape_str(values.sizes()), ": expected [K, L] with L = min(out_features, "
                    "in_features) = min(", out_features, ", ", in_features, ") = ", length);
  const int64_t num_kept = values.size(0);
  TORCH_CHECK_VALUE(offsets.size(0) == num_kept, op, ": offsets has ", offsets.size(0),
                    " entries: expected K = ", num_kept, ", one per row of values");
  TORCH_CHECK_VALUE(num_kept >= 1 && num_kept <= num_candidates, op, ": values holds K = ",
                    num_kept, " diagonals: expected 1 <= K <= P = max(out_features, "
                    "in_features) = ", num_candidates);
  check_bias(op, bias, out_features);
  if (structure) {
    auto& cache = structure_cache();
    if (!cache.verified(offsets, kDiagOffsets, num_candidates, 0)) {
      check_diag_offsets(op, offsets, num_candidates);
      cache.remember_verified(offsets, kDiagOffsets, num_candidates, 0);
    }
  }
}

// Checks shared by the fan-in op and its gradient ops (the values-gradient op has no values
// operand: pass nullptr and `indices` carries the shape).
inline void check_fanin(const char* op, const at::Tensor& x, const char* x_name,
                        const at::Tensor* values, const at::Tensor& indices, int64_t in_features,
                        const std::optional<at::Tensor>& bias = std::nullopt,
                        bool structure = true) {
  check_float_operands(op, {{"values", values}, {x_name, &x},
                            {"bias", bias.has_value() ? &*bias : nullptr}});
  check_activations(op, x_name, x);
  check_structure_tensor(op, "indices", indices, values ? values->device() : x.device(), 2);
  if (values != nullptr) {
    TORCH_CHECK_VALUE(values->dim() == 2, op, ": values has shape ", shape_str(values->sizes()),
                      ": expected [out, k]");
    TORCH_CHECK_VALUE(indices.sizes() == values->sizes(), op, ": indices has shape ",
                      shape_str(indices.sizes()), ": expected ", shape_str(values->sizes()),
                      ", the shape of values");
  }
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features = ", in_features, ": expected >= 1");
  const int64_t num_out = indices.size(0), fan_in = indices.size(1);
  TORCH_CHECK_VALUE(num_out >= 1, op, ": indices has shape ", shape_str(indices.sizes()),
                    ": expected at least one output row");
  TORCH_CHECK_VALUE(fan_in >= 1 && fan_in <= in_features, op, ": each row holds k = ", fan_in,
                    " entries: expected 1 <= k <= in_features = ", in_features);
  check_bias(op, bias, num_out);
  if (structure) {
    auto& cache = structure_cache();
    if (!cache.verified(indices, kFaninIndices, in_features, 0)) {
      check_fanin_indices(op, indices, in_features,
                          std::string(x_name) == "x" ? &x : nullptr);
      cache.remember_verified(indices, kFaninIndices, in_features, 0);
    }
  }
}

}  // namespace sparsefx
