// Argument checks of the blocked-diagonal ops, with the messages of checks.py: the diagonal
// ops' checks, then `groups` and whole cosets (see ../diag/checks.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "../csrc/checks.h"
#include "../diag/checks.h"

namespace sparsefx {

// the records this pattern keeps in the structure cache (csrc/structure_cache.h)
inline constexpr RecordKind kBlockdiagCosets{"blockdiag.cosets"};  // the cosets passed the check
inline constexpr RecordKind kBlockdiagBlocks{"blockdiag.blocks"};  // the blocked layout

// `groups` divides both dimensions: the messages of patterns.check_blockdiag_groups.
inline void check_blockdiag_groups(const char* op, int64_t out_features, int64_t in_features,
                                   int64_t groups) {
  TORCH_CHECK_VALUE(groups >= 1 && out_features % groups == 0 && in_features % groups == 0, op,
                    ": groups=", groups, ": expected a positive divisor of both out_features=",
                    out_features, " and in_features=", in_features);
}

// Every coset of g Z_P that `offsets` touches is held whole: the messages of
// patterns.check_blockdiag_offsets (offsets already checked as diagonal offsets).
inline void check_whole_cosets(const char* op, const at::Tensor& offsets, int64_t num_candidates,
                               int64_t groups) {
  auto flat = offsets.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  std::vector<int64_t> counts(static_cast<size_t>(groups), 0);
  for (int64_t k = 0; k < flat.numel(); ++k) ++counts[data[k] % groups];
  const int64_t per_coset = num_candidates / groups;
  for (int64_t residue = 0; residue < groups; ++residue) {
    TORCH_CHECK_VALUE(counts[residue] == 0 || counts[residue] == per_coset, op, ": offsets holds ",
                      counts[residue], " of the ", per_coset, " diagonals of coset ", residue,
                      " (mod g = ", groups, "): expected whole cosets");
  }
}

// Checks shared by the blocked-diagonal op and its gradient ops.
inline void check_blockdiag(const char* op, const at::Tensor& x, const char* x_name,
                            const at::Tensor& values, const at::Tensor& offsets,
                            int64_t out_features, int64_t in_features, int64_t groups,
                            const std::optional<at::Tensor>& bias = std::nullopt,
                            bool structure = true) {
  check_diag(op, x, x_name, values, offsets, out_features, in_features, bias, structure);
  check_blockdiag_groups(op, out_features, in_features, groups);
  if (structure) {
    auto& cache = structure_cache();
    const int64_t num_candidates = std::max(out_features, in_features);
    if (!cache.verified(offsets, kBlockdiagCosets, num_candidates, groups)) {
      check_whole_cosets(op, offsets, num_candidates, groups);
      cache.remember_verified(offsets, kBlockdiagCosets, num_candidates, groups);
    }
  }
}

}  // namespace sparsefx
