// Work splitting shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparsefx {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tasks smaller than this many multiply-adds are grouped, so that a small layer runs on the
// calling thread instead of paying a few microseconds to wake the pool.
constexpr int64_t kMinWorkPerTask = 32768;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_item));
}

}  // namespace sparsefx
