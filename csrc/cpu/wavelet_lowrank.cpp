// CPU implementation of wara::wavelet_lowrank (schema and semantics: ops.cpp), tiled as
// wara::sgmv is (cpu/sgmv.cpp): per tile, the rows' DWT into float32 bands, each block's
// shrink and expand between bands (cpu/lowrank.h), the inverse cascade into y.
#include "cpu/common.h"
#include "cpu/wavelet.h"

namespace wara::cpu {
namespace {

// The blocks that read one input band (their A's stacked: one shrink of rank r * |blocks|) or
// write one output band (their B's stacked: one expand). At J = 1: a_1 is read by a_1 and h_1,
// d_1 by v_1 and d_1; a_1 is written by a_1 and v_1, d_1 by h_1 and d_1: two shrinks and two
// expands of rank 2r over half-width bands, each an FMA-bound register-blocked product.
struct Group {
  Band band;
  int64_t len;              // n_j (input band) or m_j (output band)
  std::vector<int> blocks;  // in layout order
};

inline std::vector<Group> group_blocks(const Layout& layout, bool by_row) {
  std::vector<Group> groups;
  for (size_t b = 0; b < layout.blocks.size(); ++b) {
    const Block& blk = layout.blocks[b];
    const Band band = by_row ? blk.row : blk.col;
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.band.detail == band.detail && g.band.level == band.level; });
    if (it == groups.end()) {
      groups.push_back({band, by_row ? blk.m : blk.n, {}});
      it = groups.end() - 1;
    }
    it->blocks.push_back(static_cast<int>(b));
  }
  return groups;
}

// A thread's float32 copy of one slot's factors, kept while its tiles stay on that slot: per
// input group the stacked A (R_g, n_g) rows; per output group the stacked B^T packed in panels.
struct PackedWavelet {
  int64_t slot = -1;
  AlignedFloats data;
  std::vector<int64_t> a_at, bt_at;

  template <typename TP>
  void ensure(int64_t s, const TP* pool, int64_t offset, int64_t r, const Layout& layout,
              const std::vector<Group>& cols, const std::vector<Group>& rows) {
    if (s == slot) return;
    a_at.clear();
    bt_at.clear();
    int64_t total = 0;
    for (const Group& g : cols) {
      a_at.push_back(total);
      total += round_up(r * static_cast<int64_t>(g.blocks.size()) * g.len);
    }
    for (const Group& g : rows) {
      bt_at.push_back(total);
      total += round_up(r * static_cast<int64_t>(g.blocks.size()) * g.len);
    }
    data.resize(total);
    for (size_t gi = 0; gi < cols.size(); ++gi) {
      float* dst = data.data() + a_at[gi];
      for (int b : cols[gi].blocks) {
        const Block& blk = layout.blocks[b];
        const TP* src = pool + offset + r * blk.prefix;
        for (int64_t i = 0; i < r * blk.n; ++i) dst[i] = to_float(src[i]);
        dst += r * blk.n;
      }
    }
    for (size_t gi = 0; gi < rows.size(); ++gi) {
      const Group& g = rows[gi];
      const int64_t rg = r * static_cast<int64_t>(g.blocks.size());
      for (size_t i = 0; i < g.blocks.size(); ++i) {
        const Block& blk = layout.blocks[g.blocks[i]];
        pack_bt(pool + offset + r * blk.prefix + r * blk.n, blk.m, r, data.data() + bt_at[gi], r, rg,
                static_cast<int64_t>(i) * r);
      }
    }
    slot = s;
  }
};

// The wavelet update of one tile: DWT of its rows along the input features; per input group one
// shrink into U (the group's blocks' ranks side by side); per output group its blocks' columns
// of U gathered, one expand storing its row band; then the inverse cascade of the row bands:
// level j's synthesis adds into the approximation band of level j - 1, the last into y.
template <typename TX, typename TP, typename TY>
void wavelet_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool, const Tables& tab,
                   const std::vector<Tile>& tiles, const Layout& layout, const Filters& f) {
  const TX* xp = reinterpret_cast<const TX*>(x.data_ptr());
  TY* yp = reinterpret_cast<TY*>(y.data_ptr());
  const TP* pp = reinterpret_cast<const TP*>(pool.data_ptr());
  const int64_t ldx = x.stride(0), ldy = y.stride(0), n = layout.n, m = layout.m;
  const int levels = layout.levels, taps = f.taps;
  const float* lo = f.lo.data();
  const float* hi = f.hi.data();
  const std::vector<Group> cols = group_blocks(layout, false), rows = group_blocks(layout, true);
  const int64_t nblocks = static_cast<int64_t>(layout.blocks.size());
  // Bands written by no expand (none for wavelet_layout) are zeroed per tile.
  bool written[2][17] = {};
  for (const Group& g : rows) written[g.band.detail][g.band.level] = true;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    int64_t max_nt = 0;
    for (int64_t i = begin; i < end; ++i) max_nt = std::max(max_nt, tiles[i].t1 - tiles[i].t0);
    // Bands of the tile, per level j = 1..J: in_a[j], in_d[j] (nt, n_j); out_a[j], out_d[j] (nt, m_j).
    AlignedFloats in_bands(2 * max_nt * n + 2 * levels * kW), out_bands(2 * max_nt * m + 2 * levels * kW), u, ug;
    std::vector<int64_t> ucol(nblocks);
    PackedWavelet packed;
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const int64_t r = tab.rank[tile.slot], off = tab.off[tile.slot], nt = tile.t1 - tile.t0;
      float* in_b[2][17];
      float* out_b[2][17];
      float* p = in_bands.data();
      float* q = out_bands.data();
      for (int j = 1; j <= levels; ++j) {
        in_b[0][j] = p;
        p += round_up(nt * (n >> j));
        in_b[1][j] = p;
        p += round_up(nt * (n >> j));
        out_b[0][j] = q;
        q += round_up(nt * (m >> j));
        out_b[1][j] = q;
        q += round_up(nt * (m >> j));
        for (int e = 0; e < 2; ++e)
          if (!written[e][j]) std::fill(out_b[e][j], out_b[e][j] + nt * (m >> j), 0.f);
      }
      for (int64_t t = 0; t < nt; ++t) {
        dwt_row(xp + (tile.t0 + t) * ldx, n >> 1, lo, hi, taps, in_b[0][1] + t * (n >> 1), in_b[1][1] + t * (n >> 1));
        for (int j = 2; j <= levels; ++j) {
          const int64_t nj = n >> j;
          dwt_row(in_b[0][j - 1] + t * (2 * nj), nj, lo, hi, taps, in_b[0][j] + t * nj, in_b[1][j] + t * nj);
        }
      }
      packed.ensure(tile.slot, pp, off, r, layout, cols, rows);
      const int64_t ldu = r * nblocks;
      u.resize(nt * ldu);
      int64_t c = 0;
      for (size_t gi = 0; gi < cols.size(); ++gi) {
        const Group& g = cols[gi];
        const int64_t rg = r * static_cast<int64_t>(g.blocks.size());
        shrink(in_b[g.band.detail][g.band.level], g.len, nt, packed.data.data() + packed.a_at[gi], g.len, rg, g.len,
               u.data() + c, ldu);
        for (size_t k = 0; k < g.blocks.size(); ++k) ucol[g.blocks[k]] = c + static_cast<int64_t>(k) * r;
        c += rg;
      }
      for (size_t gi = 0; gi < rows.size(); ++gi) {
        const Group& g = rows[gi];
        const int64_t rg = r * static_cast<int64_t>(g.blocks.size());
        ug.resize(nt * rg);
        for (int64_t t = 0; t < nt; ++t)
          for (size_t k = 0; k < g.blocks.size(); ++k)
            std::copy_n(u.data() + t * ldu + ucol[g.blocks[k]], r, ug.data() + t * rg + static_cast<int64_t>(k) * r);
        expand<false>(ug.data(), rg, nt, packed.data.data() + packed.bt_at[gi], rg, g.len,
                      out_b[g.band.detail][g.band.level], g.len);
      }
      for (int64_t t = 0; t < nt; ++t) {
        for (int j = levels; j >= 2; --j) {
          const int64_t mj = m >> j;
          idwt_row_add(out_b[0][j] + t * mj, out_b[1][j] + t * mj, mj, lo, hi, taps, out_b[0][j - 1] + t * (2 * mj));
        }
        idwt_row_add(out_b[0][1] + t * (m >> 1), out_b[1][1] + t * (m >> 1), m >> 1, lo, hi, taps,
                     yp + (tile.t0 + t) * ldy);
      }
    }
  });
}

void wavelet_lowrank_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
                         const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank,
                         int64_t levels, const at::Tensor& dec_lo, const at::Tensor& dec_hi) {
  constexpr const char* op = "wara::wavelet_lowrank";
  check_cpu(op, x, y, pool, token_slot, slot_offset, slot_rank);
  const Filters f = check_wavelet(op, levels, x.size(1), y.size(1), dec_lo, dec_hi);
  const Layout layout = wavelet_layout(x.size(1), y.size(1), static_cast<int>(levels));
  const Tables tab = read_tables(op, x, pool, token_slot, slot_offset, slot_rank, layout);
  const std::vector<Tile> tiles = make_tiles(tab.ts, x.size(0), tab.rank);
  if (tiles.empty()) return;
  dispatch3(x.scalar_type(), pool.scalar_type(), y.scalar_type(), [&](auto tx, auto tp, auto ty) {
    wavelet_typed<decltype(tx), decltype(tp), decltype(ty)>(x, y, pool, tab, tiles, layout, f);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(wara, CPU, m) { m.impl("wavelet_lowrank", &wavelet_lowrank_cpu); }

}  // namespace wara::cpu
