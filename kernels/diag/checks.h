// Argument checks of the diagonal ops, with the messages of checks.py (see ../csrc/checks.h).
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
inline constexpr RecordKind kDiagOffsets{"diag.offsets"};  // the offsets passed the check

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

}  // namespace sparsefx
