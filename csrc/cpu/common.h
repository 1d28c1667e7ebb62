// What the CPU implementations of both ops share: cutting tokens into tiles, reading the
// checked index tables, the per-thread transposed B factors, the dtype dispatch.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include <unistd.h>

#include "checks.h"
#include "cpu/lowrank.h"
#include "cpu/simd.h"
#include "layout.h"

namespace wara::cpu {

// A float32 buffer aligned to 64 bytes (a cache line), so vector rows whose length is a
// multiple of 16 floats never straddle lines.
class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(int64_t n) { resize(n); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(p_); }
  void resize(int64_t n) {
    if (n <= cap_) return;
    std::free(p_);
    p_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(round_up(n)) * sizeof(float)));
    TORCH_CHECK(p_ != nullptr, "wara: out of memory for a ", n, "-float scratch buffer");
    cap_ = round_up(n);
  }
  float* data() { return p_; }
  const float* data() const { return p_; }
  int64_t capacity() const { return cap_; }

  // n rounded up to whole cache lines of floats
  static int64_t round_up(int64_t n) { return (n + 15) / 16 * 16; }

 private:
  float* p_ = nullptr;
  int64_t cap_ = 0;
};

inline int64_t round_up(int64_t n) { return AlignedFloats::round_up(n); }

// Whether set mode writes a call's y (every layer's, `bytes` in all) with streaming stores: where y
// is larger than twice the threads' L2, its lines leave the caches before the base GEMM that
// follows reads them, so reading each line for ownership before writing it only doubles the
// traffic. Measured on the 2-core VM (L2 1.25 MiB a core; MiniLM layers, WaRA r=4 haar J=1,
// the fused layer over the base GEMM, interleaved in one process): 1536-wide y at 1024 and 2048
// tokens (6 and 12 MiB) 1.08 -> 1.05 and 1.08 -> 1.02; 384-wide at 4096 (6 MiB) 1.17 -> 1.13;
// at 3 MiB and less no gain, and at 1.5 MiB a loss.
inline bool stream_y(int64_t bytes) {
  static const int64_t l2 = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{1} << 20;
  }();
  return bytes > 2 * l2 * std::max(1, at::get_num_threads());
}

struct Tile {
  int64_t slot, t0, t1;
};

// Runs of consecutive tokens on one adapted slot, cut into tiles of at most `max_tokens`; base
// rows (slot -1) and slots of rank 0 produce none.
inline std::vector<Tile> make_tiles(const int64_t* token_slot, int64_t tokens, const int64_t* slot_rank) {
  int64_t adapted = 0;
  for (int64_t t = 0; t < tokens; ++t) adapted += token_slot[t] >= 0 && slot_rank[token_slot[t]] > 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough tiles for every thread twice over, but never tiles so small that the factors are
  // re-read for a handful of tokens.
  const int64_t max_tokens = std::clamp<int64_t>((adapted + 2 * threads - 1) / (2 * threads), 8, 64);
  std::vector<Tile> tiles;
  int64_t t = 0;
  while (t < tokens) {
    const int64_t s = token_slot[t];
    int64_t end = t + 1;
    while (end < tokens && token_slot[end] == s) ++end;
    if (s >= 0 && slot_rank[s] > 0)
      for (int64_t a = t; a < end; a += max_tokens) tiles.push_back({s, a, std::min(end, a + max_tokens)});
    t = end;
  }
  return tiles;
}

struct Tables {
  at::Tensor token_slot, slot_offset, slot_rank;  // contiguous CPU int64
  const int64_t* ts;
  const int64_t* off;
  const int64_t* rank;
  int64_t max_rank;
};

inline Tables read_tables(const char* op, const at::Tensor& x, const at::Tensor& pool, const at::Tensor& token_slot,
                   const at::Tensor& slot_offset, const at::Tensor& slot_rank, const Layout& layout) {
  Tables t;
  t.token_slot = token_slot.contiguous();
  t.slot_offset = slot_offset.contiguous();
  t.slot_rank = slot_rank.contiguous();
  t.ts = t.token_slot.data_ptr<int64_t>();
  t.off = t.slot_offset.data_ptr<int64_t>();
  t.rank = t.slot_rank.data_ptr<int64_t>();
  t.max_rank = check_tables(op, t.ts, x.size(0), t.off, t.rank, slot_offset.size(0), pool.numel(), layout);
  return t;
}

// The transposed B factors of one slot, kept by a thread while its tiles stay on that slot.
struct PackedB {
  int64_t slot = -1;
  std::vector<float> data;
  std::vector<int64_t> at;  // per block: offset of its (r, m_b) transpose in data

  template <typename TP>
  void ensure(int64_t s, const TP* pool, int64_t offset, int64_t r, const Layout& layout) {
    if (s == slot) return;
    at.clear();
    int64_t total = 0;
    for (const Block& b : layout.blocks) {
      at.push_back(total);
      total += r * b.m;
    }
    data.resize(total);
    for (size_t i = 0; i < layout.blocks.size(); ++i) {
      const Block& b = layout.blocks[i];
      pack_bt(pool + offset + r * b.prefix + r * b.n, b.m, r, data.data() + at[i]);
    }
    slot = s;
  }
};

// Calls fn(TX{}, TP{}, TY{}) with the runtime dtypes of x, pool and y (each float32 or bfloat16).
template <typename Fn>
void dispatch3(at::ScalarType tx, at::ScalarType tp, at::ScalarType ty, Fn&& fn) {
  auto on_y = [&](auto x_tag, auto p_tag) {
    if (ty == at::kFloat) fn(x_tag, p_tag, float{});
    else fn(x_tag, p_tag, bf16{});
  };
  auto on_p = [&](auto x_tag) {
    if (tp == at::kFloat) on_y(x_tag, float{});
    else on_y(x_tag, bf16{});
  };
  if (tx == at::kFloat) on_p(float{});
  else on_p(bf16{});
}

inline void check_cpu(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
               const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank) {
  check_args(op, x, y, pool, token_slot, slot_offset, slot_rank);
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got tensors on ", x.device());
}

}  // namespace wara::cpu
