// CUDA dispatch of wara::sgmv and wara::wavelet_lowrank: the checks of checks.h (the index
// tables are read on the host: one device-to-host copy per call), then the kernels of
// kernels.cu on torch's current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"
#include "layout.h"

namespace wara::cuda {
namespace {

DType code(at::ScalarType t) { return t == at::kFloat ? DType::F32 : DType::BF16; }

// The checked call: keeps the contiguous index tensors alive until the launch is queued (the
// caching allocator orders their reuse after it on the stream).
struct Prepared {
  at::Tensor token_slot, slot_offset, slot_rank;
  Call call;
};

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
                 const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank,
                 const Layout& layout) {
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel got tensors on ", x.device());
  Prepared p;
  p.token_slot = token_slot.contiguous();
  p.slot_offset = slot_offset.contiguous();
  p.slot_rank = slot_rank.contiguous();
  const int64_t tokens = x.size(0), slots = slot_offset.size(0);
  const at::Tensor host = at::cat({p.token_slot, p.slot_offset, p.slot_rank}).to(at::kCPU);
  const int64_t* h = host.data_ptr<int64_t>();
  const int64_t max_rank = check_tables(op, h, tokens, h + tokens, h + tokens + slots, slots, pool.numel(), layout);
  TORCH_CHECK(max_rank <= (int64_t{1} << 20), op, ": rank ", max_rank, " is too large for the CUDA kernel");
  p.call = Call{x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), pool.data_ptr(),
                p.token_slot.data_ptr<int64_t>(), p.slot_offset.data_ptr<int64_t>(), p.slot_rank.data_ptr<int64_t>(),
                tokens, x.size(1), y.size(1), code(x.scalar_type()), code(pool.scalar_type()),
                code(y.scalar_type()), static_cast<int>(max_rank)};
  return p;
}

void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(e));
}

void sgmv_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool, const at::Tensor& token_slot,
               const at::Tensor& slot_offset, const at::Tensor& slot_rank) {
  constexpr const char* op = "wara::sgmv";
  check_args(op, x, y, pool, token_slot, slot_offset, slot_rank);
  const c10::cuda::CUDAGuard guard(x.device());
  const Prepared p = prepare(op, x, y, pool, token_slot, slot_offset, slot_rank, folded_layout(x.size(1), y.size(1)));
  check_launch(op, launch_sgmv(p.call, c10::cuda::getCurrentCUDAStream().stream()));
}

void wavelet_lowrank_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& pool,
                          const at::Tensor& token_slot, const at::Tensor& slot_offset, const at::Tensor& slot_rank,
                          int64_t levels, const at::Tensor& dec_lo, const at::Tensor& dec_hi) {
  constexpr const char* op = "wara::wavelet_lowrank";
  check_args(op, x, y, pool, token_slot, slot_offset, slot_rank);
  const Filters f = check_wavelet(op, levels, x.size(1), y.size(1), dec_lo, dec_hi);
  TORCH_CHECK(levels <= kMaxLevels, op, ": the CUDA kernel takes at most ", kMaxLevels, " levels, got ", levels);
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = wavelet_layout(x.size(1), y.size(1), static_cast<int>(levels));
  const Prepared p = prepare(op, x, y, pool, token_slot, slot_offset, slot_rank, layout);
  Wavelet w{};
  w.levels = static_cast<int>(levels);
  w.taps = f.taps;
  w.blocks = static_cast<int>(layout.blocks.size());
  for (int i = 0; i < f.taps; ++i) {
    w.lo[i] = f.lo[i];
    w.hi[i] = f.hi[i];
  }
  for (int b = 0; b < w.blocks; ++b) {
    const Block& blk = layout.blocks[b];
    w.block[b] = BlockDesc{blk.n, blk.m, blk.prefix, blk.col.level, blk.col.detail ? 1 : 0, blk.row.detail ? 1 : 0};
  }
  int optin = 0;
  check_launch(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  const size_t bytes = wavelet_shared_bytes(p.call, w);
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": a token's bands and ranks need ", bytes,
              " bytes of shared memory, more than this GPU's ", optin, " (use the Triton kernels)");
  check_launch(op, launch_wavelet(p.call, w, c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(wara, CUDA, m) {
  m.impl("sgmv", &sgmv_cuda);
  m.impl("wavelet_lowrank", &wavelet_lowrank_cuda);
}

}  // namespace wara::cuda
