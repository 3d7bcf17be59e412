// Launchers of the spot-kernels CUDA epilogues. Torch-free: raw device pointers, sizes,
// strides and a cudaStream_t in, a cudaError_t out (the launch's own error, checked with
// cudaGetLastError; nothing here synchronises with the host).
//
// dtype codes for the logits chunk (and the bias, which has the same dtype):
//   0 = float32, 1 = float16, 2 = bfloat16.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace spot {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward epilogue over a logits chunk a[rows, V] (row stride ld elements, unit column stride):
//   z = softcap(a + bias) * inv_temp,  lse = logsumexp_v z,  logp = z[t] - lse (0 if t == ignore,
//   -lse if t is outside [0, V)),  entropy = lse - sum_v softmax(z)_v z_v (only if entropy != null).
// softcap <= 0 means no cap. bias may be null. Outputs are [rows]: logp and entropy float32, lse
// float64 (m + log s unrounded, so that the backward's exp(z - lse) keeps float32 precision).
cudaError_t lse_forward(int dtype, const void* logits, int64_t rows, int64_t V, int64_t ld,
                        const void* bias, const int64_t* targets, float softcap, float inv_temp,
                        int64_t ignore_index, float* logp, double* lse, float* entropy,
                        cudaStream_t stream);

// Backward epilogue, in place over the same chunk (recomputed raw logits a):
//   dA = g (1[v == t] - exp(z - lse)) * inv_temp * softcap'(a + bias),  g = 0 if t == ignore,
// with the forward's float64 lse given as float32 lse_hi = float(lse) and
// lse_scale = exp(-(lse - lse_hi)) per row: exp(z - lse) = exp(z - lse_hi) * lse_scale; the
// target column's 1 - p_t is target_q per row (the forward's: -expm1(logp_t)).
cudaError_t backward_epilogue(int dtype, void* logits, int64_t rows, int64_t V, int64_t ld,
                              const void* bias, const int64_t* targets, const float* lse_hi,
                              const float* lse_scale, const float* target_q, const float* grad,
                              float softcap, float inv_temp, int64_t ignore_index,
                              cudaStream_t stream);

// Segment sums over cu_seqlens [S + 1] (int32 if cu_is_int64 == 0, else int64):
//   out[s] = sum of x[i] over s's tokens with valid[i] (valid may be null: every token counts),
//   divided by the count when average != 0 (0 when the count is 0). count (nullable) gets the
//   number of counted tokens as float32.
cudaError_t segment_sum(const float* x, const uint8_t* valid, const void* cu_seqlens,
                        int cu_is_int64, int64_t S, int average, float* out, float* count,
                        cudaStream_t stream);

// SPoT's reward BCE over S sequences: u = beta (pi - rho) - delta, with delta read from
// delta_ptr when it is not null (a device scalar, no host sync) and delta otherwise;
//   loss[0] = sum_s [y softplus(-u) + (1 - y) softplus(u)] * inv_k,
//   coef[s] = dloss/dpi_s = beta (sigmoid(u) - y) * inv_k.
cudaError_t bce_forward(const float* pi, const float* rho, const float* labels, int64_t S,
                        float beta, float delta, const float* delta_ptr, float inv_k,
                        float* loss, float* coef, cudaStream_t stream);

}  // namespace spot
