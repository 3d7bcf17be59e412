// SPoT's reward BCE over S sequences and its per-sequence coefficients:
//   u_s = beta (pi_s - rho_s) - delta
//   l_s = y_s softplus(-u_s) + (1 - y_s) softplus(u_s),      loss = sum_s l_s / K
//   coef_s = dloss/dpi_s = beta (sigmoid(u_s) - y_s) / K
// softplus(x) = max(x, 0) + log1p(exp(-|x|)) and a two-sided sigmoid stay finite for any u.
// delta may be a device scalar (a running mean kept on the GPU): it is read in the kernel, so
// the host never waits for it.
//
// Work split: S is small (a batch of sequences), so one 256-thread block strides over it and
// tree-sums the loss in a fixed order (deterministic). Bytes: 12 read + 4 written per sequence.
#include "common.cuh"

namespace spot {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}

__global__ void __launch_bounds__(kThreads)
bce_kernel(const float* __restrict__ pi, const float* __restrict__ rho,
           const float* __restrict__ labels, int64_t S, float beta, float delta,
           const float* __restrict__ delta_ptr, float inv_k, float* __restrict__ loss,
           float* __restrict__ coef) {
  __shared__ float smem[kThreads / 32];
  const float d = delta_ptr != nullptr ? *delta_ptr : delta;
  float acc = 0.f;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    const float u = beta * (pi[s] - rho[s]) - d;
    const float y = labels[s];
    acc += y * softplus(-u) + (1.f - y) * softplus(u);
    // sigmoid(u) - y, each label's term on its own: sigmoid(u) - 1 would round a saturated
    // chosen sequence's -sigmoid(-u) (~1e-13 at u = 30) to 0
    coef[s] = beta * ((1.f - y) * sigmoid(u) - y * sigmoid(-u)) * inv_k;
  }
  acc = block_sum<kThreads>(acc, smem);
  if (threadIdx.x == 0) loss[0] = acc * inv_k;
}

}  // namespace

cudaError_t bce_forward(const float* pi, const float* rho, const float* labels, int64_t S,
                        float beta, float delta, const float* delta_ptr, float inv_k,
                        float* loss, float* coef, cudaStream_t stream) {
  if (S < 0 || loss == nullptr) return cudaErrorInvalidValue;
  if (S > 0 && (pi == nullptr || rho == nullptr || labels == nullptr || coef == nullptr))
    return cudaErrorInvalidValue;
  bce_kernel<<<1, kThreads, 0, stream>>>(pi, rho, labels, S, beta, delta, delta_ptr, inv_k, loss, coef);
  return cudaGetLastError();
}

}  // namespace spot
