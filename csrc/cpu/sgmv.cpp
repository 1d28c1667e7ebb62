// CPU implementation of wara::sgmv (schemas and semantics: ops.cpp).
//
// Tokens are cut into tiles: consecutive tokens of one slot (a batch row's tokens are one run),
// at most a few dozen each, so both threads get work even for one short sequence. Tiles run in
// parallel (at::parallel_for gives each thread a contiguous range of them); inside a tile every
// factor is read once for all its tokens (cpu/lowrank.h). B is transposed once per (thread,
// slot): consecutive tiles of a run reuse it.
#include "cpu/common.h"

namespace wara::cpu {
namespace {

template <typename TX, typename TP, typename TY>
void sgmv_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool, const Tables& tab,
                const std::vector<Tile>& tiles, const Layout& layout) {
  const TX* xp = reinterpret_cast<const TX*>(x.data_ptr());
  TY* yp = reinterpret_cast<TY*>(y.data_ptr());
  const TP* pp = reinterpret_cast<const TP*>(pool.data_ptr());
  const int64_t ldx = x.stride(0), ldy = y.stride(0), n = layout.n, m = layout.m;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u;
    PackedB packed;
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const int64_t r = tab.rank[tile.slot], off = tab.off[tile.slot], nt = tile.t1 - tile.t0;
      u.resize(nt * r);
      shrink(xp + tile.t0 * ldx, ldx, nt, pp + off, n, r, n, u.data(), r);
      packed.ensure(tile.slot, pp, off, r, layout);
      expand(u.data(), r, nt, packed.data.data(), r, m, yp + tile.t0 * ldy, ldy);
    }
  });
}

void sgmv_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool, const at::Tensor& token_slot,
              const at::Tensor& slot_offset, const at::Tensor& slot_rank) {
  constexpr const char* op = "wara::sgmv";
  check_cpu(op, x, y, pool, token_slot, slot_offset, slot_rank);
  const Layout layout = folded_layout(x.size(1), y.size(1));
  const Tables tab = read_tables(op, x, pool, token_slot, slot_offset, slot_rank, layout);
  const std::vector<Tile> tiles = make_tiles(tab.ts, x.size(0), tab.rank);
  if (tiles.empty()) return;
  auto run = [&](auto tx, auto tp, auto ty) {
    sgmv_typed<decltype(tx), decltype(tp), decltype(ty)>(x, y, pool, tab, tiles, layout);
  };
  dispatch3(x.scalar_type(), pool.scalar_type(), y.scalar_type(), run);
}

}  // namespace

TORCH_LIBRARY_IMPL(wara, CPU, m) { m.impl("sgmv", &sgmv_cpu); }

}  // namespace wara::cpu
