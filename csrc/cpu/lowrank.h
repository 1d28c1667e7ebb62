// The two halves of a low-rank product on a tile of tokens that share one slot, in float32:
//
//   shrink:  U[t][k]  = sum_i X[t][i] A[k][i]     (A: (r, n) row-major, read in place)
//   expand:  Y[t][j] += sum_k U[t][k] B[j][k]     (B (m, r) transposed and packed by pack_bt)
//
// Both keep a register block of accumulators and reuse every loaded factor vector across the
// tile's tokens, so A and B are read once per tile, not once per token.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

namespace wara::cpu {

// Register blocks: (tokens x ranks) dot products for shrink, (tokens x vectors of outputs) for
// expand, sized for 16 vector registers (AVX2) or 32 (AVX-512). Measured on Zen 3 (AVX2, one
// core, 64-token tiles, MiniLM shapes): shrink 4x3 ~41 GFLOP/s (2x4: 35, 3x4: 39); expand 1x8
// with 128-column panels 39-51 GFLOP/s (4x2 with unpacked B: 24-27).
inline constexpr int kShrinkT = 4;
inline constexpr int kShrinkK = kW == 16 ? 4 : 3;
inline constexpr int kExpandT = kW == 16 ? 2 : 1;
inline constexpr int kExpandJ = 8;

template <int BT, int BK, typename TX, typename TA>
inline void shrink_tile(const TX* x, int64_t ldx, const TA* a, int64_t n, float* u, int64_t ldu) {
  vf acc[BT][BK] = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    vf xv[BT];
#pragma GCC unroll 8
    for (int t = 0; t < BT; ++t) xv[t] = load(x + t * ldx + i);
#pragma GCC unroll 8
    for (int k = 0; k < BK; ++k) {
      const vf av = load(a + k * n + i);
#pragma GCC unroll 8
      for (int t = 0; t < BT; ++t) acc[t][k] += xv[t] * av;
    }
  }
  float tail[BT][BK] = {};
  for (; i < n; ++i)
    for (int t = 0; t < BT; ++t)
      for (int k = 0; k < BK; ++k) tail[t][k] += to_float(x[t * ldx + i]) * to_float(a[k * n + i]);
  for (int t = 0; t < BT; ++t)
    for (int k = 0; k < BK; ++k) u[t * ldu + k] = hsum(acc[t][k]) + tail[t][k];
}

template <int BK, typename TX, typename TA>
inline void shrink_ranks(const TX* x, int64_t ldx, int64_t nt, const TA* a, int64_t n, float* u, int64_t ldu) {
  int64_t t = 0;
  for (; t + kShrinkT <= nt; t += kShrinkT) shrink_tile<kShrinkT, BK>(x + t * ldx, ldx, a, n, u + t * ldu, ldu);
  for (; t < nt; ++t) shrink_tile<1, BK>(x + t * ldx, ldx, a, n, u + t * ldu, ldu);
}

// U (nt, r), row stride ldu, for the nt rows of X (row stride ldx). Ranks in the outer loop: a
// block of A's rows stays in L1 while the tile's tokens pass over it.
template <typename TX, typename TA>
void shrink(const TX* x, int64_t ldx, int64_t nt, const TA* a, int64_t r, int64_t n, float* u, int64_t ldu) {
  int64_t k = 0;
  for (; k + kShrinkK <= r; k += kShrinkK) shrink_ranks<kShrinkK>(x, ldx, nt, a + k * n, n, u + k, ldu);
  for (; k < r; ++k) shrink_ranks<1>(x, ldx, nt, a + k * n, n, u + k, ldu);
}

// Output columns go in panels of kPanel: B^T is packed panel by panel, each panel's (r, width)
// block contiguous, so a panel's rows sit next to each other in L1 (rows m apart would fall into
// a few cache sets for m = 1536 and evict each other).
inline constexpr int64_t kPanel = 128;

inline int64_t panel_width(int64_t m, int64_t j0) { return std::min(kPanel, m - j0); }

// B (m, r) row-major -> packed B^T, float32: element (k, j) at j0 * r + k * width + (j - j0) for
// the panel [j0, j0 + width) holding j. r * m floats.
template <typename TB>
void pack_bt(const TB* b, int64_t m, int64_t r, float* bt) {
  for (int64_t j0 = 0; j0 < m; j0 += kPanel) {
    const int64_t w = panel_width(m, j0);
    float* panel = bt + j0 * r;
    for (int64_t j = 0; j < w; ++j)
      for (int64_t k = 0; k < r; ++k) panel[k * w + j] = to_float(b[(j0 + j) * r + k]);
  }
}

template <int BT, int BJ, typename TY>
inline void expand_tile(const float* u, int64_t ldu, const float* bt, int64_t r, int64_t m, TY* y, int64_t ldy) {
  vf acc[BT][BJ] = {};
  for (int64_t k = 0; k < r; ++k) {
    vf bv[BJ];
#pragma GCC unroll 8
    for (int j = 0; j < BJ; ++j) bv[j] = load(bt + k * m + j * kW);
#pragma GCC unroll 8
    for (int t = 0; t < BT; ++t) {
      const vf uv = splat(u[t * ldu + k]);
#pragma GCC unroll 8
      for (int j = 0; j < BJ; ++j) acc[t][j] += uv * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < BT; ++t)
#pragma GCC unroll 8
    for (int j = 0; j < BJ; ++j) {
      TY* p = y + t * ldy + j * kW;
      store(p, load(p) + acc[t][j]);
    }
}

template <int BT, typename TY>
inline void expand_rows(const float* u, int64_t ldu, const float* panel, int64_t r, int64_t w, TY* y, int64_t ldy) {
  int64_t j = 0;
  for (; j + kExpandJ * kW <= w; j += kExpandJ * kW) expand_tile<BT, kExpandJ>(u, ldu, panel + j, r, w, y + j, ldy);
  for (; j + kW <= w; j += kW) expand_tile<BT, 1>(u, ldu, panel + j, r, w, y + j, ldy);
  for (; j < w; ++j)
    for (int t = 0; t < BT; ++t) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += u[t * ldu + k] * panel[k * w + j];
      assign(y[t * ldy + j], to_float(y[t * ldy + j]) + s);
    }
}

// Y (nt, m) += U (nt, r) B^T, B^T packed by `pack_bt`. Panel by panel: a panel stays in L1 while
// all the tile's tokens pass over it.
template <typename TY>
void expand(const float* u, int64_t ldu, int64_t nt, const float* bt, int64_t r, int64_t m, TY* y, int64_t ldy) {
  for (int64_t j0 = 0; j0 < m; j0 += kPanel) {
    const int64_t w = panel_width(m, j0);
    const float* panel = bt + j0 * r;
    int64_t t = 0;
    for (; t + kExpandT <= nt; t += kExpandT) expand_rows<kExpandT>(u + t * ldu, ldu, panel, r, w, y + t * ldy + j0, ldy);
    for (; t < nt; ++t) expand_rows<1>(u + t * ldu, ldu, panel, r, w, y + t * ldy + j0, ldy);
  }
}

}  // namespace wara::cpu
