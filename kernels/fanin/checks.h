// Argument checks of the fan-in ops, with the messages of checks.py (see ../csrc/checks.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../csrc/checks.h"

namespace sparsefx {

// the records this pattern keeps in the structure cache (csrc/structure_cache.h)
inline constexpr RecordKind kFaninIndices{"fanin.indices"};      // the indices passed the check
inline constexpr RecordKind kFaninTranspose{"fanin.transpose"};  // the transposed structure

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
