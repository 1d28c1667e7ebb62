// CUDA kernels of wara::sgmv and wara::wavelet_lowrank (semantics: ops.cpp; layout: layout.h).
//
// Deliberately plain: one thread block per token (a base row's block returns at once), the
// token's row and its low-rank vector in shared memory, float32 math. Each block reads its
// slot's factors from global memory (L2 serves the tokens of a run that share them). The Triton
// kernels (runtime/native/triton_ops.py) are the tiled GPU path; these are the native twin the
// dispatcher can call without a JIT.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace wara::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void add_to(float* p, float v) { *p += v; }
__device__ __forceinline__ void add_to(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(__bfloat162float(*p) + v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int64_t wrap(int64_t q, int64_t len) {
  const int64_t r = q % len;
  return r < 0 ? r + len : r;
}

// u[k] = sum_i a[k * n + i] v[i] for k < r: one warp per k.
template <typename TA, typename TV>
__device__ void shrink(const TA* a, const TV* v, int64_t n, int64_t r, float* u) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t k = warp; k < r; k += warps) {
    float acc = 0.f;
    for (int64_t i = lane; i < n; i += 32) acc += to_f(a[k * n + i]) * to_f(v[i]);
    acc = warp_sum(acc);
    if (lane == 0) u[k] = acc;
  }
}

// y[t] += B_s (A_s x[t]), token t = blockIdx.x.
template <typename TX, typename TP, typename TY>
__global__ void sgmv_kernel(Call c) {
  extern __shared__ float u[];  // the token's r values
  const int64_t t = blockIdx.x;
  const int64_t s = c.token_slot[t];
  if (s < 0) return;  // block-uniform: no thread reaches the barrier
  const int64_t r = c.slot_rank[s];
  if (r == 0) return;
  const TP* a = static_cast<const TP*>(c.pool) + c.slot_offset[s];
  const TP* b = a + r * c.n;
  shrink(a, static_cast<const TX*>(c.x) + t * c.ldx, c.n, r, u);
  __syncthreads();
  TY* y = static_cast<TY*>(c.y) + t * c.ldy;
  for (int64_t j = threadIdx.x; j < c.m; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < r; ++k) acc += to_f(b[j * r + k]) * u[k];
    add_to(y + j, acc);
  }
}

// y[t] += dW_s x[t] from own factors: the token's DWT bands, every block's u, the output bands
// and the inverse cascade, all in shared memory.
template <typename TX, typename TP, typename TY>
__global__ void wavelet_kernel(Call c, Wavelet w) {
  extern __shared__ float smem[];
  const int64_t t = blockIdx.x;
  const int64_t s = c.token_slot[t];
  if (s < 0) return;
  const int64_t r = c.slot_rank[s];
  if (r == 0) return;
  const int levels = w.levels, taps = w.taps, h = w.taps / 2;
  const int64_t n = c.n, m = c.m;
  float* in_a[kMaxLevels + 1];
  float* in_d[kMaxLevels + 1];
  float* out_a[kMaxLevels + 1];
  float* out_d[kMaxLevels + 1];
  float* p = smem;
  for (int j = 1; j <= levels; ++j) {
    in_a[j] = p;
    in_d[j] = p + (n >> j);
    p += 2 * (n >> j);
  }
  float* out = p;
  for (int j = 1; j <= levels; ++j) {
    out_a[j] = p;
    out_d[j] = p + (m >> j);
    p += 2 * (m >> j);
  }
  float* u = p;
  for (int64_t i = threadIdx.x; i < u - out; i += blockDim.x) out[i] = 0.f;
  // DWT: a[k] = sum_i lo[i] x[(2k + F/2 - i) mod N], d likewise
  const TX* x = static_cast<const TX*>(c.x) + t * c.ldx;
  for (int j = 1; j <= levels; ++j) {
    const int64_t half = n >> j, len = 2 * half;
    for (int64_t k = threadIdx.x; k < half; k += blockDim.x) {
      float sa = 0.f, sd = 0.f;
      for (int i = 0; i < taps; ++i) {
        const int64_t idx = wrap(2 * k + h - i, len);
        const float v = j == 1 ? to_f(x[idx]) : in_a[j - 1][idx];
        sa += w.lo[i] * v;
        sd += w.hi[i] * v;
      }
      in_a[j][k] = sa;
      in_d[j][k] = sd;
    }
    __syncthreads();
  }
  const TP* slot = static_cast<const TP*>(c.pool) + c.slot_offset[s];
  // per block: u_b = A_b (its column band)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t q = warp; q < w.blocks * r; q += warps) {
    const BlockDesc& b = w.block[q / r];
    const int64_t k = q % r;
    const TP* a = slot + r * b.prefix + k * b.n;
    const float* band = (b.col_detail ? in_d : in_a)[b.level];
    float acc = 0.f;
    for (int64_t i = lane; i < b.n; i += 32) acc += to_f(a[i]) * band[i];
    acc = warp_sum(acc);
    if (lane == 0) u[q] = acc;
  }
  __syncthreads();
  // per block: its row band += B_b u_b. Blocks sharing a band have its length, so the same
  // thread owns an element for every block: no race.
  for (int bi = 0; bi < w.blocks; ++bi) {
    const BlockDesc& b = w.block[bi];
    const TP* bm = slot + r * b.prefix + r * b.n;
    float* band = (b.row_detail ? out_d : out_a)[b.level];
    for (int64_t jj = threadIdx.x; jj < b.m; jj += blockDim.x) {
      float acc = 0.f;
      for (int64_t k = 0; k < r; ++k) acc += to_f(bm[jj * r + k]) * u[bi * r + k];
      band[jj] += acc;
    }
  }
  __syncthreads();
  // inverse: level j's synthesis adds into the approximation of level j - 1, the last into y
  TY* y = static_cast<TY*>(c.y) + t * c.ldy;
  for (int j = levels; j >= 1; --j) {
    const int64_t half = m >> j;
    for (int64_t pos = threadIdx.x; pos < 2 * half; pos += blockDim.x) {
      const int64_t e = pos & 1, q = pos >> 1;
      float acc = 0.f;
      for (int i = 0; i < taps; ++i) {
        const int64_t sh = e - h + i;  // tap i reaches out[2q + e] from coefficient q + sh / 2 when sh is even
        if (sh & 1) continue;
        const int64_t k = wrap(q + sh / 2, half);
        acc += w.lo[i] * out_a[j][k] + w.hi[i] * out_d[j][k];
      }
      if (j > 1) out_a[j - 1][pos] += acc;
      else add_to(y + pos, acc);
    }
    __syncthreads();
  }
}

// Calls fn(TX{}, TP{}, TY{}) for the call's dtypes.
template <typename Fn>
cudaError_t dispatch(const Call& c, Fn&& fn) {
  auto on_y = [&](auto tx, auto tp) {
    return c.ty == DType::F32 ? fn(tx, tp, float{}) : fn(tx, tp, __nv_bfloat16{});
  };
  auto on_p = [&](auto tx) { return c.tp == DType::F32 ? on_y(tx, float{}) : on_y(tx, __nv_bfloat16{}); };
  return c.tx == DType::F32 ? on_p(float{}) : on_p(__nv_bfloat16{});
}

}  // namespace

size_t wavelet_shared_bytes(const Call& c, const Wavelet& w) {
  int64_t floats = static_cast<int64_t>(w.blocks) * c.max_rank;
  for (int j = 1; j <= w.levels; ++j) floats += 2 * ((c.n >> j) + (c.m >> j));
  return static_cast<size_t>(floats) * sizeof(float);
}

cudaError_t launch_sgmv(const Call& c, cudaStream_t stream) {
  if (c.tokens == 0 || c.max_rank == 0) return cudaSuccess;
  return dispatch(c, [&](auto tx, auto tp, auto ty) {
    auto kernel = sgmv_kernel<decltype(tx), decltype(tp), decltype(ty)>;
    const size_t bytes = static_cast<size_t>(c.max_rank) * sizeof(float);
    if (bytes > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
      if (e != cudaSuccess) return e;
    }
    kernel<<<static_cast<unsigned>(c.tokens), kThreads, bytes, stream>>>(c);
    return cudaGetLastError();
  });
}

cudaError_t launch_wavelet(const Call& c, const Wavelet& w, cudaStream_t stream) {
  if (c.tokens == 0 || c.max_rank == 0) return cudaSuccess;
  return dispatch(c, [&](auto tx, auto tp, auto ty) {
    auto kernel = wavelet_kernel<decltype(tx), decltype(tp), decltype(ty)>;
    const size_t bytes = wavelet_shared_bytes(c, w);
    if (bytes > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
      if (e != cudaSuccess) return e;
    }
    kernel<<<static_cast<unsigned>(c.tokens), kThreads, bytes, stream>>>(c, w);
    return cudaGetLastError();
  });
}

}  // namespace wara::cuda
