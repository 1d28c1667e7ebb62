// The CUDA kernels' launch interface (kernels.cu): plain structs and the CUDA runtime only, so
// nvcc compiles kernels.cu without torch's headers (seconds, not minutes); ops_cuda.cpp fills
// the structs from checked tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace wara::cuda {

enum class DType : int { F32 = 0, BF16 = 1 };

// One op call's tensors: x (T, n), y (T, m) with row strides; the pool and the index tables, all
// on the device; the tables already checked on the host.
struct Call {
  const void* x;
  int64_t ldx;
  void* y;
  int64_t ldy;
  const void* pool;
  const int64_t* token_slot;
  const int64_t* slot_offset;
  const int64_t* slot_rank;
  int64_t tokens, n, m;
  DType tx, tp, ty;
  int max_rank;
};

inline constexpr int kMaxTaps = 64;
inline constexpr int kMaxLevels = 8;
inline constexpr int kMaxBlocks = 1 + 3 * kMaxLevels;

// Block b of a slot (layout.h): A (r, n) at offset + r * prefix, B (m, r) after it; reads the
// input band (col_detail, level), adds into the output band (row_detail, level).
struct BlockDesc {
  int64_t n, m, prefix;
  int level, col_detail, row_detail;
};

struct Wavelet {
  int levels, taps, blocks;
  float lo[kMaxTaps], hi[kMaxTaps];
  BlockDesc block[kMaxBlocks];
};

// Shared memory the wavelet kernel needs for one token (bytes).
size_t wavelet_shared_bytes(const Call& c, const Wavelet& w);

cudaError_t launch_sgmv(const Call& c, cudaStream_t stream);
cudaError_t launch_wavelet(const Call& c, const Wavelet& w, cudaStream_t stream);

}  // namespace wara::cuda
