// One level of pywt's periodization DWT of a row, and its adjoint (= inverse: the filters are
// orthogonal), with F taps (F even), N = 2 * half samples:
//
//   a[k] = sum_i lo[i] x[(2k + F/2 - i) mod N],   d[k] = sum_i hi[i] x[(2k + F/2 - i) mod N]
//   x[p] = sum_{k,i: 2k + F/2 - i = p mod N} lo[i] a[k] + hi[i] d[k]
//
// Each is one pass: the interior, where no index wraps, as a loop the compiler vectorises (the
// tap count a template constant for the usual filters, so the taps unroll), the few edge
// entries with the wrap. The synthesis adds into its destination (a coarser band, or y).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/simd.h"

namespace wara::cpu {

inline int64_t wrap(int64_t q, int64_t len) {
  const int64_t r = q % len;
  return r < 0 ? r + len : r;
}

// F = 0: the tap count is `taps` at run time.
template <int F, typename TX>
inline void dwt_row_f(const TX* x, int64_t half, const float* lo, const float* hi, int taps, float* a, float* d) {
  const int f = F ? F : taps, h = f / 2;
  const int64_t n = 2 * half;
  // x[2k + h - i] for i in [0, f) stays in [0, n) for k in [k0, k1).
  const int64_t k0 = std::min<int64_t>(half, h / 2);  // 2k + h - (f - 1) >= 0
  const int64_t lim = n - 1 - h;
  const int64_t k1 = std::max(k0, std::min<int64_t>(half, lim >= 0 ? lim / 2 + 1 : 0));
  auto edge = [&](int64_t k) {
    float sa = 0.f, sd = 0.f;
    for (int i = 0; i < f; ++i) {
      const float v = to_float(x[wrap(2 * k + h - i, n)]);
      sa += lo[i] * v;
      sd += hi[i] * v;
    }
    a[k] = sa;
    d[k] = sd;
  };
  for (int64_t k = 0; k < k0; ++k) edge(k);
  int64_t k = k0;
  if constexpr (F == 2) {  // haar: a, d from the even and odd samples, kW at a time (k0 = 0)
    const vf l0 = splat(lo[0]), l1 = splat(lo[1]), h0 = splat(hi[0]), h1 = splat(hi[1]);
    for (; k + kW <= k1; k += kW) {
      vf e, o;
      deinterleave(load(x + 2 * k), load(x + 2 * k + kW), e, o);
      store(a + k, l1 * e + l0 * o);
      store(d + k, h1 * e + h0 * o);
    }
  }
  for (; k < k1; ++k) {
    float sa = 0.f, sd = 0.f;
#pragma GCC unroll 32
    for (int i = 0; i < f; ++i) {
      const float v = to_float(x[2 * k + h - i]);
      sa += lo[i] * v;
      sd += hi[i] * v;
    }
    a[k] = sa;
    d[k] = sd;
  }
  for (int64_t k = k1; k < half; ++k) edge(k);
}

// out[p] += synthesis of (a, d) at p, p in [0, 2 * half): out[2q + e] takes tap i from
// coefficient q + (e - h + i) / 2 for the e in {0, 1} that makes e - h + i even. With `init`
// (kSet): out[p] = init[p] + synthesis, out written and not read; with `stream` too, haar's
// vector stores bypass the caches (store_stream).
template <int F, bool kSet, typename TO>
inline void idwt_row_f(const float* a, const float* d, int64_t half, const float* lo, const float* hi, int taps,
                       const float* init, TO* out, bool stream = false) {
  auto start = [&](int64_t p) { return kSet ? init[p] : to_float(out[p]); };
  const int f = F ? F : taps, h = f / 2;
  // the shifts c = (e - h + i) / 2 span [lo_c, hi_c]; the interior q keeps q + c inside [0, half)
  int64_t lo_c = 0, hi_c = 0;
  for (int i = 0; i < f; ++i) {
    const int e = ((h - i) % 2 + 2) % 2;
    const int64_t c = (e - h + i) / 2;
    lo_c = std::min(lo_c, c);
    hi_c = std::max(hi_c, c);
  }
  const int64_t q0 = std::min<int64_t>(half, -lo_c);
  const int64_t q1 = std::max(q0, half - hi_c);
  auto edge = [&](int64_t q) {
    float se = 0.f, so = 0.f;
    for (int i = 0; i < f; ++i) {
      const int e = ((h - i) % 2 + 2) % 2;
      const int64_t k = wrap(q + (e - h + i) / 2, half);
      const float v = lo[i] * a[k] + hi[i] * d[k];
      if (e) so += v;
      else se += v;
    }
    assign(out[2 * q], start(2 * q) + se);
    assign(out[2 * q + 1], start(2 * q + 1) + so);
  };
  for (int64_t q = 0; q < q0; ++q) edge(q);
  int64_t q = q0;
  if constexpr (F == 2) {  // haar: out[2q] += lo1 a + hi1 d, out[2q + 1] += lo0 a + hi0 d, kW q at a time
    const vf l0 = splat(lo[0]), l1 = splat(lo[1]), h0 = splat(hi[0]), h1 = splat(hi[1]);
    for (; q + kW <= q1; q += kW) {
      const vf av = load(a + q), dv = load(d + q);
      vf first, second;
      interleave(l1 * av + h1 * dv, l0 * av + h0 * dv, first, second);
      if constexpr (kSet) {
        if (stream) {
          store_stream(out + 2 * q, load(init + 2 * q) + first);
          store_stream(out + 2 * q + kW, load(init + 2 * q + kW) + second);
        } else {
          store(out + 2 * q, load(init + 2 * q) + first);
          store(out + 2 * q + kW, load(init + 2 * q + kW) + second);
        }
      } else {
        store(out + 2 * q, load(out + 2 * q) + first);
        store(out + 2 * q + kW, load(out + 2 * q + kW) + second);
      }
    }
  }
  for (; q < q1; ++q) {
    float se = 0.f, so = 0.f;
#pragma GCC unroll 32
    for (int i = 0; i < f; ++i) {
      const int e = ((h - i) % 2 + 2) % 2;
      const int64_t k = q + (e - h + i) / 2;
      const float v = lo[i] * a[k] + hi[i] * d[k];
      if (e) so += v;
      else se += v;
    }
    assign(out[2 * q], start(2 * q) + se);
    assign(out[2 * q + 1], start(2 * q + 1) + so);
  }
  for (int64_t q = q1; q < half; ++q) edge(q);
}

// Calls fn(std::integral_constant<int, F>) for the tap counts of the usual filters (haar, db2-db10,
// sym2-sym10, coif1-coif3), F = 0 (run-time taps) otherwise.
template <typename Fn>
inline void dispatch_taps(int taps, Fn&& fn) {
  switch (taps) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    case 10: return fn(std::integral_constant<int, 10>{});
    case 12: return fn(std::integral_constant<int, 12>{});
    case 14: return fn(std::integral_constant<int, 14>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    case 18: return fn(std::integral_constant<int, 18>{});
    case 20: return fn(std::integral_constant<int, 20>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace wara::cpu

namespace wara::cpu {

template <typename TX>
inline void dwt_row(const TX* x, int64_t half, const float* lo, const float* hi, int taps, float* a, float* d) {
  dispatch_taps(taps, [&](auto f) { dwt_row_f<decltype(f)::value>(x, half, lo, hi, taps, a, d); });
}

template <typename TO>
inline void idwt_row_add(const float* a, const float* d, int64_t half, const float* lo, const float* hi, int taps,
                         TO* out) {
  dispatch_taps(taps, [&](auto f) { idwt_row_f<decltype(f)::value, false>(a, d, half, lo, hi, taps, nullptr, out); });
}

// out = init + the synthesis of (a, d): out written, not read (`stream`: see idwt_row_f).
template <typename TO>
inline void idwt_row_set(const float* a, const float* d, int64_t half, const float* lo, const float* hi, int taps,
                         const float* init, TO* out, bool stream = false) {
  dispatch_taps(taps,
                [&](auto f) { idwt_row_f<decltype(f)::value, true>(a, d, half, lo, hi, taps, init, out, stream); });
}

}  // namespace wara::cpu
