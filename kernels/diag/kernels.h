// CPU kernels of the diagonal ops.
//
// Apply (forward, and the input gradient: the transpose of a diagonal matrix is diagonal):
// the output is cut into tiles of [R rows x V vectors of positions], held in registers while
// all K diagonals stream past; diagonal k adds values[k, run] * x[rows, run + shift] for the
// run of the tile it covers (masked loads where it wraps, starts or ends inside the tile).
// Traffic is the K*L values (once per row block) plus the activations, never a dense W.
// Values gradient: tiles of [V vectors of positions] x all K diagonals; a block of R rows of
// `a` sits in registers while each diagonal's column of `b` is multiplied into it.
// float32 takes these paths; float64 (gradcheck) takes the plain loops at the end.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../csrc/parallel.h"
#include "../csrc/simd.h"

namespace sparsefx {

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

// The geometry of one apply: y[rows, out_len] += diagonals of values[K, L] applied to
// x[rows, in_len] (gather: in_len = mod, out_len = L; scatter: in_len = L, out_len = mod).
struct DiagApply {
  const float* x;
  const float* values;
  const int64_t* offsets;
  const float* bias;  // [out_len] or null: y starts from it (or from zeros); y is write-only
  float* y;
  int64_t rows, num_diagonals, length, mod;
  bool gather;
  // The diagonals in ascending offset order (set by diag_apply): the i-th has offset
  // sorted_offsets[i] and values row order[i] (order null: row i). A scatter-form tile is
  // reached by the diagonals of one or two ranges of this order only.
  const int64_t* order = nullptr;
  const int64_t* sorted_offsets = nullptr;
  int64_t in_len() const { return gather ? mod : length; }
  int64_t out_len() const { return gather ? length : mod; }
};

// The ranges [begin, end) of the ascending order whose diagonals can reach output positions
// [p0, p0 + width): all of them in the gather form (every diagonal covers every output);
// in the scatter form (output p reads source p - offset, if < L) the offsets in
// (p0 - L, p0 + width) modulo mod, one range or two.
inline int reaching_ranges(const DiagApply& a, int64_t p0, int64_t width, int64_t* begin,
                           int64_t* end) {
  const int64_t count = a.num_diagonals;
  if (a.gather || a.length + width - 1 >= a.mod) {
    begin[0] = 0, end[0] = count;
    return 1;
  }
  const int64_t* sorted = a.sorted_offsets;
  int ranges = 0;
  auto add = [&](int64_t first, int64_t last) {  // offsets in [first, last]
    begin[ranges] = std::lower_bound(sorted, sorted + count, first) - sorted;
    end[ranges] = std::upper_bound(sorted, sorted + count, last) - sorted;
    ranges += begin[ranges] < end[ranges];
  };
  const int64_t lowest = p0 - a.length + 1, highest = p0 + width - 1;  // highest < mod
  if (lowest < 0) {
    add(lowest + a.mod, a.mod - 1);
    add(0, highest);
  } else {
    add(lowest, highest);
  }
  return ranges;
}

// Diagonal k's runs over positions [p0, p1), added element by element to rows [r0, r1).
inline void apply_runs_scalar(const DiagApply& a, int64_t k, int64_t r0, int64_t r1, int64_t p0,
                              int64_t p1) {
  Run runs[2];
  const int count = diagonal_runs(a.gather, a.offsets[k], a.mod, a.length, p0, p1, runs);
  for (int i = 0; i < count; ++i) {
    const int64_t begin = runs[i].begin, end = runs[i].end, shift = runs[i].shift;
    const float* v = a.values + k * a.length + (a.gather ? 0 : shift);
    for (int64_t row = r0; row < r1; ++row) {
      float* yr = a.y + row * a.out_len();
      const float* xr = a.x + row * a.in_len() + shift;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) yr[p] += v[p] * xr[p];
    }
  }
}

// One [R x V * kLanes] output tile at rows r0.., positions p0.., in registers while every
// diagonal passes. A diagonal that covers the whole tile with one run takes plain vector
// loads (the loop below, kept lean); one that wraps, starts or ends inside the tile is put on
// `partial` and applied after it with masked loads of each run's lanes.
template <int R, int V>
void apply_tile(const DiagApply& a, int64_t r0, int64_t p0, int64_t* partial) {
  constexpr int64_t kWidth = V * kLanes;
  const int64_t in_len = a.in_len(), out_len = a.out_len();
  vfloat acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[r][v] = a.bias ? load(a.bias + p0 + v * kLanes) : vfloat{};
  const float* x_rows = a.x + r0 * in_len;
  // nothing in the loops below calls a function that is not inlined: the accumulators would
  // have to leave the registers
  int64_t num_partial = 0;
  int64_t range_begin[2], range_end[2];
  const int ranges = reaching_ranges(a, p0, kWidth, range_begin, range_end);
  for (int range = 0; range < ranges; ++range)
  for (int64_t i = range_begin[range]; i < range_end[range]; ++i) {
    const int64_t k = a.order ? a.order[i] : i;
    const int64_t offset = a.sorted_offsets[i];
    int64_t shift;
    const float* w_start;
    if (a.gather) {  // the whole tile before the wrap point, or the whole tile after it
      if (p0 + kWidth <= a.mod - offset) {
        shift = offset;
      } else if (p0 >= a.mod - offset) {
        shift = offset - a.mod;
      } else {
        partial[num_partial++] = k;
        continue;
      }
      w_start = a.values + k * a.length + p0;
    } else {  // sources p - offset (mod mod) inside [0, L) for the whole tile
      int64_t source = p0 - offset;
      if (source < 0) source += a.mod;
      if (source + kWidth > a.length) {
        if (source < a.length || source + kWidth > a.mod) partial[num_partial++] = k;
        continue;  // (a tile the diagonal misses entirely needs nothing)
      }
      shift = source - p0;
      w_start = a.values + k * a.length + source;
    }
    vfloat w[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) w[v] = load(w_start + v * kLanes);
    const float* xk = x_rows + p0 + shift;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[r][v] += w[v] * load(xk + r * in_len + v * kLanes);
  }
  for (int64_t i = 0; i < num_partial; ++i) {
    const int64_t k = partial[i];
    Run runs[2];
    const int count = diagonal_runs(a.gather, a.offsets[k], a.mod, a.length, p0, p0 + kWidth,
                                    runs);
    for (int j = 0; j < count; ++j) {
      const int64_t shift = runs[j].shift;
      const int run_lo = static_cast<int>(runs[j].begin - p0);
      const int run_hi = static_cast<int>(runs[j].end - p0);
      const float* w_start = a.values + k * a.length + p0 + (a.gather ? 0 : shift);
      const float* xk = x_rows + p0 + shift;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const int lo = std::max(run_lo - v * kLanes, 0);
        const int hi = std::min(run_hi - v * kLanes, kLanes);
        if (lo >= hi) continue;
        const vfloat w = load_lanes(w_start + v * kLanes, lo, hi);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc[r][v] += w * load_lanes(xk + r * in_len + v * kLanes, lo, hi);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) store(a.y + (r0 + r) * out_len + p0 + v * kLanes, acc[r][v]);
}

// Rows [r0, r1) of tiles R rows high (then one tile of the rows left), positions [p0, p0 +
// V * kLanes).
template <int R, int V>
void apply_column(const DiagApply& a, int64_t r0, int64_t r1, int64_t p0, int64_t* partial) {
  int64_t row = r0;
  for (; row + R <= r1; row += R) apply_tile<R, V>(a, row, p0, partial);
  if constexpr (R > 1) {
    switch (r1 - row) {
      case 0: break;
      case 1: apply_tile<1, V>(a, row, p0, partial); break;
      case 2: apply_tile<2, V>(a, row, p0, partial); break;
      case 3: apply_tile<3, V>(a, row, p0, partial); break;
      case 4: apply_tile<4, V>(a, row, p0, partial); break;
      default: apply_column<R / 2 < 4 ? 4 : R / 2, V>(a, row, r1, p0, partial);
    }
  }
}

// The scatter form needs the diagonals in ascending offset order (reaching_ranges). With many
// rows both forms take them in that order, the values copied into it once per call, so that
// consecutive diagonals read neighbouring activations and the values stream row after row
// (DST leaves offsets in slot order and blockdiag coset by coset: up to 20 % slower at
// 768x3072, batch 256, measured); with few rows the gather form keeps the stored order and
// the scatter form reads the values through `order`.
constexpr int64_t kSortedValuesMinRows = 32;

// y = the bias (or zeros) + the diagonals applied to x. Offsets lie in [0, mod).
inline void diag_apply(DiagApply a) {
  std::vector<int64_t> order, sorted;
  at::Tensor sorted_values;  // (a tensor: aligned like the values, for the vector loads)
  a.sorted_offsets = a.offsets;
  const bool many_rows = a.rows >= kSortedValuesMinRows;
  if ((!a.gather || many_rows) && !std::is_sorted(a.offsets, a.offsets + a.num_diagonals)) {
    order.resize(a.num_diagonals);
    for (int64_t k = 0; k < a.num_diagonals; ++k) order[k] = k;
    std::sort(order.begin(), order.end(),
              [&](int64_t i, int64_t j) { return a.offsets[i] < a.offsets[j]; });
    sorted.resize(a.num_diagonals);
    for (int64_t i = 0; i < a.num_diagonals; ++i) sorted[i] = a.offsets[order[i]];
    a.sorted_offsets = sorted.data();
    if (many_rows) {
      sorted_values = at::empty({a.num_diagonals, a.length}, at::kFloat);
      float* into = sorted_values.data_ptr<float>();
      at::parallel_for(0, a.num_diagonals, grain_for(a.length), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          std::copy_n(a.values + order[i] * a.length, a.length, into + i * a.length);
      });
      a.values = into;
      a.offsets = sorted.data();
    } else {
      a.order = order.data();
    }
  }
  // one row: wide tiles stream the values with four independent accumulators; more rows:
  // R rows share each load of the values
  constexpr int kRows = kVectorRegisters == 32 ? 6 : 3;
  constexpr int kVectors = 2;
  const bool single = a.rows < kRows;
  const int64_t width = (single ? 4 : kVectors) * kLanes;
  const int64_t out_len = a.out_len();
  const int64_t tiles = out_len / width;
  // a task: one tile column of one row block. Row blocks outermost: a block's activations
  // (up to 16 tiles of rows) stay in L2 while the values stream past once per block; with
  // tile columns outermost, every tile column would stream all the activations again
  const int64_t rows_per_block = single ? a.rows : 16 * kRows;
  const int64_t row_blocks = ceil_div(a.rows, std::max<int64_t>(1, rows_per_block));
  const int64_t grain = grain_for(a.num_diagonals * width * std::min(a.rows, rows_per_block));
  at::parallel_for(0, tiles * row_blocks, grain, [&](int64_t first, int64_t last) {
    std::vector<int64_t> partial(a.num_diagonals);
    for (int64_t task = first; task < last; ++task) {
      const int64_t p0 = (task % tiles) * width;
      const int64_t r0 = (task / tiles) * rows_per_block;
      const int64_t r1 = std::min(a.rows, r0 + rows_per_block);
      if (single) {
        apply_column<1, 4>(a, r0, r1, p0, partial.data());
      } else {
        apply_column<kRows, kVectors>(a, r0, r1, p0, partial.data());
      }
    }
  });
  // positions past the last whole tile
  const int64_t tail = tiles * width;
  if (tail < out_len) {
    at::parallel_for(0, a.rows, grain_for(a.num_diagonals * (out_len - tail)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row)
        for (int64_t p = tail; p < out_len; ++p) a.y[row * out_len + p] = a.bias ? a.bias[p] : 0.f;
      for (int64_t k = 0; k < a.num_diagonals; ++k) apply_runs_scalar(a, k, r0, r1, tail, out_len);
    });
  }
}

// grad[k, t] = sum_rows a[row, t] * b[row, (t + offsets[k]) % mod];  a: [rows, L], b: [rows, mod]
struct DiagValuesGrad {
  const float* a;
  const float* b;
  const int64_t* offsets;
  float* grad;
  int64_t rows, num_diagonals, length, mod;
};

// Positions [t0, t1) of diagonal k, rows [r0, r1), element by element (accumulating).
inline void values_grad_scalar(const DiagValuesGrad& g, int64_t k, int64_t r0, int64_t r1,
                               int64_t t0, int64_t t1) {
  Run runs[2];
  const int count = diagonal_runs(true, g.offsets[k], g.mod, g.length, t0, t1, runs);
  float* out = g.grad + k * g.length;
  for (int64_t row = r0; row < r1; ++row) {
    const float* ar = g.a + row * g.length;
    for (int i = 0; i < count; ++i) {
      const float* br = g.b + row * g.mod + runs[i].shift;
#pragma omp simd
      for (int64_t t = runs[i].begin; t < runs[i].end; ++t) out[t] += ar[t] * br[t];
    }
  }
}

// Rows r0..r0+R of `a` at positions t0.. in registers; every diagonal's gradient tile
// accumulates their products with its column of `b`. Diagonals that wrap inside the tile
// go on `partial` and are done after the others, with masked loads (as in apply_tile).
template <int R, int V>
void values_grad_block(const DiagValuesGrad& g, int64_t r0, int64_t t0, int64_t* partial) {
  constexpr int64_t kWidth = V * kLanes;
  vfloat a_block[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) a_block[r][v] = load(g.a + (r0 + r) * g.length + t0 + v * kLanes);
  const float* b_rows = g.b + r0 * g.mod;
  int64_t num_partial = 0;
  for (int64_t k = 0; k < g.num_diagonals; ++k) {
    const int64_t offset = g.offsets[k];
    int64_t shift;
    if (t0 + kWidth <= g.mod - offset) {
      shift = offset;
    } else if (t0 >= g.mod - offset) {
      shift = offset - g.mod;
    } else {
      partial[num_partial++] = k;
      continue;
    }
    float* out = g.grad + k * g.length + t0;
    const float* bk = b_rows + t0 + shift;
    vfloat acc[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[v] = load(out + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[v] += a_block[r][v] * load(bk + r * g.mod + v * kLanes);
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) store(out + v * kLanes, acc[v]);
  }
  for (int64_t i = 0; i < num_partial; ++i) {
    const int64_t k = partial[i];
    Run runs[2];
    const int count = diagonal_runs(true, g.offsets[k], g.mod, g.length, t0, t0 + kWidth, runs);
    float* out = g.grad + k * g.length + t0;
    for (int j = 0; j < count; ++j) {
      const int run_lo = static_cast<int>(runs[j].begin - t0);
      const int run_hi = static_cast<int>(runs[j].end - t0);
      const float* bk = b_rows + t0 + runs[j].shift;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const int lo = std::max(run_lo - v * kLanes, 0);
        const int hi = std::min(run_hi - v * kLanes, kLanes);
        if (lo >= hi) continue;
        vfloat acc = load(out + v * kLanes);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc += load_lanes(g.a + (r0 + r) * g.length + t0 + v * kLanes, lo, hi) *
                 load_lanes(bk + r * g.mod + v * kLanes, lo, hi);
        store(out + v * kLanes, acc);
      }
    }
  }
}

// Rows [r0, r1) in blocks of R (then one block of the rows left), positions [t0, t0 + V *
// kLanes).
template <int R, int V>
void values_grad_column(const DiagValuesGrad& g, int64_t r0, int64_t r1, int64_t t0,
                        int64_t* partial) {
  int64_t row = r0;
  for (; row + R <= r1; row += R) values_grad_block<R, V>(g, row, t0, partial);
  if constexpr (R > 1) {
    switch (r1 - row) {
      case 0: break;
      case 1: values_grad_block<1, V>(g, row, t0, partial); break;
      case 2: values_grad_block<2, V>(g, row, t0, partial); break;
      case 3: values_grad_block<3, V>(g, row, t0, partial); break;
      default: values_grad_column<R / 2 < 4 ? 4 : R / 2, V>(g, row, r1, t0, partial);
    }
  }
}

inline void diag_values_grad(const DiagValuesGrad& g) {
  constexpr int kRows = kVectorRegisters == 32 ? 8 : 4;
  constexpr int V = 2;
  constexpr int64_t kWidth = V * kLanes;
  const int64_t tiles = g.length / kWidth;
  std::fill(g.grad, g.grad + g.num_diagonals * g.length, 0.f);
  // Chunks of rows, one after the other: a chunk's rows of `b` (read at every diagonal's
  // shift) stay in L2 while all tiles are done; within a chunk a task is a tile column (so
  // threads never write the same gradient). Whole-batch tile columns would stream all of
  // `b` once per tile column.
  constexpr int64_t kChunkBytes = 512 * 1024;
  const int64_t chunk = std::max<int64_t>(
      kRows, kChunkBytes / (static_cast<int64_t>(sizeof(float)) * g.mod) / kRows * kRows);
  for (int64_t r0 = 0; r0 < g.rows; r0 += chunk) {
    const int64_t r1 = std::min(g.rows, r0 + chunk);
    at::parallel_for(0, tiles, grain_for(g.num_diagonals * kWidth * (r1 - r0)),
                     [&](int64_t first, int64_t last) {
      std::vector<int64_t> partial(g.num_diagonals);
      for (int64_t tile = first; tile < last; ++tile)
        values_grad_column<kRows, V>(g, r0, r1, tile * kWidth, partial.data());
    });
  }
  const int64_t tail = tiles * kWidth;
  if (tail < g.length) {
    at::parallel_for(0, g.num_diagonals, grain_for(g.rows * (g.length - tail)),
                     [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) values_grad_scalar(g, k, 0, g.rows, tail, g.length);
    });
  }
}

// --------------------------------------------------------------- plain loops (float64)

template <typename T>
void diag_apply_plain(const T* x, const T* values, const int64_t* offsets, T* y, int64_t rows,
                      int64_t num_diagonals, int64_t length, int64_t mod, bool gather) {
  const int64_t in_len = gather ? mod : length;
  const int64_t out_len = gather ? length : mod;
  Run runs[2];
  for (int64_t k = 0; k < num_diagonals; ++k) {
    const int count = diagonal_runs(gather, offsets[k], mod, length, 0, out_len, runs);
    for (int i = 0; i < count; ++i) {
      const T* v = values + k * length + (gather ? 0 : runs[i].shift);
      for (int64_t row = 0; row < rows; ++row) {
        T* yr = y + row * out_len;
        const T* xr = x + row * in_len + runs[i].shift;
        for (int64_t p = runs[i].begin; p < runs[i].end; ++p) yr[p] += v[p] * xr[p];
      }
    }
  }
}

template <typename T>
void diag_values_grad_plain(const T* a, const T* b, const int64_t* offsets, T* grad,
                            int64_t rows, int64_t num_diagonals, int64_t length, int64_t mod) {
  Run runs[2];
  std::fill(grad, grad + num_diagonals * length, T(0));
  for (int64_t k = 0; k < num_diagonals; ++k) {
    const int count = diagonal_runs(true, offsets[k], mod, length, 0, length, runs);
    T* g = grad + k * length;
    for (int64_t row = 0; row < rows; ++row)
      for (int i = 0; i < count; ++i)
        for (int64_t t = runs[i].begin; t < runs[i].end; ++t)
          g[t] += a[row * length + t] * b[row * mod + runs[i].shift + t];
  }
}

}  // namespace sparsefx
