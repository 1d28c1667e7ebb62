// CPU implementation of wara::wavelet_lowrank (schema and semantics: ops.cpp), tiled as
// wara::sgmv is (cpu/sgmv.cpp): per tile, the rows' DWT into float32 bands, each block's
// shrink and expand between bands (cpu/lowrank.h), the inverse cascade into y.
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

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

// One layer of a call: its y, pool, checked tables, layout and output groups, and (set mode) the
// row every y row starts from. Layers of one call share x, the token slots and the wavelet, so
// their input groups are the same (the block order depends only on J).
struct Member {
  const at::Tensor* y;
  const at::Tensor* pool;
  Tables tab;
  Layout layout;
  std::vector<Group> rows;
  std::vector<float> init;
  bool written[2][17] = {};
  int64_t version = -1;  // the pool's version counter at the call (-1: an inference tensor, which has none)
};

// A thread's float32 copy of one slot's factors in every layer, kept while its tiles stay on that
// slot: per input group the stacked A (R_g, n_g) rows of every layer's blocks (one shrink serves
// all the layers); per layer and output group its stacked B^T packed in panels.
struct PackedWavelet {
  int64_t slot = -1;
  AlignedFloats data;
  std::vector<int64_t> a_at, a_rank;          // per input group: offset, stacked rank R_g
  std::vector<std::vector<int64_t>> bt_at;    // per layer, per output group
  std::vector<std::vector<int64_t>> ucol;     // per layer, per block: its first column of U
  int64_t ldu = 0;

  template <typename TP>
  void ensure(int64_t s, const std::vector<Member>& members, const std::vector<Group>& cols) {
    if (s == slot) return;
    const size_t layers = members.size();
    a_at.assign(cols.size(), 0);
    a_rank.assign(cols.size(), 0);
    bt_at.assign(layers, {});
    ucol.assign(layers, std::vector<int64_t>(members[0].layout.blocks.size(), 0));
    int64_t total = 0;
    ldu = 0;
    for (size_t gi = 0; gi < cols.size(); ++gi) {
      a_at[gi] = total;
      for (const Member& mb : members) a_rank[gi] += mb.tab.rank[s] * static_cast<int64_t>(cols[gi].blocks.size());
      total += round_up(a_rank[gi] * cols[gi].len);
      ldu += a_rank[gi];
    }
    for (size_t k = 0; k < layers; ++k) {
      const int64_t r = members[k].tab.rank[s];
      for (const Group& g : members[k].rows) {
        bt_at[k].push_back(total);
        total += round_up(r * static_cast<int64_t>(g.blocks.size()) * g.len);
      }
    }
    data.resize(total);
    int64_t c = 0;
    for (size_t gi = 0; gi < cols.size(); ++gi) {
      float* dst = data.data() + a_at[gi];
      for (size_t k = 0; k < layers; ++k) {
        const Member& mb = members[k];
        const int64_t r = mb.tab.rank[s], off = mb.tab.off[s];
        const TP* pool = reinterpret_cast<const TP*>(mb.pool->data_ptr());
        for (int b : cols[gi].blocks) {
          const Block& blk = mb.layout.blocks[b];
          const TP* src = pool + off + r * blk.prefix;
          for (int64_t i = 0; i < r * blk.n; ++i) dst[i] = to_float(src[i]);
          dst += r * blk.n;
          ucol[k][b] = c;
          c += r;
        }
      }
    }
    for (size_t k = 0; k < layers; ++k) {
      const Member& mb = members[k];
      const int64_t r = mb.tab.rank[s], off = mb.tab.off[s];
      if (r == 0) continue;
      const TP* pool = reinterpret_cast<const TP*>(mb.pool->data_ptr());
      for (size_t gi = 0; gi < mb.rows.size(); ++gi) {
        const Group& g = mb.rows[gi];
        const int64_t rg = r * static_cast<int64_t>(g.blocks.size());
        for (size_t i = 0; i < g.blocks.size(); ++i) {
          const Block& blk = mb.layout.blocks[g.blocks[i]];
          pack_bt(pool + off + r * blk.prefix + r * blk.n, blk.m, r, data.data() + bt_at[k][gi], r, rg,
                  static_cast<int64_t>(i) * r);
        }
      }
    }
    slot = s;
  }
};

// Packed factors kept between calls, so a call reads a slot's float32 panels instead of packing
// them again per thread (at 64 tokens the packing was a quarter of the op's time). An entry is
// known by what its packing read: per layer the pool (its storage, data pointer and version
// counter, which every in-place write through the tensor or a view of it bumps), the slot's
// offset and rank and the layer's width; and the levels, input width and pool dtype. A write to a
// pool changes its version, so entries packed before it are never found again (LRU evicts them).
// The cache holds weak references to the pools' storages: a storage's address is not reused while
// one is held, so a freed pool's entries cannot be taken for a new pool's. Bounded by
// WARA_PACK_CACHE_MB (default 64; 0 turns it off).
class PackCache {
 public:
  using Key = std::vector<int64_t>;

  // Never destroyed: a thread still serving when the process exits may be inside find or put.
  static PackCache& get() {
    static PackCache* cache = new PackCache;
    return *cache;
  }
  bool enabled() const { return cap_ > 0; }

  std::shared_ptr<const PackedWavelet> find(const Key& key) {
    std::vector<Entry> dropped;  // destroyed after the lock is released (a storage's last reference may go)
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key);
    if (it == map_.end()) {
      ++misses_;
      return nullptr;
    }
    for (const auto& w : it->second.pools)
      if (w.expired()) {  // a pool of this key was freed: the entry can never be right again
        dropped.push_back(drop(it));
        ++misses_;
        return nullptr;
      }
    ++hits_;
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.packed;
  }

  void put(Key key, std::shared_ptr<const PackedWavelet> packed,
           std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> pools) {
    const size_t bytes = static_cast<size_t>(packed->data.capacity()) * sizeof(float);
    if (bytes > cap_) return;
    std::vector<Entry> dropped;
    std::lock_guard<std::mutex> lock(mu_);
    if (map_.count(key)) return;  // another thread packed it meanwhile
    auto it = map_.emplace(std::move(key), Entry{std::move(packed), std::move(pools), {}, bytes}).first;
    lru_.push_front(it->first);
    it->second.lru = lru_.begin();
    bytes_ += bytes;
    while (bytes_ > cap_) dropped.push_back(drop(map_.find(lru_.back())));
  }

  // entries, bytes, hits, misses, capacity in bytes
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(map_.size()), static_cast<int64_t>(bytes_), hits_, misses_,
            static_cast<int64_t>(cap_)};
  }

 private:
  struct Entry {
    std::shared_ptr<const PackedWavelet> packed;
    std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> pools;
    std::list<Key>::iterator lru;
    size_t bytes;
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      size_t h = 1469598103934665603ull;
      for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
      return h;
    }
  };

  PackCache() {
    double mb = 64.0;
    if (const char* env = std::getenv("WARA_PACK_CACHE_MB")) {
      char* end = nullptr;
      const double v = std::strtod(env, &end);
      if (end != env && *end == '\0' && v >= 0 && v <= (1 << 20)) {
        mb = v;
      } else {
        TORCH_WARN("wara: WARA_PACK_CACHE_MB=", env, " is not a number of MiB in [0, 1048576]; using 64");
      }
    }
    cap_ = static_cast<size_t>(mb * (1 << 20));
  }
  Entry drop(std::unordered_map<Key, Entry, Hash>::iterator it) {
    Entry e = std::move(it->second);
    bytes_ -= e.bytes;
    lru_.erase(e.lru);
    map_.erase(it);
    return e;
  }

  std::mutex mu_;
  std::unordered_map<Key, Entry, Hash> map_;
  std::list<Key> lru_;
  size_t bytes_ = 0, cap_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// A call's source of packed factors for slot s: the cache where every pool has a version counter,
// else the thread's own packing (`own`, re-packed when its slot changes).
template <typename TP>
const PackedWavelet* packed_for(int64_t s, const std::vector<Member>& members, const std::vector<Group>& cols,
                                bool cached, PackedWavelet& own, std::shared_ptr<const PackedWavelet>& held) {
  if (!cached) {
    own.ensure<TP>(s, members, cols);
    return &own;
  }
  PackCache::Key key{members[0].layout.levels, members[0].layout.n, static_cast<int64_t>(members[0].pool->scalar_type())};
  for (const Member& mb : members) {
    const at::Tensor& pool = *mb.pool;
    key.insert(key.end(), {reinterpret_cast<int64_t>(pool.storage().unsafeGetStorageImpl()),
                           reinterpret_cast<int64_t>(pool.data_ptr()), mb.version, mb.tab.off[s], mb.tab.rank[s],
                           mb.layout.m});
  }
  PackCache& cache = PackCache::get();
  held = cache.find(key);
  if (!held) {
    auto p = std::make_shared<PackedWavelet>();
    p->ensure<TP>(s, members, cols);
    std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> pools;
    for (const Member& mb : members) pools.push_back(mb.pool->storage().getWeakStorageImpl());
    held = p;
    cache.put(std::move(key), std::move(p), std::move(pools));
  }
  return held.get();
}

// dst[0:r] = src[0:r] for the few floats of one block's ranks, inline: a library memmove call
// per (token, block) was a tenth of the op's time at rank 4.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) inline void copy_ranks(const float* src, int64_t r,
                                                                                      float* dst) {
  int64_t j = 0;
  for (; j + kW <= r; j += kW) store(dst + j, load(src + j));
  for (; j < r; ++j) dst[j] = src[j];
}

// The bands of a tile of nt rows of a width-`len` signal: per level j = 1..J the approximation
// and the detail (nt, len >> j), each rounded up to whole cache lines, from `base`; with
// `bands`, bands[d][j] is set to each. Returns the floats they take (what a buffer needs).
inline int64_t lay_bands(float* base, int64_t nt, int64_t len, int levels, float* (*bands)[17]) {
  int64_t at = 0;
  for (int j = 1; j <= levels; ++j)
    for (int d = 0; d < 2; ++d) {
      if (bands) bands[d][j] = base + at;
      at += round_up(nt * (len >> j));
    }
  return at;
}

// y[0:m] = row, rounded to y's dtype once.
template <typename TY>
inline void store_row(const float* row, int64_t m, TY* y) {
  if constexpr (std::is_same_v<TY, float>) {
    std::copy_n(row, m, y);
  } else {
    for (int64_t i = 0; i < m; ++i) assign(y[i], row[i]);
  }
}

// The wavelet update of one tile in every layer: DWT of its rows along the input features (once
// for all the layers); per input group one shrink into U (every layer's blocks' ranks side by
// side); per layer, per output group its blocks' columns of U gathered and one expand storing its
// row band, then the inverse cascade of the row bands: level j's synthesis adds into the
// approximation band of level j - 1, the last into y.
//
// Set mode (`set`: wavelet_lowrank_set): y is written, not read: each adapted token's row is
// init + its update, summed in float32 and rounded once; every other row is init.
template <typename TX, typename TP, typename TY>
void wavelet_typed(const at::Tensor& x, const std::vector<Member>& members, const int64_t* token_slot,
                   const int64_t* slot_rank, const std::vector<Tile>& tiles, const Filters& f, bool set) {
  const TX* xp = reinterpret_cast<const TX*>(x.data_ptr());
  const int64_t ldx = x.stride(0), n = x.size(1);
  const int levels = members[0].layout.levels, taps = f.taps;
  const float* lo = f.lo.data();
  const float* hi = f.hi.data();
  const std::vector<Group> cols = group_blocks(members[0].layout, false);
  int64_t max_m = 0;
  bool cached = PackCache::get().enabled();
  int64_t y_bytes = 0;
  for (const Member& mb : members) {
    max_m = std::max(max_m, mb.layout.m);
    cached = cached && mb.version >= 0;
    y_bytes += x.size(0) * mb.layout.m * static_cast<int64_t>(sizeof(TY));
  }
  const bool stream = set && std::is_same_v<TY, float> && stream_y(y_bytes);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    int64_t max_nt = 0;
    for (int64_t i = begin; i < end; ++i) max_nt = std::max(max_nt, tiles[i].t1 - tiles[i].t0);
    // Bands of the tile, per level j = 1..J: in_a[j], in_d[j] (nt, n_j); out_a[j], out_d[j] (nt, m_j).
    AlignedFloats in_bands(lay_bands(nullptr, max_nt, n, levels, nullptr)),
        out_bands(lay_bands(nullptr, max_nt, max_m, levels, nullptr)), u, ug;
    PackedWavelet own;
    std::shared_ptr<const PackedWavelet> held;
    const PackedWavelet* pk = nullptr;
    int64_t pk_slot = -1;
    for (int64_t i = begin; i < end; ++i) {
      const Tile& tile = tiles[i];
      const int64_t nt = tile.t1 - tile.t0;
      float* in_b[2][17];
      lay_bands(in_bands.data(), nt, n, levels, in_b);
      for (int64_t t = 0; t < nt; ++t) {
        dwt_row(xp + (tile.t0 + t) * ldx, n >> 1, lo, hi, taps, in_b[0][1] + t * (n >> 1), in_b[1][1] + t * (n >> 1));
        for (int j = 2; j <= levels; ++j) {
          const int64_t nj = n >> j;
          dwt_row(in_b[0][j - 1] + t * (2 * nj), nj, lo, hi, taps, in_b[0][j] + t * nj, in_b[1][j] + t * nj);
        }
      }
      if (tile.slot != pk_slot) {
        pk = packed_for<TP>(tile.slot, members, cols, cached, own, held);
        pk_slot = tile.slot;
      }
      const PackedWavelet& packed = *pk;
      const int64_t ldu = packed.ldu;
      u.resize(nt * ldu);
      int64_t c = 0;
      for (size_t gi = 0; gi < cols.size(); ++gi) {
        const Group& g = cols[gi];
        const int64_t rg = packed.a_rank[gi];
        if (rg > 0)
          shrink(in_b[g.band.detail][g.band.level], g.len, nt, packed.data.data() + packed.a_at[gi], g.len, rg, g.len,
                 u.data() + c, ldu);
        c += rg;
      }
      for (size_t k = 0; k < members.size(); ++k) {
        const Member& mb = members[k];
        const int64_t r = mb.tab.rank[tile.slot], m = mb.layout.m, ldy = mb.y->stride(0);
        TY* yp = reinterpret_cast<TY*>(mb.y->data_ptr()) + tile.t0 * ldy;
        if (r == 0) {  // this layer's slot is empty (the adapter skips it): y unchanged, or init
          if (set)
            for (int64_t t = 0; t < nt; ++t) store_row(mb.init.data(), m, yp + t * ldy);
          continue;
        }
        float* out_b[2][17];
        lay_bands(out_bands.data(), nt, m, levels, out_b);
        for (int j = 1; j <= levels; ++j)
          for (int e = 0; e < 2; ++e)  // bands written by no expand (none for wavelet_layout) start at 0
            if (!mb.written[e][j]) std::fill(out_b[e][j], out_b[e][j] + nt * (m >> j), 0.f);
        for (size_t gi = 0; gi < mb.rows.size(); ++gi) {
          const Group& g = mb.rows[gi];
          const int64_t rg = r * static_cast<int64_t>(g.blocks.size());
          ug.resize(nt * rg);
          for (int64_t t = 0; t < nt; ++t)
            for (size_t b = 0; b < g.blocks.size(); ++b)
              copy_ranks(u.data() + t * ldu + packed.ucol[k][g.blocks[b]], r,
                         ug.data() + t * rg + static_cast<int64_t>(b) * r);
          expand<false>(ug.data(), rg, nt, packed.data.data() + packed.bt_at[k][gi], rg, g.len,
                        out_b[g.band.detail][g.band.level], g.len);
        }
        for (int64_t t = 0; t < nt; ++t) {
          for (int j = levels; j >= 2; --j) {
            const int64_t mj = m >> j;
            idwt_row_add(out_b[0][j] + t * mj, out_b[1][j] + t * mj, mj, lo, hi, taps, out_b[0][j - 1] + t * (2 * mj));
          }
          const float* a1 = out_b[0][1] + t * (m >> 1);
          const float* d1 = out_b[1][1] + t * (m >> 1);
          if (set) {
            idwt_row_set(a1, d1, m >> 1, lo, hi, taps, mb.init.data(), yp + t * ldy, stream);
          } else {
            idwt_row_add(a1, d1, m >> 1, lo, hi, taps, yp + t * ldy);
          }
        }
      }
    }
    if (stream) stream_fence();  // this thread's streamed rows visible before the caller reads y
  });
  if (!set) return;
  at::parallel_for(0, x.size(0), 64, [&](int64_t begin, int64_t end) {  // rows in no tile: init
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = token_slot[t];
      if (s >= 0 && slot_rank[s] > 0) continue;
      for (const Member& mb : members)
        store_row(mb.init.data(), mb.layout.m, reinterpret_cast<TY*>(mb.y->data_ptr()) + t * mb.y->stride(0));
    }
  });
}

// What an error about layer k of a call over `layers` layers names: "op (layer k)", or op alone.
inline std::string layer_op(const char* op, size_t k, size_t layers) {
  return layers > 1 ? std::string(op) + " (layer " + std::to_string(k) + ")" : std::string(op);
}

// The checks and the run of one call over `ys.size()` layers that share x (set mode: `biases`
// holds one optional bias per layer).
void run_wavelet(const char* op, const at::Tensor& x, at::TensorList ys, at::TensorList pools,
                 const at::Tensor& token_slot, at::TensorList slot_offsets, at::TensorList slot_ranks, int64_t levels,
                 const at::Tensor& dec_lo, const at::Tensor& dec_hi, bool set,
                 const std::vector<std::optional<at::Tensor>>* biases) {
  const size_t layers = ys.size();
  TORCH_CHECK(layers >= 1 && pools.size() == layers && slot_offsets.size() == layers && slot_ranks.size() == layers &&
                  (!biases || biases->size() == layers),
              op, ": ys, pools, slot_offsets, slot_ranks", biases ? " and biases" : "",
              " need one entry per layer, got ", layers, ", ", pools.size(), ", ", slot_offsets.size(), ", ",
              slot_ranks.size(), biases ? ", " + std::to_string(biases->size()) : std::string());
  std::vector<Member> members(layers);
  std::vector<std::string> names;
  for (size_t k = 0; k < layers; ++k) names.push_back(layer_op(op, k, layers));
  for (size_t k = 0; k < layers; ++k) {
    const char* opk = names[k].c_str();
    check_cpu(opk, x, ys[k], pools[k], token_slot, slot_offsets[k], slot_ranks[k]);
    TORCH_CHECK(ys[k].scalar_type() == ys[0].scalar_type() && pools[k].scalar_type() == pools[0].scalar_type(), opk,
                ": every layer's y and pool need one dtype each, got y ", ys[k].scalar_type(), " and ",
                ys[0].scalar_type(), ", pool ", pools[k].scalar_type(), " and ", pools[0].scalar_type());
    TORCH_CHECK(slot_ranks[k].size(0) == slot_ranks[0].size(0), opk, ": every layer needs the same slots, got ",
                slot_ranks[k].size(0), " and ", slot_ranks[0].size(0));
    Member& mb = members[k];
    mb.y = &ys[k];
    mb.pool = &pools[k];
    check_wavelet(opk, levels, x.size(1), ys[k].size(1), dec_lo, dec_hi);
    mb.layout = wavelet_layout(x.size(1), ys[k].size(1), static_cast<int>(levels));
    mb.tab = read_tables(opk, x, pools[k], token_slot, slot_offsets[k], slot_ranks[k], mb.layout);
    mb.rows = group_blocks(mb.layout, true);
    for (const Group& g : mb.rows) mb.written[g.band.detail][g.band.level] = true;
    if (set) mb.init = check_bias(opk, (*biases)[k], ys[k]);
    if (!pools[k].is_inference()) mb.version = pools[k]._version();
  }
  const Filters f = check_wavelet(op, levels, x.size(1), ys[0].size(1), dec_lo, dec_hi);
  // A token is in a tile where its slot has rank in any layer.
  const int64_t slots = slot_ranks[0].size(0);
  std::vector<int64_t> any_rank(static_cast<size_t>(slots), 0);
  for (const Member& mb : members)
    for (int64_t s = 0; s < slots; ++s) any_rank[s] = std::max(any_rank[s], mb.tab.rank[s]);
  const int64_t* ts = members[0].tab.ts;
  const std::vector<Tile> tiles = make_tiles(ts, x.size(0), any_rank.data());
  if (tiles.empty() && !set) return;
  dispatch3(x.scalar_type(), pools[0].scalar_type(), ys[0].scalar_type(), [&](auto tx, auto tp, auto ty) {
    wavelet_typed<decltype(tx), decltype(tp), decltype(ty)>(x, members, ts, any_rank.data(), tiles, f, set);
  });
}

void wavelet_lowrank_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
                         const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank,
                         int64_t levels, const at::Tensor& dec_lo, const at::Tensor& dec_hi) {
  run_wavelet("wara::wavelet_lowrank", x, y, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi, false,
              nullptr);
}

void wavelet_lowrank_set_cpu(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                             const at::Tensor& pool, const at::Tensor& token_slot, const at::Tensor& slot_offset,
                             const at::Tensor& slot_rank, int64_t levels, const at::Tensor& dec_lo,
                             const at::Tensor& dec_hi) {
  const std::vector<std::optional<at::Tensor>> biases{bias};
  run_wavelet("wara::wavelet_lowrank_set", x, y, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi, true,
              &biases);
}

void wavelet_lowrank_set_shared_cpu(const at::Tensor& x, at::TensorList ys,
                                    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList pools,
                                    const at::Tensor& token_slot, at::TensorList slot_offsets,
                                    at::TensorList slot_ranks, int64_t levels, const at::Tensor& dec_lo,
                                    const at::Tensor& dec_hi) {
  std::vector<std::optional<at::Tensor>> b;
  for (size_t k = 0; k < biases.size(); ++k) b.push_back(biases.get(k));
  run_wavelet("wara::wavelet_lowrank_set_shared", x, ys, pools, token_slot, slot_offsets, slot_ranks, levels, dec_lo,
              dec_hi, true, &b);
}

// W0^T of a 2-D base weight for y += x W0^T: a Linear's (m, n) weight transposed, a Conv1D's
// (n, m) as it is (`transposed`), checked against x and y.
at::Tensor base_weight_t(const char* op, const at::Tensor& weight, bool transposed, const at::Tensor& x,
                         const at::Tensor& y) {
  const at::Tensor w_t = transposed ? weight : weight.t();
  TORCH_CHECK(w_t.size(0) == x.size(1) && w_t.size(1) == y.size(1), op, ": weight of shape ", weight.sizes(),
              transposed ? " (in_features, out_features)" : " (out_features, in_features)", " does not fit x ",
              x.sizes(), " and ", y.size(1), " outputs");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight is ", weight.scalar_type(), " but x is ",
              x.scalar_type(), " (the base GEMM takes one dtype)");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), ", x on ", x.device());
  return w_t;
}

// The whole adapted layers, y_k = x W_k^T + b_k + dW_s,k x: the set op into a new y_k, then each
// base GEMM accumulating into it. One call from Python in place of three (an allocation, the set
// op, addmm_): at one token that Python was ~25 us a layer, more than the op and the GEMM.
std::vector<at::Tensor> run_linear(const char* op, const at::Tensor& x, at::TensorList weights, bool transposed,
                                   const std::vector<std::optional<at::Tensor>>& biases, at::TensorList pools,
                                   const at::Tensor& token_slot, at::TensorList slot_offsets,
                                   at::TensorList slot_ranks, int64_t levels, const at::Tensor& dec_lo,
                                   const at::Tensor& dec_hi) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (..., in_features), at least 2-D, got shape ", x.sizes());
  TORCH_CHECK(!weights.empty(), op, ": needs at least one layer (weights is empty)");
  TORCH_CHECK(weights.size() == biases.size(), op, ": weights and biases need one entry per layer, got ",
              weights.size(), " and ", biases.size());
  // Leading dims are tokens (a view where x is contiguous): each y_k comes back in x's shape, so a
  // caller holding (batch, seq, n) activations reshapes nothing (two Python tensor calls a layer).
  const at::Tensor xt = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  std::vector<at::Tensor> ys, w_ts;
  for (size_t k = 0; k < weights.size(); ++k) {
    const std::string name = layer_op(op, k, weights.size());
    TORCH_CHECK(weights[k].dim() == 2, name, ": weight must be 2-D, got shape ", weights[k].sizes());
    ys.push_back(at::empty({xt.size(0), weights[k].size(transposed ? 1 : 0)}, x.options()));
    w_ts.push_back(base_weight_t(name.c_str(), weights[k], transposed, xt, ys.back()));
  }
  run_wavelet(op, xt, ys, pools, token_slot, slot_offsets, slot_ranks, levels, dec_lo, dec_hi, true, &biases);
  for (size_t k = 0; k < ys.size(); ++k) {
    ys[k].addmm_(xt, w_ts[k]);
    if (x.dim() > 2) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
      shape.push_back(ys[k].size(1));
      ys[k] = ys[k].view(shape);
    }
  }
  return ys;
}

at::Tensor wavelet_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& pool, const at::Tensor& token_slot, const at::Tensor& slot_offset,
                              const at::Tensor& slot_rank, int64_t levels, const at::Tensor& dec_lo,
                              const at::Tensor& dec_hi, bool weight_transposed) {
  return run_linear("wara::wavelet_linear", x, weight, weight_transposed, {bias}, pool, token_slot, slot_offset,
                    slot_rank, levels, dec_lo, dec_hi)[0];
}

std::vector<at::Tensor> wavelet_linear_shared_cpu(const at::Tensor& x, at::TensorList weights,
                                                  const c10::List<std::optional<at::Tensor>>& biases,
                                                  at::TensorList pools, const at::Tensor& token_slot,
                                                  at::TensorList slot_offsets, at::TensorList slot_ranks,
                                                  int64_t levels, const at::Tensor& dec_lo, const at::Tensor& dec_hi,
                                                  bool weights_transposed) {
  std::vector<std::optional<at::Tensor>> b;
  for (size_t k = 0; k < biases.size(); ++k) b.push_back(biases.get(k));
  return run_linear("wara::wavelet_linear_shared", x, weights, weights_transposed, b, pools, token_slot,
                    slot_offsets, slot_ranks, levels, dec_lo, dec_hi);
}

std::vector<int64_t> pack_cache_stats() { return PackCache::get().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(wara, m) { m.def("pack_cache_stats() -> int[]", &pack_cache_stats); }

TORCH_LIBRARY_IMPL(wara, CPU, m) {
  m.impl("wavelet_linear", &wavelet_linear_cpu);
  m.impl("wavelet_linear_shared", &wavelet_linear_shared_cpu);
  m.impl("wavelet_lowrank", &wavelet_lowrank_cpu);
  m.impl("wavelet_lowrank_set", &wavelet_lowrank_set_cpu);
  m.impl("wavelet_lowrank_set_shared", &wavelet_lowrank_set_shared_cpu);
}

}  // namespace wara::cpu
