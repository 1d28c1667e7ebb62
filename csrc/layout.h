// The factor layout of one slot in a layer's flat pool (header-only, no torch: the CUDA side
// includes it too).
//
// A slot of rank r starts at element `offset` of the pool and holds, for each block in order,
// A_blk (r, n_blk) row-major followed by B_blk (m_blk, r) row-major, contiguous:
//
//   folded LoRA (wara::sgmv):        one block, A (r, n), B (m, r): r * (n + m) elements
//   own WaRA factors (wara::wavelet_lowrank), J levels: the blocks of wara_train.wavelets.blocks(J),
//   in pywt's order a_J, (h_J, v_J, d_J), ..., (h_1, v_1, d_1); block b at level j has
//   n_blk = n / 2^j, m_blk = m / 2^j: r * sum_b (n_blk + m_blk) elements (2 r (n + m) for J = 1)
//
// Block b's A starts at offset + r * prefix_b, prefix_b = sum over earlier blocks of (n_blk + m_blk).
#pragma once

#include <cstdint>
#include <vector>

namespace wara {

// One sub-band of a 1-D pyramid: the approximation ("a") or the detail ("d") at `level`;
// level 0 is the signal itself.
struct Band {
  bool detail;
  int level;
};

// Block b of the update: C_b = B_b A_b maps the input band `col` to the output band `row`.
struct Block {
  Band col, row;
  int64_t n, m;    // A_b is (r, n), B_b is (m, r)
  int64_t prefix;  // A_b at slot offset + r * prefix
};

struct Layout {
  int levels = 0;           // 0: folded (sgmv), else J
  int64_t n = 0, m = 0;     // in, out features
  std::vector<Block> blocks;
  int64_t per_rank = 0;     // elements of a slot per unit of rank
};

inline Layout folded_layout(int64_t n, int64_t m) {
  Layout l;
  l.n = n;
  l.m = m;
  l.blocks.push_back(Block{{false, 0}, {false, 0}, n, m, 0});
  l.per_rank = n + m;
  return l;
}

// pywt's block order; h_j is (row detail, column approximation), v_j the transpose, d_j both
// details (wara_train.wavelets.blocks).
inline Layout wavelet_layout(int64_t n, int64_t m, int levels) {
  Layout l;
  l.levels = levels;
  l.n = n;
  l.m = m;
  int64_t prefix = 0;
  auto add = [&](bool row_detail, bool col_detail, int level) {
    Block b{{col_detail, level}, {row_detail, level}, n >> level, m >> level, prefix};
    prefix += b.n + b.m;
    l.blocks.push_back(b);
  };
  add(false, false, levels);  // a_J
  for (int j = levels; j >= 1; --j) {
    add(true, false, j);   // h_j
    add(false, true, j);   // v_j
    add(true, true, j);    // d_j
  }
  l.per_rank = prefix;
  return l;
}

}  // namespace wara
