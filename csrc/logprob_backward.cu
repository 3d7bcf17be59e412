// Backward epilogue, in place: the chunk of raw logits a = h W^T (recomputed by cuBLAS from the
// saved inputs) is overwritten with the gradient w.r.t. a, in the input dtype:
//   z = softcap(a + b) / T,   p = exp(z - hi) exp(-lo)   (lse = hi + lo, float64 from the
//   forward, given per row as float32 hi and scale = exp(-lo), split in torch: z - hi is exact
//   near the max, so p keeps float32 precision; one MUFU.EX2 per element, fast_exp)
//   dA_v = g (1[v == t] - p_v) / T * softcap'(a_v + b_v),   softcap'(x) = 1 - tanh^2(x / c)
// with g = 0 for ignored tokens (t == ignore_index) and no one-hot term when t lies outside
// [0, V) (vocab-parallel). The target column's 1 - p_t is q, per row from the forward's logp
// (-expm1(logp), in torch): the recompute's GEMMs have other shapes than the forward's and may
// round z_t differently, which 1 - exp(z_t - lse) would carry absolutely. Everything is
// float32 until the single rounding at the store, so nothing cancels in bf16 when p_t is near 1.
// The GEMMs that follow (dh = dA W, dW += dA^T h, db += sum_i dA_i) run in cuBLAS.
//
// Work split: a 2-D grid; blockIdx.x covers 256 * VEC columns of a row (one 16-byte vector per
// thread), blockIdx.y strides over rows. Per-row scalars (t, g, hi, scale, q) are broadcast
// loads.
// Bytes: reads and writes rows * V * sizeof(T); one exp (+ one tanh and one exp with a softcap)
// per element. Memory-bound.
#include "common.cuh"

namespace spot {
namespace {

constexpr int kThreads = 256;

template <int VEC, typename T>
__device__ __forceinline__ void grad_vec(T* out, const T* in, const T* bias, int64_t col,
                                         int64_t t, float g, float hi, float scale, float q,
                                         const Transform& tf) {
  Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(in);
  Vec<T, VEC> b;
  if (bias != nullptr) b = *reinterpret_cast<const Vec<T, VEC>*>(bias + col);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float a = to_f(x.v[k]) + (bias != nullptr ? to_f(b.v[k]) : 0.f);
    float z, dcap;
    if (tf.capped) {
      const float u = a * tf.inv_cap;
      z = tf.cap_scale * tanhf(u);
      // 1 - tanh^2(u) as 4e / (1 + e)^2, e = e^{-2|u|}: 1 - th * th from a rounded th loses its
      // leading bits as th nears 1 (~1e-3 relative at |u| = 5, 0 once th rounds to 1)
      const float e = expf(-2.f * fabsf(u));
      const float r = 1.f / (1.f + e);
      dcap = 4.f * e * r * r;
    } else {
      z = a * tf.inv_temp;
      dcap = 1.f;
    }
    const float p = fast_exp(z - hi) * scale;
    x.v[k] = from_f<T>(g * ((col + k == t) ? q : -p) * tf.inv_temp * dcap);
  }
  *reinterpret_cast<Vec<T, VEC>*>(out) = x;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
backward_epilogue_kernel(T* __restrict__ logits, int64_t rows, int64_t V, int64_t ld,
                         const T* __restrict__ bias, const int64_t* __restrict__ targets,
                         const float* __restrict__ lse_hi, const float* __restrict__ lse_scale,
                         const float* __restrict__ target_q, const float* __restrict__ grad,
                         Transform tf, int64_t ignore_index) {
  const int64_t col0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (col0 >= V) return;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    T* a = logits + row * ld;
    const int64_t t = targets[row];
    if (t == ignore_index) {  // no gradient: write zeros
      Vec<T, VEC> zero;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zero.v[k] = from_f<T>(0.f);
      if (col0 + VEC <= V) {
        *reinterpret_cast<Vec<T, VEC>*>(a + col0) = zero;
      } else {
        for (int64_t c = col0; c < V; ++c) a[c] = zero.v[0];
      }
      continue;
    }
    const float g = grad[row];
    const float hi = lse_hi[row], scale = lse_scale[row], q = target_q[row];
    if (col0 + VEC <= V) {
      grad_vec<VEC>(a + col0, a + col0, bias, col0, t, g, hi, scale, q, tf);
    } else {
      for (int64_t c = col0; c < V; ++c)
        grad_vec<1>(a + c, a + c, bias, c, t, g, hi, scale, q, tf);
    }
  }
}

template <typename T>
cudaError_t dispatch(void* logits, int64_t rows, int64_t V, int64_t ld, const void* bias,
                     const int64_t* targets, const float* lse_hi, const float* lse_scale,
                     const float* target_q, const float* grad, Transform tf,
                     int64_t ignore_index, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  T* a = static_cast<T*>(logits);
  const T* b = static_cast<const T*>(bias);
  const bool vec = aligned16(logits) && (ld * int64_t(sizeof(T))) % 16 == 0 &&
                   (bias == nullptr || aligned16(bias));
  const int64_t per_block = int64_t(kThreads) * (vec ? VEC : 1);
  const int64_t gx = (V + per_block - 1) / per_block;
  if (gx > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(gx), unsigned(std::min<int64_t>(rows, 65535)));
  if (vec) {
    backward_epilogue_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(a, rows, V, ld, b, targets, lse_hi, lse_scale, target_q, grad, tf, ignore_index);
  } else {
    backward_epilogue_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, rows, V, ld, b, targets, lse_hi, lse_scale, target_q, grad, tf, ignore_index);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t backward_epilogue(int dtype, void* logits, int64_t rows, int64_t V, int64_t ld,
                              const void* bias, const int64_t* targets, const float* lse_hi,
                              const float* lse_scale, const float* target_q,
                              const float* grad, float softcap, float inv_temp,
                              int64_t ignore_index, cudaStream_t stream) {
  if (rows < 0 || V < 1 || ld < V || !(inv_temp > 0.f)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (logits == nullptr || targets == nullptr || lse_hi == nullptr || lse_scale == nullptr ||
      target_q == nullptr || grad == nullptr)
    return cudaErrorInvalidValue;
  const Transform tf = make_transform(softcap, inv_temp);
  switch (dtype) {
    case kFloat32:
      return dispatch<float>(logits, rows, V, ld, bias, targets, lse_hi, lse_scale, target_q, grad, tf, ignore_index, stream);
    case kFloat16:
      return dispatch<__half>(logits, rows, V, ld, bias, targets, lse_hi, lse_scale, target_q, grad, tf, ignore_index, stream);
    case kBFloat16:
      return dispatch<__nv_bfloat16>(logits, rows, V, ld, bias, targets, lse_hi, lse_scale, target_q, grad, tf, ignore_index, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace spot
