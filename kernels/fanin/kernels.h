// CPU kernels of the fan-in ops.
//
// Activations come transposed, [features, batch], so every stored entry (o, j) touches one
// contiguous batch vector: xt[indices[o, j], :]. The float32 kernels keep a block of one
// output row's batch columns in registers (forward: its sums; values gradient: its output
// gradient) while the row's entries stream past; batch 1 gathers 16 activations at a time
// where the CPU has AVX-512. The callers check that every id lies in [0, in) first
// (ids_in_range), so the loops that read activations run unchecked. float64 (gradcheck) takes
// the plain loops.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "../csrc/parallel.h"
#include "../csrc/simd.h"

namespace sparsefx {

// Do all `count` ids lie in [0, in)? One vectorised min/max pass (about a microsecond for
// 60k int16 ids): the kernels below index activations with the ids unchecked.
template <typename I>
inline bool ids_in_range(const I* ids, int64_t count, int64_t in) {
  // as unsigned, a negative id is larger than any valid one: one max reduction decides
  using U = std::make_unsigned_t<I>;
  U highest = 0;
  for (int64_t i = 0; i < count; ++i) highest = std::max(highest, static_cast<U>(ids[i]));
  return count == 0 || static_cast<uint64_t>(highest) < static_cast<uint64_t>(in);
}

// ---------------------------------------------------------------------- one batch column

// sum_j v[j] * x[idx[j]]
template <typename I>
inline float gather_dot(const float* x, const float* v, const I* idx, int64_t fan_in) {
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  // (short rows: the scalar chains below are faster)
  if constexpr (sizeof(I) <= 4) if (fan_in >= 32) {
    auto ids_at = [&](int64_t at, __mmask16 mask) {
      if constexpr (sizeof(I) == 2) {
        return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(mask, idx + at));
      } else {
        return _mm512_maskz_loadu_epi32(mask, idx + at);
      }
    };
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; j + 32 <= fan_in; j += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j),
                             _mm512_i32gather_ps(ids_at(j, 0xffff), x, 4), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j + 16),
                             _mm512_i32gather_ps(ids_at(j + 16, 0xffff), x, 4), acc1);
    }
    for (; j < fan_in; j += 16) {
      const int lanes = static_cast<int>(std::min<int64_t>(16, fan_in - j));
      const auto mask = static_cast<__mmask16>((1u << lanes) - 1u);
      acc0 = _mm512_fmadd_ps(
          _mm512_maskz_loadu_ps(mask, v + j),
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, ids_at(j, mask), x, 4), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  // four scalar chains (vector gathers are slow on some cores, and absent before AVX-512)
  float acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  for (; j + 4 <= fan_in; j += 4) {
    acc0 += v[j] * x[idx[j]];
    acc1 += v[j + 1] * x[idx[j + 1]];
    acc2 += v[j + 2] * x[idx[j + 2]];
    acc3 += v[j + 3] * x[idx[j + 3]];
  }
  for (; j < fan_in; ++j) acc0 += v[j] * x[idx[j]];
  return (acc0 + acc1) + (acc2 + acc3);
}

// ------------------------------------------------------------------ blocks of batch columns

// Lanes of the last vector of a block of V vectors that lie inside the batch (kLanes: all).
struct Columns {
  int64_t start;  // first batch column of the block
  int last_lanes;
};

template <bool Tail>
inline vfloat load_columns(const float* p, int lanes) {
  if constexpr (Tail) return load_lanes(p, 0, lanes);
  return load(p);
}

// The entries an output row sums over: weight(j) * xt[row(j), :] for j < count.
template <typename I>
struct RowEntries {  // row o of the fan-in structure (the forward)
  const float* values;
  const I* ids;
  int64_t count;
  float weight(int64_t j) const { return values[j]; }
  int64_t row(int64_t j) const { return ids[j]; }
};

template <typename E>
struct ColumnEntries {  // column c of the structure, by input (the input gradient)
  const float* values;   // all of values[out, k]
  const E* rows;         // output row o of each entry of the column
  const E* slots;        // its slot j within that row
  int64_t fan_in, count;
  float weight(int64_t e) const {
    return values[static_cast<int64_t>(rows[e]) * fan_in + slots[e]];
  }
  int64_t row(int64_t e) const { return rows[e]; }
};

// acc[v] (V vectors of batch columns) = sum_j weight(j) * xt[row(j), columns]: U independent
// sets of accumulators cover the FMA latency when V is small.
template <int V, int U, bool Tail, typename Entries>
inline void fanin_columns(const float* xt, int64_t batch, const Entries& entries,
                          Columns columns, vfloat* out) {
  vfloat acc[U][V];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[u][v] = vfloat{};
  const float* base = xt + columns.start;
  const int64_t count = entries.count;
  int64_t j = 0;
  for (; j + U <= count; j += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const vfloat weight = broadcast(entries.weight(j + u));
      const float* row = base + entries.row(j + u) * batch;
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const bool tail = Tail && v == V - 1;
        acc[u][v] += weight * (tail ? load_lanes(row + v * kLanes, 0, columns.last_lanes)
                                    : load(row + v * kLanes));
      }
    }
  }
  for (; j < count; ++j) {
    const vfloat weight = broadcast(entries.weight(j));
    const float* row = base + entries.row(j) * batch;
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const bool tail = Tail && v == V - 1;
      acc[0][v] += weight * (tail ? load_lanes(row + v * kLanes, 0, columns.last_lanes)
                                  : load(row + v * kLanes));
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    vfloat total = acc[0][v];
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) total += acc[u][v];
    out[v] = total;
  }
}

// Calls `block(columns, vectors)` for the column blocks of a batch: blocks of 4 vectors, then
// one block of the 1-3 vectors left (its last one masked where the batch ends inside it).
template <typename Block>
inline void for_column_blocks(int64_t begin, int64_t end, Block&& block) {
  constexpr int64_t kBlock = 4 * kLanes;
  int64_t c0 = begin;
  for (; c0 + kBlock <= end; c0 += kBlock) block(Columns{c0, kLanes}, 4);
  if (c0 < end) {
    const int64_t rest = end - c0;
    const int vectors = static_cast<int>(ceil_div(rest, kLanes));
    block(Columns{c0, static_cast<int>(rest - (vectors - 1) * kLanes)}, vectors);
  }
}

// acc = the sums of `entries` over one block of `vectors` (1-4) vector columns, through the
// instantiation of fanin_columns for it (a masked last vector where the batch ends inside).
template <typename Entries>
inline void sum_columns(const float* xt, int64_t batch, const Entries& entries, Columns columns,
                        int vectors, vfloat* acc) {
  if (columns.last_lanes == kLanes) {
    switch (vectors) {
      case 1: return fanin_columns<1, 4, false>(xt, batch, entries, columns, acc);
      case 2: return fanin_columns<2, 2, false>(xt, batch, entries, columns, acc);
      case 3: return fanin_columns<3, 2, false>(xt, batch, entries, columns, acc);
      default: return fanin_columns<4, 1, false>(xt, batch, entries, columns, acc);
    }
  }
  switch (vectors) {
    case 1: return fanin_columns<1, 4, true>(xt, batch, entries, columns, acc);
    case 2: return fanin_columns<2, 2, true>(xt, batch, entries, columns, acc);
    case 3: return fanin_columns<3, 2, true>(xt, batch, entries, columns, acc);
    default: return fanin_columns<4, 1, true>(xt, batch, entries, columns, acc);
  }
}

inline void store_columns(float* p, const vfloat* acc, int vectors, int last_lanes) {
  for (int v = 0; v < vectors; ++v) {
    const int lanes = v == vectors - 1 ? last_lanes : kLanes;
    if (lanes == kLanes) {
      store(p + v * kLanes, acc[v]);
    } else {
      store_lanes(p + v * kLanes, acc[v], lanes);
    }
  }
}

// Rows first .. last of a feature-major gather, chunk by chunk (activations and results in
// chunks of `width` batch columns, see below): dst[r, :] = start(r) + the sum over
// entries(r) of weight * src[row, :]. The forward gathers by output row, the input gradient
// by input column. A thread keeps its rows through all chunks; each chunk's `src_rows` rows
// stay in its cache while its rows' entries stream past.
template <typename EntriesOf, typename StartOf>
inline void gather_rows(const float* src, int64_t src_rows, float* dst, int64_t dst_rows,
                        int64_t batch, int64_t width, int64_t first, int64_t last,
                        EntriesOf&& entries_of, StartOf&& start_of) {
  for (int64_t chunk = 0; chunk * width < batch; ++chunk) {
    const float* src_chunk = src + chunk * src_rows * width;
    float* dst_chunk = dst + chunk * dst_rows * width;
    const int64_t columns = std::min(width, batch - chunk * width);
    for (int64_t r = first; r < last; ++r) {
      const auto entries = entries_of(r);
      const float start = start_of(r);
      for_column_blocks(0, columns, [&](Columns block, int vectors) {
        vfloat acc[4];
        sum_columns(src_chunk, width, entries, block, vectors, acc);
        for (int i = 0; i < vectors; ++i) acc[i] += start;
        store_columns(dst_chunk + r * width + block.start, acc, vectors, block.last_lanes);
      });
    }
  }
}

// ---------------------------------------------------------------------------- forward
//
// Activations and results are feature-major: [features, batch], or (float32, batches above
// one block) in chunks of kBlockColumns batch columns, [chunks, features, kBlockColumns],
// `width` being the columns of one chunk. In chunks, the rows a kernel reads at random lie
// 256 bytes apart instead of a whole batch apart: a chunk's rows fit L2 and its TLB, where
// 6,000-column rows missed both on every entry (measured 2.8x slower).

constexpr int64_t kBlockColumns = 4 * kLanes;

// Calls `tile(block, f0, f1, r0, count)` in parallel for every tile of 64 features x one
// chunk of `width` rows: `block` is the chunk's offset in the feature-major buffer (in
// floats), rows r0 .. r0 + count of the batch, features f0 .. f1.
template <typename Tile>
inline void for_feature_tiles(int64_t batch, int64_t features, int64_t width, Tile&& tile) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = ceil_div(features, kTile);
  at::parallel_for(0, ceil_div(batch, width) * tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t chunk = task / tiles, f0 = (task % tiles) * kTile;
      const int64_t r0 = chunk * width;
      tile(chunk * features * width, f0, std::min(features, f0 + kTile), r0,
           std::min(width, batch - r0));
    }
  });
}

// [batch, features] rows -> feature-major chunks of `width` columns ([features, batch] when
// width == batch); spare columns of the last chunk zeroed. Tiles of 64 features x `width`
// rows stay in L1 (ATen's strided copy took 67-92 ms for a 6,336 x 3,072 transpose, this
// about a tenth of that).
inline void to_feature_major(const float* rows, int64_t batch, int64_t features, int64_t width,
                             float* out) {
  for_feature_tiles(batch, features, width,
                    [&](int64_t block, int64_t f0, int64_t f1, int64_t r0, int64_t count) {
    float* chunk = out + block;
    for (int64_t r = 0; r < count; ++r) {
      const float* src = rows + (r0 + r) * features;
      for (int64_t f = f0; f < f1; ++f) chunk[f * width + r] = src[f];
    }
    for (int64_t f = f0; f < f1; ++f)
      std::fill(chunk + f * width + count, chunk + f * width + width, 0.f);
  });
}

// The inverse: feature-major chunks -> [batch, features] rows.
inline void from_feature_major(const float* chunks_data, int64_t batch, int64_t features,
                               int64_t width, float* rows) {
  for_feature_tiles(batch, features, width,
                    [&](int64_t block, int64_t f0, int64_t f1, int64_t r0, int64_t count) {
    const float* chunk = chunks_data + block;
    for (int64_t r = 0; r < count; ++r) {
      float* dst = rows + (r0 + r) * features;
      for (int64_t f = f0; f < f1; ++f) dst[f] = chunk[f * width + r];
    }
  });
}

// yt[o, :] = bias[o] + sum_j values[o, j] * xt[indices[o, j], :]   (bias may be null);
// xt: `in` features, yt: `out`, both feature-major with chunks of `width` columns
template <typename T, typename I>
void fanin_forward(const T* xt, const T* values, const I* indices, const T* bias, T* yt,
                   int64_t batch, int64_t out, int64_t fan_in, int64_t in, int64_t width) {
  if (batch == 0) return;  // an empty batch: nothing to write
  if constexpr (std::is_same_v<T, float>) {
    if (batch > 1) {
      at::parallel_for(0, out, grain_for(fan_in * batch), [&](int64_t first, int64_t last) {
        gather_rows(xt, in, yt, out, batch, width, first, last,
                    [&](int64_t o) {
                      return RowEntries<I>{values + o * fan_in, indices + o * fan_in, fan_in};
                    },
                    [&](int64_t o) { return bias ? bias[o] : 0.f; });
      });
      return;
    }
  }
  at::parallel_for(0, out, grain_for(fan_in * batch), [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o) {
      const T* v = values + o * fan_in;
      const I* idx = indices + o * fan_in;
      T* yo = yt + o * batch;
      const T start = bias ? bias[o] : T(0);
      if constexpr (std::is_same_v<T, float>) {  // batch 1
        yo[0] = start + gather_dot(xt, v, idx, fan_in);
      } else {
        std::fill(yo, yo + batch, start);
        for (int64_t j = 0; j < fan_in; ++j) {
          const T w = v[j];
          const T* xc = xt + static_cast<int64_t>(idx[j]) * batch;
          for (int64_t m = 0; m < batch; ++m) yo[m] += w * xc[m];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------- input gradient

// The structure by input column (compressed sparse columns): for column c, the entries
// (rows[e], slots[e]) for e in [start[c], start[c + 1]), in increasing row order. The input
// gradient then sums over a column's entries, as the forward sums over a row's: reads only,
// no scattered writes. Built once per structure version (fanin_ops.cpp caches it). E is uint16
// when every row id and slot fits, else int32.
template <typename E>
struct FaninColumns {
  std::vector<int64_t> start;
  std::vector<E> rows, slots;
};

template <typename E, typename I>
std::shared_ptr<const FaninColumns<E>> fanin_columns_of(const I* ids, int64_t out, int64_t fan_in,
                                                        int64_t in) {
  auto columns = std::make_shared<FaninColumns<E>>();
  columns->start.assign(in + 1, 0);
  for (int64_t e = 0; e < out * fan_in; ++e) ++columns->start[ids[e] + 1];
  for (int64_t c = 0; c < in; ++c) columns->start[c + 1] += columns->start[c];
  std::vector<int64_t> cursor(columns->start.begin(), columns->start.end() - 1);
  columns->rows.resize(out * fan_in);
  columns->slots.resize(out * fan_in);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t j = 0; j < fan_in; ++j) {
      const int64_t at = cursor[ids[o * fan_in + j]]++;
      columns->rows[at] = static_cast<E>(o);
      columns->slots[at] = static_cast<E>(j);
    }
  }
  return columns;
}

// dxt[c, :] = sum over column c's entries (o, j) of values[o, j] * dyt[o, :] (float32);
// feature-major with chunks of `width` columns, as the forward
template <typename E>
void fanin_input_grad_by_columns(const float* dyt, const float* values,
                                 const FaninColumns<E>& columns, float* dxt, int64_t batch,
                                 int64_t out, int64_t in, int64_t fan_in, int64_t width) {
  const int64_t entries_per_column = ceil_div(columns.rows.size(), std::max<int64_t>(1, in));
  auto entries_of = [&](int64_t c) {
    const int64_t e0 = columns.start[c], e1 = columns.start[c + 1];
    return ColumnEntries<E>{values, columns.rows.data() + e0, columns.slots.data() + e0, fan_in,
                            e1 - e0};
  };
  if (batch == 0) return;  // an empty batch: nothing to write
  if (batch == 1) {
    at::parallel_for(0, in, grain_for(entries_per_column), [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const ColumnEntries<E> entries = entries_of(c);
        float acc0 = 0, acc1 = 0;
        int64_t e = 0;
        for (; e + 2 <= entries.count; e += 2) {
          acc0 += entries.weight(e) * dyt[entries.row(e)];
          acc1 += entries.weight(e + 1) * dyt[entries.row(e + 1)];
        }
        if (e < entries.count) acc0 += entries.weight(e) * dyt[entries.row(e)];
        dxt[c] = acc0 + acc1;
      }
    });
    return;
  }
  at::parallel_for(0, in, grain_for(entries_per_column * batch), [&](int64_t first, int64_t last) {
    gather_rows(dyt, out, dxt, in, batch, width, first, last, entries_of,
                [](int64_t) { return 0.f; });
  });
}

// dxt[c, :] += values[o, j] * dyt[o, :] for c = indices[o, j]: a scatter into a zeroed dxt.
// With a wide batch each thread owns a slice of batch columns; otherwise threads split the
// rows and sum private copies of dxt at the end.
template <typename T, typename I>
void fanin_input_grad(const T* dyt, const T* values, const I* indices, T* dxt, int64_t batch,
                      int64_t out, int64_t fan_in, int64_t in) {
  auto scatter_rows = [&](int64_t o0, int64_t o1, int64_t m0, int64_t m1, T* target) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* v = values + o * fan_in;
      const I* idx = indices + o * fan_in;
      const T* g = dyt + o * batch;
      if (m1 - m0 == 1) {
        const T go = g[m0];
        T* column = target + m0;
        for (int64_t j = 0; j < fan_in; ++j) column[idx[j] * batch] += v[j] * go;
        continue;
      }
      if constexpr (std::is_same_v<T, float>) {
        // the output gradient's columns in registers; each entry adds to one row of dxt
        for (int64_t c0 = m0; c0 < m1; c0 += 4 * kLanes) {
          const int64_t width = std::min<int64_t>(4 * kLanes, m1 - c0);
          const int vectors = static_cast<int>(ceil_div(width, kLanes));
          const int last = static_cast<int>(width - (vectors - 1) * kLanes);
          vfloat grad[4];
          for (int u = 0; u < vectors; ++u)
            grad[u] = load_lanes(g + c0 + u * kLanes, 0, u == vectors - 1 ? last : kLanes);
          for (int64_t j = 0; j < fan_in; ++j) {
            const vfloat w = broadcast(v[j]);
            float* row = target + static_cast<int64_t>(idx[j]) * batch + c0;
            for (int u = 0; u < vectors; ++u) {
              if (u == vectors - 1 && last < kLanes) {
                store_lanes(row + u * kLanes, load_lanes(row + u * kLanes, 0, last) + w * grad[u],
                            last);
              } else {
                store(row + u * kLanes, load(row + u * kLanes) + w * grad[u]);
              }
            }
          }
        }
      } else {
        for (int64_t j = 0; j < fan_in; ++j) {
          const T w = v[j];
          T* dst = target + static_cast<int64_t>(idx[j]) * batch;
          for (int64_t m = m0; m < m1; ++m) dst[m] += w * g[m];
        }
      }
    }
  };
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kMinColumnsPerThread = 32;
  // a pass over all entries updates a [in, kColumnsPerPass] slice of dxt: 512 KiB for 4096
  // inputs, so the scattered read-modify-writes stay in L2
  constexpr int64_t kColumnsPerPass = 32;
  if (threads == 1 || batch >= threads * kMinColumnsPerThread) {
    const int64_t grain = std::max(kMinColumnsPerThread, grain_for(out * fan_in));
    at::parallel_for(0, batch, grain, [&](int64_t m0, int64_t m1) {
      for (int64_t c0 = m0; c0 < m1; c0 += kColumnsPerPass)
        scatter_rows(0, out, c0, std::min(m1, c0 + kColumnsPerPass), dxt);
    });
    return;
  }
  std::vector<T> partial(static_cast<size_t>(threads) * in * batch, T(0));
  at::parallel_for(0, out, grain_for(fan_in * batch), [&](int64_t o0, int64_t o1) {
    scatter_rows(o0, o1, 0, batch, partial.data() + at::get_thread_num() * in * batch);
  });
  const int64_t size = in * batch;
  at::parallel_for(0, size, 4096, [&](int64_t first, int64_t last) {
    for (int64_t t = 0; t < threads; ++t) {
      const T* src = partial.data() + t * size;
#pragma omp simd
      for (int64_t i = first; i < last; ++i) dxt[i] += src[i];
    }
  });
}

// ---------------------------------------------------------------------- values gradient

// grad[o, j] = dot(dyt[o, :], xt[indices[o, j], :])
template <typename T, typename I>
void fanin_values_grad(const T* dyt, const T* xt, const I* indices, T* grad, int64_t batch,
                       int64_t out, int64_t fan_in, int64_t in, int64_t width) {
  if (batch == 0) {  // an empty batch: no products at all
    std::fill(grad, grad + out * fan_in, T(0));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (batch > 1) {
      // per chunk (at most one block of kBlockColumns columns), the output gradient's
      // columns in registers and the entries' activation rows streamed past them; one
      // vector sum per entry and chunk. A thread keeps its output rows through all chunks.
      const int64_t chunks = ceil_div(batch, width);
      std::fill(grad, grad + out * fan_in, 0.f);
      at::parallel_for(0, out, grain_for(fan_in * batch), [&](int64_t first, int64_t last) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const float* dy_chunk = dyt + chunk * out * width;
          const float* x_chunk = xt + chunk * in * width;
          const int64_t count = std::min(width, batch - chunk * width);
          const int vectors = static_cast<int>(ceil_div(count, kLanes));
          const int last_lanes = static_cast<int>(count - (vectors - 1) * kLanes);
          for (int64_t o = first; o < last; ++o) {
            const float* g = dy_chunk + o * width;
            const I* idx = indices + o * fan_in;
            float* grad_row = grad + o * fan_in;
            vfloat block[4];
            for (int u = 0; u < vectors; ++u)
              block[u] = load_lanes(g + u * kLanes, 0, u == vectors - 1 ? last_lanes : kLanes);
            for (int64_t j = 0; j < fan_in; ++j) {
              const float* row = x_chunk + static_cast<int64_t>(idx[j]) * width;
              vfloat sum = block[0] * load_lanes(row, 0, vectors == 1 ? last_lanes : kLanes);
              for (int u = 1; u < vectors; ++u)
                sum += block[u] *
                       load_lanes(row + u * kLanes, 0, u == vectors - 1 ? last_lanes : kLanes);
              grad_row[j] += reduce_add(sum);
            }
          }
        }
      });
      return;
    }
  }
  at::parallel_for(0, out, grain_for(fan_in * batch), [&](int64_t first, int64_t last) {
    for (int64_t o = first; o < last; ++o) {
      const T* g = dyt + o * batch;
      const I* idx = indices + o * fan_in;
      T* grad_row = grad + o * fan_in;
      if (batch == 1) {  // one product per entry: a gather, vectorised
        const T go = g[0];
#pragma omp simd
        for (int64_t j = 0; j < fan_in; ++j) grad_row[j] = go * xt[idx[j]];
        continue;
      }
      for (int64_t j = 0; j < fan_in; ++j) {
        const T* xc = xt + static_cast<int64_t>(idx[j]) * batch;
        T acc = 0;
        for (int64_t m = 0; m < batch; ++m) acc += g[m] * xc[m];
        grad_row[j] = acc;
      }
    }
  });
}

}  // namespace sparsefx
