// Fixed-width float vectors (GCC/Clang vector extensions): the compiler maps them onto the
// building machine's registers (-march=native: 16 lanes with AVX-512, 8 with AVX2). bfloat16 is
// widened on load and rounded to nearest even on store, as c10::BFloat16 does.
#pragma once

#include <c10/util/BFloat16.h>

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

inline vf splat(float v) {
  vf r;
  for (int i = 0; i < kW; ++i) r[i] = v;
  return r;
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

inline void store(bf16* p, vf v) {
  vu32 b;
  std::memcpy(&b, &v, sizeof b);
  vu32 rounded = (b + (((b >> 16) & 1u) + 0x7fffu)) >> 16;
  const vu32 nan = (vu32)(v != v);  // all ones in NaN lanes
  rounded = (rounded & ~nan) | (nan & 0x7fc0u);
  const vu16 h = __builtin_convertvector(rounded, vu16);
  std::memcpy(p, &h, sizeof h);
}

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }
inline void assign(float& d, float v) { d = v; }
inline void assign(bf16& d, float v) { d = bf16(v); }

inline float hsum(vf v) {
  float lanes[kW];
  std::memcpy(lanes, &v, sizeof v);
  float half[kW / 2];
  for (int i = 0; i < kW / 2; ++i) half[i] = lanes[i] + lanes[i + kW / 2];
  for (int w = kW / 4; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) half[i] += half[i + w];
  return half[0];
}

}  // namespace wara::cpu
