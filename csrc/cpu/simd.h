// Fixed-width float vectors (GCC/Clang vector extensions): the compiler maps them onto the
// building machine's registers (-march=native: 16 lanes with AVX-512, 8 with AVX2). bfloat16 is
// widened on load and rounded to nearest even on store, as c10::BFloat16 does.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace wara::cpu {

#if defined(__AVX512F__)
inline constexpr int kW = 16;
#else
inline constexpr int kW = 8;
#endif

using bf16 = c10::BFloat16;
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef uint32_t vu32 __attribute__((vector_size(kW * sizeof(uint32_t))));
typedef int32_t vi32 __attribute__((vector_size(kW * sizeof(int32_t))));
typedef uint16_t vu16 __attribute__((vector_size(kW * sizeof(uint16_t))));

// A broadcast (one vbroadcastss: a lane-by-lane loop compiles to kW inserts).
inline vf splat(float v) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(v);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(v);
#else
  vf r;
  for (int i = 0; i < kW; ++i) r[i] = v;
  return r;
#endif
}

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf load(const bf16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// A store that bypasses the caches (no read for ownership of the line), where p is aligned to a
// whole vector; else a plain store. bfloat16 rows are stored plainly. The writing thread must
// call stream_fence() before another thread reads what it stored.
inline void store_stream(float* p, vf v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, (__m256)v);
#endif
  std::memcpy(p, &v, sizeof v);
}

inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

inline void store(bf16* p, vf v) {
  vu32 b;
  std::memcpy(&b, &v, sizeof b);
  vu32 rounded = (b + (((b >> 16) & 1u) + 0x7fffu)) >> 16;
  const vu32 nan = (vu32)(v != v);  // all ones in NaN lanes
  rounded = (rounded & ~nan) | (nan & 0x7fc0u);
  const vu16 h = __builtin_convertvector(rounded, vu16);
  std::memcpy(p, &h, sizeof h);
}

inline void store_stream(bf16* p, vf v) { store(p, v); }

// Keeps v in a register: without it GCC folds a block's reused vector loads into the FMAs as
// memory operands, one load per FMA (shrink 3 x 4: 16 loads per 12 FMAs, load-bound).
inline void in_register(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX__)
  asm("" : "+x"(v));
#endif
}

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline void assign(float& d, float v) { d = v; }
inline void assign(bf16& d, float v) { d = bf16(v); }

// Even and odd lanes of the 2 kW floats (lo, hi); and back: the lanes of e and o interleaved,
// e0 o0 e1 o1 ... (first kW in lo, the rest in hi).
inline void deinterleave(vf lo, vf hi, vf& e, vf& o) {
#if defined(__AVX512F__)
  e = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  o = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(__AVX2__)  // 2 in-lane shuffles + 2 lane permutes (GCC's own pick is 3 vpermd + 2 blends)
  e = (vf)_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps((__m256)lo, (__m256)hi, 0x88)), 0xD8));
  o = (vf)_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps((__m256)lo, (__m256)hi, 0xDD)), 0xD8));
#else
  e = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
  o = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

inline void interleave(vf e, vf o, vf& lo, vf& hi) {
#if defined(__AVX512F__)
  lo = __builtin_shufflevector(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  hi = __builtin_shufflevector(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#elif defined(__AVX2__)
  const __m256 l = _mm256_unpacklo_ps((__m256)e, (__m256)o), h = _mm256_unpackhi_ps((__m256)e, (__m256)o);
  lo = (vf)_mm256_permute2f128_ps(l, h, 0x20);
  hi = (vf)_mm256_permute2f128_ps(l, h, 0x31);
#else
  lo = __builtin_shufflevector(e, o, 0, 8, 1, 9, 2, 10, 3, 11);
  hi = __builtin_shufflevector(e, o, 4, 12, 5, 13, 6, 14, 7, 15);
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float lanes[kW];
  std::memcpy(lanes, &v, sizeof v);
  float half[kW / 2];
  for (int i = 0; i < kW / 2; ++i) half[i] = lanes[i] + lanes[i + kW / 2];
  for (int w = kW / 4; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) half[i] += half[i + w];
  return half[0];
#endif
}

}  // namespace wara::cpu
