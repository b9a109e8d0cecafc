// CPU kernels of the diagonal ops (float32 / float64).
//
// A kept diagonal is read as at most two unit-stride runs (the wrap-around splits it), so
// every inner loop is a contiguous multiply-add over [rows x positions] tiles that stay in
// L1; traffic is the K*L values plus the activations, never a dense W.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"

namespace sparsefx {

constexpr int64_t kTilePositions = 256;  // a [kTileRows, kTilePositions] float tile is 8 KiB: L1
constexpr int64_t kTileRows = 8;

// Output positions [begin, end) that read source position p + shift.
struct Run {
  int64_t begin, end, shift;
};

// The runs of output positions in [p0, p1) for the diagonal at `offset`.
//   gather : output p in [0, L)   reads source (p + offset) % mod            (values index p)
//   scatter: output p in [0, mod) reads source (p - offset) mod mod, if < L  (values index source)
inline int diagonal_runs(bool gather, int64_t offset, int64_t mod, int64_t length, int64_t p0,
                         int64_t p1, Run* runs) {
  int count = 0;
  auto add = [&](int64_t begin, int64_t end, int64_t shift) {
    if (begin < end) runs[count++] = {begin, end, shift};
  };
  if (gather) {
    add(p0, std::min(p1, mod - offset), offset);
    add(std::max(p0, mod - offset), p1, offset - mod);
  } else {
    add(std::max(p0, offset), std::min({p1, offset + length, mod}), -offset);
    add(p0, std::min({p1, offset, offset + length - mod}), mod - offset);
  }
  return count;
}

// y[rows, out_len] += sum_k diagonal k applied to x[rows, in_len] (see diagonal_runs); y
// holds the bias (or zeros) on entry. Offsets must lie in [0, mod).
template <typename T>
void diag_apply(const T* x, const T* values, const int64_t* offsets, T* y, int64_t rows,
                int64_t num_diagonals, int64_t length, int64_t mod, bool gather) {
  const int64_t in_len = gather ? mod : length;
  const int64_t out_len = gather ? length : mod;
  const int64_t position_tiles = ceil_div(out_len, kTilePositions);
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const int64_t grain = grain_for(num_diagonals * kTilePositions * std::min(rows, kTileRows));
  at::parallel_for(0, position_tiles * row_tiles, grain, [&](int64_t first, int64_t last) {
    Run runs[2];
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t p0 = (tile % position_tiles) * kTilePositions;
      const int64_t p1 = std::min(out_len, p0 + kTilePositions);
      const int64_t r0 = (tile / position_tiles) * kTileRows;
      const int64_t r1 = std::min(rows, r0 + kTileRows);
      for (int64_t k = 0; k < num_diagonals; ++k) {
        const int count = diagonal_runs(gather, offsets[k], mod, length, p0, p1, runs);
        for (int r = 0; r < count; ++r) {
          const int64_t begin = runs[r].begin, end = runs[r].end, shift = runs[r].shift;
          const T* v = values + k * length + (gather ? 0 : shift);
          for (int64_t row = r0; row < r1; ++row) {
            T* yr = y + row * out_len;
            const T* xr = x + row * in_len + shift;
#pragma omp simd
            for (int64_t p = begin; p < end; ++p) yr[p] += v[p] * xr[p];
          }
        }
      }
    }
  });
}

// grad[k, t] = sum_rows a[row, t] * b[row, (t + offsets[k]) % mod];  a: [rows, L], b: [rows, mod]
template <typename T>
void diag_values_grad(const T* a, const T* b, const int64_t* offsets, T* grad, int64_t rows,
                      int64_t num_diagonals, int64_t length, int64_t mod) {
  const int64_t position_tiles = ceil_div(length, kTilePositions);
  // diagonal index varies fastest, so consecutive tasks reuse the same columns of `a`
  const int64_t grain = grain_for(kTilePositions * rows);
  at::parallel_for(0, position_tiles * num_diagonals, grain, [&](int64_t first, int64_t last) {
    Run runs[2];
    for (int64_t task = first; task < last; ++task) {
      const int64_t k = task % num_diagonals;
      const int64_t t0 = (task / num_diagonals) * kTilePositions;
      const int64_t t1 = std::min(length, t0 + kTilePositions);
      T* g = grad + k * length;
      std::fill(g + t0, g + t1, T(0));
      const int count = diagonal_runs(true, offsets[k], mod, length, t0, t1, runs);
      for (int64_t row = 0; row < rows; ++row) {
        const T* ar = a + row * length;
        for (int r = 0; r < count; ++r) {
          const T* br = b + row * mod + runs[r].shift;
#pragma omp simd
          for (int64_t t = runs[r].begin; t < runs[r].end; ++t) g[t] += ar[t] * br[t];
        }
      }
    }
  });
}

}  // namespace sparsefx
