// Forward epilogue: fused row-wise online logsumexp + target gather (+ entropy) over one
// [rows x V] chunk of raw logits a = h W^T that cuBLAS just wrote (bf16 / fp16 / fp32).
//
// Math, per row i (float32 throughout):
//   z_v = softcap(a_v + b_v) / T,   softcap(x) = c tanh(x / c)   (no cap when c <= 0)
//   lse = m + log s,  m = max_v z_v,  s = sum_v exp(z_v - m)
//   logp = (z_t - m) - log s  (0 when t == ignore_index; -lse when t lies outside [0, V): the target
//          lives on another vocabulary shard, so this shard contributes no target logit)
//   H = lse - sum_v p_v z_v = log s - q / s,   q = sum_v exp(z_v - m) (z_v - m)
// Keeping q relative to the running max keeps H exact when |z| ~ 1e4. Each e^(z - m) is one
// MUFU.EX2 of (z - m) log2 e (common.cuh's fast_exp).
//
// Work split: one row per warp when V <= 2048 (8 rows per 256-thread block), one row per
// 256-thread block otherwise. Each thread streams 16-byte vectors (8 bf16/fp16 or 4 fp32) with
// a stride of (threads per row) vectors, two loads in flight, and keeps its own online state
// (m, s, q); the states are merged with warp shuffles, then across warps through shared memory.
// When the row start is not 16-byte aligned (ld * sizeof(T) % 16 != 0, e.g. an odd V) the same
// kernel runs with scalar loads. The target logit is one extra scalar load by thread 0.
//
// Bytes: reads rows * V * sizeof(T) (+ V * sizeof(T) of bias, cached), writes 12-16 bytes per
// row. Instructions (sm_90 SASS, bf16, no bias or cap): ~8 per element in the main loop
// (unpack, scale, max, subtract, scale, ex2, add), under the ~15 that HBM speed leaves.
// Memory-bound.
#include "common.cuh"

namespace spot {
namespace {

constexpr int kWarpRowsMaxV = 2048;
constexpr int kBlockThreads = 256;

template <typename T, int VEC, bool ENT>
__device__ __forceinline__ void accumulate(LseState& st, const Vec<T, VEC>& x, const T* bias,
                                           int64_t col, const Transform& tf) {
  float z[VEC];
  float vmax = -INFINITY;
  if (bias != nullptr) {
    const Vec<T, VEC> b = *reinterpret_cast<const Vec<T, VEC>*>(bias + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = tf(to_f(x.v[k]) + to_f(b.v[k]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = tf(to_f(x.v[k]));
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) vmax = fmaxf(vmax, z[k]);
  if (vmax > st.m) {  // rescale once per vector; 2^-inf = 0 on the first one
    const float sc = fast_exp(st.m - vmax);
    if (ENT && st.s > 0.f) st.q = sc * (st.q + (st.m - vmax) * st.s);
    st.s *= sc;
    st.m = vmax;
  }
  // while every logit so far is -inf (a masked stretch of the vocabulary) shift by 0, not by
  // -inf (-inf - -inf = NaN); a NaN logit still gives NaN (fmaxf skips it in vmax)
  const float m = st.m == -INFINITY ? 0.f : st.m;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = z[k] - m;
    const float e = fast_exp(d);
    st.s += e;
    if (ENT) st.q += e > 0.f ? e * d : 0.f;  // 0 * -inf: a -inf logit adds nothing
  }
}

// NT threads per row (32 or kBlockThreads), ROWS rows per block (NT == 32 or ROWS == 1, so a
// row's threads are one warp or the whole block and every barrier below is uniform).
template <typename T, int VEC, int NT, int ROWS, bool ENT>
__global__ void __launch_bounds__(NT * ROWS)
lse_forward_kernel(const T* __restrict__ logits, int64_t rows, int64_t V, int64_t ld,
                   const T* __restrict__ bias, const int64_t* __restrict__ targets, Transform tf,
                   int64_t ignore_index, float* __restrict__ logp, double* __restrict__ lse,
                   float* __restrict__ entropy) {
  static_assert(NT == 32 || ROWS == 1, "a row is one warp or one whole block");
  __shared__ LseState smem[NT / 32 > 1 ? NT / 32 : 1];
  const int tid = threadIdx.x;
  const int64_t nvec = V / VEC;
  for (int64_t row = int64_t(blockIdx.x) * ROWS + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * ROWS) {
    const T* a = logits + row * ld;
    LseState st = lse_empty();
    int64_t i = tid;
    for (; i + NT < nvec; i += 2 * NT) {  // two 16-byte loads in flight per thread
      const Vec<T, VEC> x0 = *reinterpret_cast<const Vec<T, VEC>*>(a + i * VEC);
      const Vec<T, VEC> x1 = *reinterpret_cast<const Vec<T, VEC>*>(a + (i + NT) * VEC);
      accumulate<T, VEC, ENT>(st, x0, bias, i * VEC, tf);
      accumulate<T, VEC, ENT>(st, x1, bias, (i + NT) * VEC, tf);
    }
    for (; i < nvec; i += NT) {
      const Vec<T, VEC> x0 = *reinterpret_cast<const Vec<T, VEC>*>(a + i * VEC);
      accumulate<T, VEC, ENT>(st, x0, bias, i * VEC, tf);
    }
    const int64_t col = nvec * VEC + tid;  // tail: fewer than VEC <= NT elements
    if (col < V) {
      Vec<T, 1> x;
      x.v[0] = a[col];
      accumulate<T, 1, ENT>(st, x, bias, col, tf);
    }
    st = warp_merge<ENT>(st);
    if (NT > 32) {
      const int lane = tid & 31, warp = tid >> 5;
      if (lane == 0) smem[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < NT / 32 ? smem[lane] : lse_empty();
        st = warp_merge<ENT>(st);
      }
      __syncthreads();  // smem is rewritten for the next row
    }
    if (tid == 0) {
      const float log_s = log2f(st.s) * kLn2;
      const float l = st.m + log_s;
      lse[row] = double(st.m) + double(log_s);  // unrounded: the backward splits it (hi + lo)
      const int64_t t = targets[row];
      float lp;
      if (t == ignore_index) {
        lp = 0.f;
      } else if (t >= 0 && t < V) {
        // relative to the max: z_t - m is exact near the max and never positive (z_t is one
        // of the values m is the max of), where z_t - l loses ulp(|l|)
        const float at = to_f(a[t]) + (bias != nullptr ? to_f(bias[t]) : 0.f);
        lp = (tf(at) - st.m) - log_s;
      } else {
        lp = -l;  // vocab-parallel: the target is on another shard
      }
      logp[row] = lp;
      if (ENT) entropy[row] = log_s - st.q / st.s;
    }
  }
}

template <typename T, int VEC, bool ENT>
cudaError_t launch(const T* logits, int64_t rows, int64_t V, int64_t ld, const T* bias,
                   const int64_t* targets, Transform tf, int64_t ignore_index, float* logp,
                   double* lse, float* entropy, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
  if (V <= kWarpRowsMaxV) {
    constexpr int ROWS = kBlockThreads / 32;
    const int64_t blocks = std::min<int64_t>((rows + ROWS - 1) / ROWS, kMaxBlocks);
    lse_forward_kernel<T, VEC, 32, ROWS, ENT><<<dim3(unsigned(blocks)), dim3(32, ROWS), 0, stream>>>(
        logits, rows, V, ld, bias, targets, tf, ignore_index, logp, lse, entropy);
  } else {
    const int64_t blocks = std::min<int64_t>(rows, kMaxBlocks);
    lse_forward_kernel<T, VEC, kBlockThreads, 1, ENT><<<dim3(unsigned(blocks)), dim3(kBlockThreads), 0, stream>>>(
        logits, rows, V, ld, bias, targets, tf, ignore_index, logp, lse, entropy);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* logits, int64_t rows, int64_t V, int64_t ld, const void* bias,
                     const int64_t* targets, Transform tf, int64_t ignore_index, float* logp,
                     double* lse, float* entropy, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* a = static_cast<const T*>(logits);
  const T* b = static_cast<const T*>(bias);
  const bool vec = aligned16(logits) && (ld * int64_t(sizeof(T))) % 16 == 0 &&
                   (bias == nullptr || aligned16(bias));
  if (entropy != nullptr) {
    return vec ? launch<T, VEC, true>(a, rows, V, ld, b, targets, tf, ignore_index, logp, lse, entropy, stream)
               : launch<T, 1, true>(a, rows, V, ld, b, targets, tf, ignore_index, logp, lse, entropy, stream);
  }
  return vec ? launch<T, VEC, false>(a, rows, V, ld, b, targets, tf, ignore_index, logp, lse, nullptr, stream)
             : launch<T, 1, false>(a, rows, V, ld, b, targets, tf, ignore_index, logp, lse, nullptr, stream);
}

}  // namespace

cudaError_t lse_forward(int dtype, const void* logits, int64_t rows, int64_t V, int64_t ld,
                        const void* bias, const int64_t* targets, float softcap, float inv_temp,
                        int64_t ignore_index, float* logp, double* lse, float* entropy,
                        cudaStream_t stream) {
  if (rows < 0 || V < 1 || ld < V || !(inv_temp > 0.f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (logits == nullptr || targets == nullptr || logp == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  const Transform tf = make_transform(softcap, inv_temp);
  switch (dtype) {
    case kFloat32:
      return dispatch<float>(logits, rows, V, ld, bias, targets, tf, ignore_index, logp, lse, entropy, stream);
    case kFloat16:
      return dispatch<__half>(logits, rows, V, ld, bias, targets, tf, ignore_index, logp, lse, entropy, stream);
    case kBFloat16:
      return dispatch<__nv_bfloat16>(logits, rows, V, ld, bias, targets, tf, ignore_index, logp, lse, entropy, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace spot
