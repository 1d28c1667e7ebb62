// The two halves of a low-rank product on a tile of tokens that share one slot, in float32:
//
//   shrink:  U[t][k]  = sum_i X[t][i] A[k][i]     (A: (r, n), row stride lda, read in place)
//   expand:  Y[t][j] (+)= sum_k U[t][k] B[j][k]   (B (m, r) transposed and packed by pack_bt)
//
// Both keep a register block of accumulators and reuse every loaded factor vector across the
// tile's tokens, so A and B are read once per tile, not once per token.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

namespace wara::cpu {

// Register blocks for 16 vector registers (AVX2; AVX-512 has 32): shrink (tokens x ranks) dot
// products, 3 x 4 = 12 accumulators + 3 x + 1 A vectors, 7 loads per 12 FMAs; expand (tokens x
// vectors of outputs), 3 x 3 accumulators + 3 B vectors + 1 broadcast, 6 loads per 9 FMAs (3 x 4
// needs 17 registers: an accumulator spilled to the stack made it 3x slower). Measured on Zen 3 (AVX2, 2 cores, MiniLM shapes,
// WaRA rank 4 haar J=1, 2048 tokens): see the report in the commit; the former shrink 4 x 3 (rank
// 4 = 3 + 1 passes, per-accumulator scalar reductions) and expand 1 x 8 (8 loads per 8 FMAs) ran
// at ~40 GFLOP/s.
inline constexpr int kShrinkT = kW == 16 ? 4 : 3;
inline constexpr int kShrinkK = 4;
inline constexpr int kExpandT = kW == 16 ? 4 : 3;
inline constexpr int kExpandJ = kW == 16 ? 4 : 3;

// The BK dot products acc[0..BK) reduced to BK floats at out[0..BK). With 4 of them (the usual
// block), one tree of shuffles for all four: 4 scalar horizontal sums cost more than the FMAs of a
// 192-wide band (MiniLM's 384 features at J = 1), and the tree ran the MiniLM layers' fused op
// 1-5% faster at 64 and 2048 tokens (interleaved in one process, AVX-512).
template <int BK>
inline void reduce_store(const vf* acc, const float* tail, float* out) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (BK == 4) {
    __m256 h01 = _mm256_hadd_ps((__m256)acc[0], (__m256)acc[1]);
    __m256 h23 = _mm256_hadd_ps((__m256)acc[2], (__m256)acc[3]);
    __m256 h = _mm256_hadd_ps(h01, h23);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_loadu_ps(tail));
    _mm_storeu_ps(out, s);
    return;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (BK == 4) {  // pairs' halves summed, then quarters: 128-bit lane k holds acc[k]'s 4 partial sums
    const vf s01 = __builtin_shufflevector(acc[0], acc[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[0], acc[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vf s23 = __builtin_shufflevector(acc[2], acc[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[2], acc[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vf q = __builtin_shufflevector(s01, s23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(s01, s23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    q += __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    q += __builtin_shufflevector(q, q, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    for (int k = 0; k < 4; ++k) out[k] = q[4 * k] + tail[k];
    return;
  }
#endif
  for (int k = 0; k < BK; ++k) out[k] = hsum(acc[k]) + tail[k];
}

template <int BT, int BK, typename TX, typename TA>
inline void shrink_tile(const TX* x, int64_t ldx, const TA* a, int64_t lda, int64_t n, float* u, int64_t ldu) {
  vf acc[BT][BK] = {};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    vf xv[BT];
#pragma GCC unroll 8
    for (int t = 0; t < BT; ++t) {
      xv[t] = load(x + t * ldx + i);
      in_register(xv[t]);
    }
#pragma GCC unroll 8
    for (int k = 0; k < BK; ++k) {
      vf av = load(a + k * lda + i);
      in_register(av);
#pragma GCC unroll 8
      for (int t = 0; t < BT; ++t) acc[t][k] += xv[t] * av;
    }
  }
  float tail[BT][BK] = {};
  for (; i < n; ++i)
    for (int t = 0; t < BT; ++t)
      for (int k = 0; k < BK; ++k) tail[t][k] += to_float(x[t * ldx + i]) * to_float(a[k * lda + i]);
#pragma GCC unroll 8
  for (int t = 0; t < BT; ++t) reduce_store<BK>(acc[t], tail[t], u + t * ldu);
}

template <int BT, int BK, typename TX, typename TA>
inline void shrink_ranks(const TX* x, int64_t ldx, int64_t nt, const TA* a, int64_t lda, int64_t n, float* u,
                         int64_t ldu) {
  int64_t t = 0;
  for (; t + BT <= nt; t += BT) shrink_tile<BT, BK>(x + t * ldx, ldx, a, lda, n, u + t * ldu, ldu);
  for (; t + 2 <= nt; t += 2) shrink_tile<2, BK>(x + t * ldx, ldx, a, lda, n, u + t * ldu, ldu);
  for (; t < nt; ++t) shrink_tile<1, BK>(x + t * ldx, ldx, a, lda, n, u + t * ldu, ldu);
}

// U (nt, r), row stride ldu, for the nt rows of X (row stride ldx). Ranks in the outer loop: a
// block of A's rows stays in L1 while the tile's tokens pass over it. Ranks go 4 at a time; the
// last 1-3 with more tokens per block, so every block keeps 8-12 accumulators.
template <typename TX, typename TA>
void shrink(const TX* x, int64_t ldx, int64_t nt, const TA* a, int64_t lda, int64_t r, int64_t n, float* u,
            int64_t ldu) {
  int64_t k = 0;
  for (; k + kShrinkK <= r; k += kShrinkK) shrink_ranks<kShrinkT, kShrinkK>(x, ldx, nt, a + k * lda, lda, n, u + k, ldu);
  switch (r - k) {
    case 3: shrink_ranks<4, 3>(x, ldx, nt, a + k * lda, lda, n, u + k, ldu); break;
    case 2: shrink_ranks<6, 2>(x, ldx, nt, a + k * lda, lda, n, u + k, ldu); break;
    case 1: shrink_ranks<8, 1>(x, ldx, nt, a + k * lda, lda, n, u + k, ldu); break;
    default: break;
  }
}

// Output columns go in panels of kPanel: B^T is packed panel by panel, each panel's (r, width)
// block contiguous, so a panel's rows sit next to each other in L1 (rows m apart would fall into
// a few cache sets for m = 1536 and evict each other).
inline constexpr int64_t kPanel = kW == 16 ? 128 : 96;  // a whole number of expand blocks

inline int64_t panel_width(int64_t m, int64_t j0) { return std::min(kPanel, m - j0); }

// B (m, r) row-major (row stride ldb) -> packed B^T, float32: element (k, j) at
// j0 * r + k * width + (j - j0) for the panel [j0, j0 + width) holding j. r * m floats.
// `bt_r` >= r is the rank of the packed matrix and `k0` the first of its rows this B fills (the
// B of several blocks stacked along the rank).
template <typename TB>
void pack_bt(const TB* b, int64_t m, int64_t r, float* bt, int64_t ldb = -1, int64_t bt_r = -1, int64_t k0 = 0) {
  if (ldb < 0) ldb = r;
  if (bt_r < 0) bt_r = r;
  for (int64_t j0 = 0; j0 < m; j0 += kPanel) {
    const int64_t w = panel_width(m, j0);
    float* panel = bt + j0 * bt_r;
    for (int64_t j = 0; j < w; ++j)
      for (int64_t k = 0; k < r; ++k) panel[(k0 + k) * w + j] = to_float(b[(j0 + j) * ldb + k]);
  }
}

// Acc: add into y (read, add, round once); else store (y is a float32 scratch band).
template <int BT, int BJ, bool Acc, typename TY>
inline void expand_tile(const float* u, int64_t ldu, const float* bt, int64_t r, int64_t m, TY* y, int64_t ldy) {
  vf acc[BT][BJ] = {};
  for (int64_t k = 0; k < r; ++k) {
    vf bv[BJ];
#pragma GCC unroll 8
    for (int j = 0; j < BJ; ++j) {
      bv[j] = load(bt + k * m + j * kW);
      in_register(bv[j]);
    }
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
      if constexpr (Acc) store(p, load(p) + acc[t][j]);
      else store(p, acc[t][j]);
    }
}

template <int BT, bool Acc, typename TY>
inline void expand_rows(const float* u, int64_t ldu, const float* panel, int64_t r, int64_t w, TY* y, int64_t ldy) {
  int64_t j = 0;
  for (; j + kExpandJ * kW <= w; j += kExpandJ * kW)
    expand_tile<BT, kExpandJ, Acc>(u, ldu, panel + j, r, w, y + j, ldy);
  for (; j + kW <= w; j += kW) expand_tile<BT, 1, Acc>(u, ldu, panel + j, r, w, y + j, ldy);
  for (; j < w; ++j)
    for (int t = 0; t < BT; ++t) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += u[t * ldu + k] * panel[k * w + j];
      if constexpr (Acc) assign(y[t * ldy + j], to_float(y[t * ldy + j]) + s);
      else assign(y[t * ldy + j], s);
    }
}

// Y (nt, m) += U (nt, r) B^T (Acc), or = (not Acc), B^T packed by `pack_bt`. Panel by panel: a
// panel stays in L1 while all the tile's tokens pass over it.
template <bool Acc = true, typename TY>
void expand(const float* u, int64_t ldu, int64_t nt, const float* bt, int64_t r, int64_t m, TY* y, int64_t ldy) {
  for (int64_t j0 = 0; j0 < m; j0 += kPanel) {
    const int64_t w = panel_width(m, j0);
    const float* panel = bt + j0 * r;
    int64_t t = 0;
    for (; t + kExpandT <= nt; t += kExpandT)
      expand_rows<kExpandT, Acc>(u + t * ldu, ldu, panel, r, w, y + t * ldy + j0, ldy);
    for (; t + 2 <= nt; t += 2) expand_rows<2, Acc>(u + t * ldu, ldu, panel, r, w, y + t * ldy + j0, ldy);
    for (; t < nt; ++t) expand_rows<1, Acc>(u + t * ldu, ldu, panel, r, w, y + t * ldy + j0, ldy);
  }
}

}  // namespace wara::cpu
