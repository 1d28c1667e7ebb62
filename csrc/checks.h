// Argument checks shared by the CPU and CUDA implementations: every bad shape, dtype, device,
// index or offset is a TORCH_CHECK with a message (a Python RuntimeError), never a crash.
#pragma once

#include <torch/library.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "layout.h"

namespace wara {

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16;
}

// Shapes, dtypes and devices of the common arguments; returns (T, n, m).
inline void check_args(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
                       const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 2, op, ": y must be 2-D (tokens, out_features), got shape ", y.sizes());
  TORCH_CHECK(x.size(0) == y.size(0), op, ": x has ", x.size(0), " tokens but y has ", y.size(0));
  TORCH_CHECK(x.size(1) >= 1 && y.size(1) >= 1, op, ": x and y need at least one feature, got x ", x.sizes(),
              " y ", y.sizes());
  TORCH_CHECK(supported_float(x.scalar_type()) && supported_float(y.scalar_type()) &&
                  supported_float(pool.scalar_type()),
              op, ": x, y and pool must be float32 or bfloat16, got x ", x.scalar_type(), ", y ", y.scalar_type(),
              ", pool ", pool.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && x.stride(0) >= x.size(1) && y.stride(0) >= y.size(1), op,
              ": x and y need unit stride along features and non-overlapping rows, got strides x ", x.strides(),
              " y ", y.strides());
  TORCH_CHECK(pool.dim() == 1 && pool.is_contiguous(), op, ": pool must be a contiguous 1-D tensor, got shape ",
              pool.sizes(), " strides ", pool.strides());
  TORCH_CHECK(token_slot.dim() == 1 && token_slot.size(0) == x.size(0), op,
              ": token_slot must be 1-D with one entry per token (", x.size(0), "), got shape ", token_slot.sizes());
  TORCH_CHECK(slot_offset.dim() == 1 && slot_rank.dim() == 1 && slot_offset.size(0) == slot_rank.size(0), op,
              ": slot_offset and slot_rank must be 1-D of the same length (slots), got ", slot_offset.sizes(), " and ",
              slot_rank.sizes());
  for (const at::Tensor* t : {&token_slot, &slot_offset, &slot_rank}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": token_slot, slot_offset and slot_rank must be int64, got ",
                t->scalar_type());
  }
  const auto dev = x.device();
  for (const at::Tensor* t : {&y, &pool, &token_slot, &slot_offset, &slot_rank}) {
    TORCH_CHECK(t->device() == dev, op, ": all tensors must be on one device: x is on ", dev, ", another on ",
                t->device());
  }
}

// Index tables, read on the host: every token's slot in [-1, S), every slot's rank >= 0 and its
// factors inside the pool. Returns the largest rank of a slot in use.
inline int64_t check_tables(const char* op, const int64_t* token_slot, int64_t tokens, const int64_t* slot_offset,
                            const int64_t* slot_rank, int64_t slots, int64_t pool_numel, const Layout& layout) {
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = slot_rank[s], off = slot_offset[s];
    TORCH_CHECK(r >= 0, op, ": slot ", s, " has negative rank ", r);
    if (r == 0) continue;
    TORCH_CHECK(off >= 0 && off <= pool_numel && r <= (pool_numel - off) / layout.per_rank, op, ": slot ", s,
                " (offset ", off, ", rank ", r, ", ", layout.per_rank, " elements per rank) lies outside the pool of ",
                pool_numel, " elements");
  }
  int64_t max_rank = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t s = token_slot[t];
    TORCH_CHECK(s >= -1 && s < slots, op, ": token ", t, " has slot ", s, ", outside [-1, ", slots, ")");
    if (s >= 0 && slot_rank[s] > max_rank) max_rank = slot_rank[s];
  }
  return max_rank;
}

// The wavelet op's extra arguments: J >= 1 dividing both feature axes, and an orthogonal
// analysis filter pair (dec_lo, dec_hi) of even length. Returns the taps as float.
struct Filters {
  int taps = 0;
  std::vector<float> lo, hi;
};

inline constexpr int kMaxTaps = 64;

inline Filters check_wavelet(const char* op, int64_t levels, int64_t n, int64_t m, const at::Tensor& dec_lo,
                             const at::Tensor& dec_hi) {
  TORCH_CHECK(levels >= 1 && levels <= 16, op, ": levels must be in [1, 16], got ", levels);
  const int64_t step = int64_t{1} << levels;
  TORCH_CHECK(n % step == 0 && m % step == 0, op, ": in_features ", n, " and out_features ", m,
              " must be divisible by 2^levels = ", step, " (levels=", levels, ")");
  TORCH_CHECK(dec_lo.dim() == 1 && dec_hi.dim() == 1 && dec_lo.size(0) == dec_hi.size(0), op,
              ": dec_lo and dec_hi must be 1-D of one length, got ", dec_lo.sizes(), " and ", dec_hi.sizes());
  const int64_t taps = dec_lo.size(0);
  TORCH_CHECK(taps >= 2 && taps % 2 == 0 && taps <= kMaxTaps, op,
              ": the filters need an even number of taps in [2, ", kMaxTaps, "], got ", taps);
  TORCH_CHECK(at::isFloatingType(dec_lo.scalar_type()) && at::isFloatingType(dec_hi.scalar_type()), op,
              ": dec_lo and dec_hi must be floating point, got ", dec_lo.scalar_type(), " and ", dec_hi.scalar_type());
  const at::Tensor lo = dec_lo.to(at::kCPU, at::kDouble).contiguous(), hi = dec_hi.to(at::kCPU, at::kDouble).contiguous();
  Filters f;
  f.taps = static_cast<int>(taps);
  for (int64_t i = 0; i < taps; ++i) {
    f.lo.push_back(static_cast<float>(lo.data_ptr<double>()[i]));
    f.hi.push_back(static_cast<float>(hi.data_ptr<double>()[i]));
  }
  return f;
}

// The optional bias of a *_set op: 1-D, one value per output feature, float32 or bfloat16, on
// y's device. Returns it as float32 on the host (zeros without one).
inline std::vector<float> check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& y) {
  const int64_t m = y.size(1);
  if (!bias.has_value()) return std::vector<float>(static_cast<size_t>(m), 0.f);
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == m, op, ": bias must be 1-D with one value per output feature (", m,
              "), got shape ", b.sizes());
  TORCH_CHECK(supported_float(b.scalar_type()), op, ": bias must be float32 or bfloat16, got ", b.scalar_type());
  TORCH_CHECK(b.device() == y.device(), op, ": bias is on ", b.device(), ", y on ", y.device());
  const at::Tensor f = b.to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + m);
}

}  // namespace wara
