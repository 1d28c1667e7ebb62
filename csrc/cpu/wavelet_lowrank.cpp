// CPU implementation of wara::wavelet_lowrank (schema and semantics: ops.cpp), tiled as
// wara::sgmv is (cpu/sgmv.cpp): per tile, the rows' DWT into float32 bands, each block's
// shrink and expand between bands (cpu/lowrank.h), the inverse cascade into y.
#include "cpu/common.h"
#include "cpu/wavelet.h"

namespace wara::cpu {
namespace {

// The wavelet update of one tile: DWT of its rows along the input features, every block's
// shrink (from its column band) and expand (into its row band), then the inverse cascade of the
// row bands: level j's synthesis adds into the approximation band of level j - 1, the last
// into y.
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
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    int64_t max_nt = 0;
    for (int64_t i = begin; i < end; ++i) max_nt = std::max(max_nt, tiles[i].t1 - tiles[i].t0);
    // Bands of the tile, per level j = 1..J: in_a[j], in_d[j] (nt, n_j); out_a[j], out_d[j] (nt, m_j).
    std::vector<float> in_bands(2 * max_nt * n), out_bands(2 * max_nt * m), u;
    PackedB packed;
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const int64_t r = tab.rank[tile.slot], off = tab.off[tile.slot], nt = tile.t1 - tile.t0;
      float* in_a[17];
      float* in_d[17];
      float* out_a[17];
      float* out_d[17];
      float* p = in_bands.data();
      float* q = out_bands.data();
      for (int j = 1; j <= levels; ++j) {
        in_a[j] = p;
        in_d[j] = p + nt * (n >> j);
        p += 2 * nt * (n >> j);
        out_a[j] = q;
        out_d[j] = q + nt * (m >> j);
        q += 2 * nt * (m >> j);
      }
      std::fill(out_bands.data(), q, 0.f);
      for (int64_t t = 0; t < nt; ++t) {
        dwt_row(xp + (tile.t0 + t) * ldx, n >> 1, lo, hi, taps, in_a[1] + t * (n >> 1), in_d[1] + t * (n >> 1));
        for (int j = 2; j <= levels; ++j) {
          const int64_t nj = n >> j;
          dwt_row(in_a[j - 1] + t * (2 * nj), nj, lo, hi, taps, in_a[j] + t * nj, in_d[j] + t * nj);
        }
      }
      packed.ensure(tile.slot, pp, off, r, layout);
      u.resize(nt * r);
      for (size_t b = 0; b < layout.blocks.size(); ++b) {
        const Block& blk = layout.blocks[b];
        const float* band = (blk.col.detail ? in_d : in_a)[blk.col.level];
        float* out = (blk.row.detail ? out_d : out_a)[blk.row.level];
        shrink(band, blk.n, nt, pp + off + r * blk.prefix, r, blk.n, u.data(), r);
        expand(u.data(), r, nt, packed.data.data() + packed.at[b], r, blk.m, out, blk.m);
      }
      for (int64_t t = 0; t < nt; ++t) {
        for (int j = levels; j >= 2; --j) {
          const int64_t mj = m >> j;
          idwt_row_add(out_a[j] + t * mj, out_d[j] + t * mj, mj, lo, hi, taps, out_a[j - 1] + t * (2 * mj));
        }
        idwt_row_add(out_a[1] + t * (m >> 1), out_d[1] + t * (m >> 1), m >> 1, lo, hi, taps,
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
