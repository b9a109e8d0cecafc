// A float vector the width of the machine's widest registers, through the compiler's vector
// extensions (GCC and Clang): 16 lanes with AVX-512, 8 otherwise (AVX2; on other machines the
// compiler splits it into what they have). `a += w * x` compiles to a fused multiply-add
// where the target has one.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sparsefx {

#if defined(__AVX512F__)
#define SPARSEFX_LANES 16
#else
#define SPARSEFX_LANES 8
#endif
constexpr int kLanes = SPARSEFX_LANES;
#if defined(__AVX512F__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

// unaligned load and store
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline vfloat broadcast(float s) { return vfloat{} + s; }

// Lanes [lo, hi) of the vector at p, zeros elsewhere. Lanes outside [lo, hi) are never read
// (masked loads do not fault), so p may point before or past the end of an array.
inline vfloat load_lanes(const float* p, int lo, int hi) {
#if defined(__AVX512F__) && SPARSEFX_LANES == 16
  const auto mask = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  return (vfloat)_mm512_maskz_loadu_ps(mask, p);
#elif defined(__AVX512VL__) && SPARSEFX_LANES == 8
  const auto mask = static_cast<__mmask8>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
  return (vfloat)_mm256_maskz_loadu_ps(mask, p);
#elif defined(__AVX2__) && SPARSEFX_LANES == 8
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1)),
                                        _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
  return (vfloat)_mm256_maskload_ps(p, mask);
#else
  vfloat v{};
  for (int i = lo; i < hi; ++i) v[i] = p[i];
  return v;
#endif
}

inline float reduce_add(vfloat v) {
#if defined(__AVX512F__) && SPARSEFX_LANES == 16
  return _mm512_reduce_add_ps((__m512)v);
#else
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
#endif
}

// Stores lanes [0, lanes) of v at p; memory past them is not touched.
inline void store_lanes(float* p, vfloat v, int lanes) {
#if defined(__AVX512F__) && SPARSEFX_LANES == 16
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << lanes) - 1u), (__m512)v);
#else
  for (int i = 0; i < lanes; ++i) p[i] = v[i];
#endif
}

}  // namespace sparsefx
