// Device helpers shared by the kernels: dtype conversion, 16-byte vectors, the online
// logsumexp state and its warp / block reductions.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "spot_kernels.h"

namespace spot {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements of T in one aligned load / store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^x with results below 2^-126 flushed to 0: one MUFU.EX2. expf costs seven more instructions
// (range reduction) and exp2f a denormal fix-up; with bf16 logits at HBM speed the forward
// epilogue has ~15 instructions per element to spend, so the kernels take e^d = 2^(d log2 e)
// of a difference d = z - m formed in natural units first (scaling z itself by log2 e would
// round it by ulp(|z|), and a logp near 0 at |z| ~ 1e3 with it). The host build has no PTX.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// e^d for d <= 0 (a logit less the row max, or less the lse).
__device__ __forceinline__ float fast_exp(float d) { return fast_exp2(d * kLog2e); }

// Logit transform: z = softcap(a + b) * inv_temp. cap_scale = softcap * inv_temp,
// inv_cap = 1 / softcap; softcap <= 0 (inv_cap == 0) means no cap.
struct Transform {
  float inv_temp, cap_scale, inv_cap;
  bool capped;
  __device__ __forceinline__ float operator()(float a) const {
    return capped ? cap_scale * tanhf(a * inv_cap) : a * inv_temp;
  }
};

inline Transform make_transform(float softcap, float inv_temp) {
  Transform t;
  t.inv_temp = inv_temp;
  t.capped = softcap > 0.f;
  t.cap_scale = t.capped ? softcap * inv_temp : 0.f;
  t.inv_cap = t.capped ? 1.f / softcap : 0.f;
  return t;
}

// Online logsumexp state over a set of logits z: max m, s = sum e^(z - m) and, for the entropy,
// q = sum e^(z - m) (z - m). Then lse = m + log s, logp = (z_t - m) - log s and
// H = log s - q / s. The empty set is (-inf, 0, 0).
struct LseState {
  float m, s, q;
};

__device__ __forceinline__ LseState lse_empty() { return {-INFINITY, 0.f, 0.f}; }

// Merge two states. The (m_i - M) s_i term is skipped for an empty side (it would be -inf * 0).
template <bool ENT>
__device__ __forceinline__ LseState lse_merge(LseState x, LseState y) {
  float M = fmaxf(x.m, y.m);
  if (M == -INFINITY) return x;  // both empty
  float ax = x.s > 0.f ? fast_exp(x.m - M) : 0.f;
  float ay = y.s > 0.f ? fast_exp(y.m - M) : 0.f;
  LseState r;
  r.m = M;
  r.s = x.s * ax + y.s * ay;
  r.q = 0.f;
  if (ENT) {
    float qx = x.s > 0.f ? ax * (x.q + (x.m - M) * x.s) : 0.f;
    float qy = y.s > 0.f ? ay * (y.q + (y.m - M) * y.s) : 0.f;
    r.q = qx + qy;
  }
  return r;
}

template <bool ENT>
__device__ __forceinline__ LseState warp_merge(LseState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.q = ENT ? __shfl_xor_sync(0xffffffffu, st.q, off) : 0.f;
    st = lse_merge<ENT>(st, o);
  }
  return st;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over a 1-D block of NT threads (a multiple of 32); the result is valid in thread 0.
template <int NT>
__device__ __forceinline__ float block_sum(float x, float* smem /* NT / 32 floats */) {
  x = warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < NT / 32 ? smem[lane] : 0.f;
    x = warp_sum(x);
  }
  return x;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace spot
