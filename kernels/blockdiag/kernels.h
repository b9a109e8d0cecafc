// CPU kernels of the blocked-diagonal ops: batched dense GEMMs.
//
// Rows and columns grouped by residue mod g, W is a g x g grid of (out/g) x (in/g) blocks of
// which c per block-row are dense (patterns.blockdiag_block_shifts). Block-row R reads the c
// column residues T(R, s), one per kept coset s, so
//     y[:, R + g i] = A_R @ W_R          A_R [rows, c * in/g]   W_R [c * in/g, out/g]
// where A_R holds, coset after coset, the columns T(R, s), T(R, s) + g, ... of x, and W_R the
// c blocks of block-row R stacked (transposed). All g products are one at::bmm. The values
// stay in the diagonal layout of the diag ops (values[K, L] on offsets[K]); a BlockLayout,
// built once per structure version, says where each value sits in the stacked blocks. The
// backward is two more bmm's: grad A_R = grad Y_R @ W_R.T (added back into the input
// columns) and grad W_R = A_R.T @ grad Y_R (read back at the values' positions).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../csrc/parallel.h"

namespace sparsefx {

struct BlockLayout {
  int64_t groups, cosets, out_block, in_block;  // g, c, out / g, in / g
  // position of values[k, t] (flat k * L + t) in the stacked blocks [g, c * in/g, out/g]
  std::vector<int64_t> weight_position;
  // T(R, s) at R * c + s: the column residue that block-row R reads for kept coset s
  std::vector<int64_t> column_residue;

  int64_t stacked() const { return cosets * in_block; }  // c * in / g
};

// `offsets` (int64, valid, whole cosets of g) laid out as blocks.
inline BlockLayout block_layout(const int64_t* offsets, int64_t num_kept, int64_t out_features,
                                int64_t in_features, int64_t groups) {
  const int64_t length = std::min(out_features, in_features);
  const bool tall = out_features >= in_features;
  BlockLayout layout;
  layout.groups = groups;
  layout.out_block = out_features / groups;
  layout.in_block = in_features / groups;
  std::vector<int64_t> slot(static_cast<size_t>(groups), -1);
  std::vector<int64_t> kept;
  for (int64_t k = 0; k < num_kept; ++k) {
    const int64_t residue = offsets[k] % groups;
    if (slot[residue] < 0) {
      slot[residue] = 0;
      kept.push_back(residue);
    }
  }
  std::sort(kept.begin(), kept.end());
  for (size_t s = 0; s < kept.size(); ++s) slot[kept[s]] = static_cast<int64_t>(s);
  layout.cosets = static_cast<int64_t>(kept.size());
  // diagonal d joins row (t + d) % out to column t (tall), row t to column (t + d) % in (wide)
  layout.column_residue.resize(groups * layout.cosets);
  for (int64_t row_residue = 0; row_residue < groups; ++row_residue) {
    for (int64_t s = 0; s < layout.cosets; ++s) {
      const int64_t shift = tall ? groups - kept[s] : kept[s];
      layout.column_residue[row_residue * layout.cosets + s] = (row_residue + shift) % groups;
    }
  }
  layout.weight_position.resize(num_kept * length);
  const int64_t stacked = layout.stacked();
  for (int64_t k = 0; k < num_kept; ++k) {
    const int64_t s = slot[offsets[k] % groups];
    for (int64_t t = 0; t < length; ++t) {
      const int64_t row = tall ? (t + offsets[k]) % out_features : t;
      const int64_t col = tall ? t : (t + offsets[k]) % in_features;
      layout.weight_position[k * length + t] =
          ((row % groups) * stacked + s * layout.in_block + col / groups) * layout.out_block +
          row / groups;
    }
  }
  return layout;
}

// stacked[weight_position[f]] = values[f]  (values -> blocks)   when to_blocks
// values[f] = stacked[weight_position[f]]  (blocks -> values)   otherwise
template <typename T>
void move_values(const BlockLayout& layout, T* values, T* stacked, bool to_blocks) {
  const int64_t count = static_cast<int64_t>(layout.weight_position.size());
  const int64_t* position = layout.weight_position.data();
  at::parallel_for(0, count, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      if (to_blocks) {
        stacked[position[f]] = values[f];
      } else {
        values[f] = stacked[position[f]];
      }
    }
  });
}

// a[R, b, s * in/g + j] = x[b, T(R, s) + g j]: the columns each block-row reads
template <typename T>
void gather_columns(const BlockLayout& layout, const T* x, int64_t rows, T* a) {
  const int64_t g = layout.groups, c = layout.cosets, ib = layout.in_block;
  const int64_t in_features = g * ib, stacked = layout.stacked();
  at::parallel_for(0, g * rows, grain_for(stacked), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_residue = task / rows, b = task % rows;
      const T* source = x + b * in_features;
      T* target = a + task * stacked;
      for (int64_t s = 0; s < c; ++s) {
        const T* column = source + layout.column_residue[row_residue * c + s];
        for (int64_t j = 0; j < ib; ++j) target[s * ib + j] = column[j * g];
      }
    }
  });
}

// x[b, T(R, s) + g j] = sum over (R, s) reading it of a[R, b, s * in/g + j]
template <typename T>
void scatter_columns(const BlockLayout& layout, const T* a, int64_t rows, T* x) {
  const int64_t g = layout.groups, c = layout.cosets, ib = layout.in_block;
  const int64_t in_features = g * ib, stacked = layout.stacked();
  at::parallel_for(0, rows, grain_for(g * stacked), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* target = x + b * in_features;
      std::fill(target, target + in_features, T(0));
      for (int64_t row_residue = 0; row_residue < g; ++row_residue) {
        const T* source = a + (row_residue * rows + b) * stacked;
        for (int64_t s = 0; s < c; ++s) {
          T* column = target + layout.column_residue[row_residue * c + s];
          for (int64_t j = 0; j < ib; ++j) column[j * g] += source[s * ib + j];
        }
      }
    }
  });
}

// y[b, R + g i] = out[R, b, i] (+ bias)   when to_rows
// out[R, b, i] = y[b, R + g i]            otherwise
template <typename T>
void move_rows(const BlockLayout& layout, T* y, T* out, int64_t rows, const T* bias,
               bool to_rows) {
  const int64_t g = layout.groups, ob = layout.out_block, out_features = g * ob;
  at::parallel_for(0, rows, grain_for(out_features), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* row = y + b * out_features;
      for (int64_t row_residue = 0; row_residue < g; ++row_residue) {
        T* block = out + (row_residue * rows + b) * ob;
        for (int64_t i = 0; i < ob; ++i) {
          const int64_t o = row_residue + g * i;
          if (to_rows) {
            row[o] = block[i] + (bias ? bias[o] : T(0));
          } else {
            block[i] = row[o];
          }
        }
      }
    }
  });
}

}  // namespace sparsefx
