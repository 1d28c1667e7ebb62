// torch.ops.wara: fused multi-adapter low-rank updates for a layer y = W0 x (W0: (m, n)), reading
// the factors of many adapters from one flat pool per layer (layout: layout.h).
//
//   sgmv(x, y, pool, token_slot, slot_offset, slot_rank):
//     y[t] += B_s (A_s x[t])                     for every token t with s = token_slot[t] >= 0
//   wavelet_lowrank(x, y, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi):
//     y[t] += dW_s x[t],  dW_s = sum_b P_row,b^T (B_b A_b) P_col,b  (the J-level inverse 2-D DWT of
//     the blocks C_b = B_b A_b, as wara_train.delta.delta_weight defines it; the scale is folded
//     into B by the packer), computed as: DWT_J of x[t] along the input features; per block
//     u = A_b (x[t]'s band under b's columns); B_b u added into b's row band; inverse DWT_J
//     along the output features. pywt periodization, J = levels, analysis filters dec_lo /
//     dec_hi of an orthogonal wavelet (the synthesis is their adjoint): 2 r (m + n) multiply-adds
//     per token for J = 1, half the folded LoRA's.
//   wavelet_lowrank_set(x, y, bias, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi):
//     y[t] = bias + dW_s x[t] for every token (the bias alone for base rows and empty slots; no
//     bias: 0), y written and never read. What an adapted Linear runs before its base GEMM
//     accumulates into y (y += x W0^T), in place of the bias copy that GEMM would make: y is
//     passed over once, not twice. CPU only.
//   wavelet_lowrank_set_shared(x, ys, biases, pools, token_slot, slot_offsets, slot_ranks, levels, dec_lo,
//                              dec_hi):
//     the same for several layers that share the input x (a query, key and value): one DWT of
//     x and one shrink per band for all of them; layer k's slot tables, pool, bias and output
//     at index k of the lists, every layer's tables over the same slots.
//   wavelet_linear(x, weight, bias, pool, token_slot, slot_offset, slot_rank, levels, dec_lo, dec_hi,
//                  weight_transposed=False) -> y:
//     the whole adapted layer, y = x W0^T + bias + dW_s x in a new y: wavelet_lowrank_set, then the
//     base GEMM accumulating into y. weight: W0 (m, n) as nn.Linear holds it, or W0^T (n, m) with
//     weight_transposed (a Conv1D's); of x's dtype. One call in place of three from Python. x may
//     have more leading dims (batch, seq, n): they are the tokens (token_slot has one entry per
//     token), and y has x's shape with m features.
//   wavelet_linear_shared(x, weights, biases, pools, token_slot, slot_offsets, slot_ranks, levels, dec_lo,
//                         dec_hi, weights_transposed=False) -> ys:
//     the same for layers that share x, from one DWT of x (wavelet_lowrank_set_shared's lists).
//   pack_cache_stats() -> [entries, bytes, hits, misses, capacity bytes]:
//     the CPU wavelet ops keep each slot's factors packed as float32 panels between calls
//     (WARA_PACK_CACHE_MB, default 64 MiB a process, 0: off), known by the pool's storage, data
//     pointer and version counter. So a pool is written in place through the tensor or its
//     views (as any PyTorch op does, which bumps the version), never behind PyTorch's back
//     (`.data`, numpy, DLPack, a raw pointer) without torch.autograd.graph.increment_version.
//
// x: (T, n), y: (T, m), each float32 or bfloat16 (independently; unit stride along features);
// pool: 1-D contiguous, float32 or bfloat16; token_slot: (T,) int64, -1 = base row (no work);
// slot_offset, slot_rank: (S,) int64, a slot of rank 0 holds nothing. All math in float32; y
// is read, added to and rounded once. All tensors on one device (the filters may be on the
// CPU). Bad shapes, dtypes, slots or offsets raise.
#include <torch/library.h>

#include <string>

namespace wara {

std::string build_info() {
  std::string info = "wara_kernels cpu";
#if defined(__AVX512F__)
  info += " avx512";
#elif defined(__AVX2__)
  info += " avx2";
#endif
#if defined(WARA_WITH_CUDA)
  info += " cuda";
#endif
  return info;
}

TORCH_LIBRARY(wara, m) {
  m.def("sgmv(Tensor x, Tensor(a!) y, Tensor pool, Tensor token_slot, Tensor slot_offset, Tensor slot_rank) -> ()");
  m.def(
      "wavelet_lowrank(Tensor x, Tensor(a!) y, Tensor pool, Tensor token_slot, Tensor slot_offset, "
      "Tensor slot_rank, int levels, Tensor dec_lo, Tensor dec_hi) -> ()");
  m.def(
      "wavelet_lowrank_set(Tensor x, Tensor(a!) y, Tensor? bias, Tensor pool, Tensor token_slot, "
      "Tensor slot_offset, Tensor slot_rank, int levels, Tensor dec_lo, Tensor dec_hi) -> ()");
  m.def(
      "wavelet_lowrank_set_shared(Tensor x, Tensor(a!)[] ys, Tensor?[] biases, Tensor[] pools, Tensor token_slot, "
      "Tensor[] slot_offsets, Tensor[] slot_ranks, int levels, Tensor dec_lo, Tensor dec_hi) -> ()");
  m.def(
      "wavelet_linear(Tensor x, Tensor weight, Tensor? bias, Tensor pool, Tensor token_slot, Tensor slot_offset, "
      "Tensor slot_rank, int levels, Tensor dec_lo, Tensor dec_hi, bool weight_transposed=False) -> Tensor");
  m.def(
      "wavelet_linear_shared(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] pools, Tensor token_slot, "
      "Tensor[] slot_offsets, Tensor[] slot_ranks, int levels, Tensor dec_lo, Tensor dec_hi, "
      "bool weights_transposed=False) -> Tensor[]");
  m.def("build_info() -> str", &build_info);
}

}  // namespace wara
