// Segment sums over packed sequences (flash-attn varlen convention): sequence s owns tokens
// cu_seqlens[s] : cu_seqlens[s + 1].
//   out_s = sum_{i in s, valid_i} x_i          (average == 0)
//   out_s = that sum / count_s, 0 if count_s == 0   (average != 0)
// count_s (the number of counted tokens, float32) is written too when asked: the backward hands
// every counted token of s the coefficient dL/dout_s (divided by count_s when averaging).
//
// Work split: one 256-thread block per sequence (grid-stride over S); threads stride over the
// sequence's tokens, then a warp-shuffle + shared-memory tree sum. The order of the sum is fixed,
// so results are deterministic. Bytes: 4-5 per token read, 4-8 per sequence written.
#include "common.cuh"

namespace spot {
namespace {

constexpr int kThreads = 256;

template <typename I>
__global__ void __launch_bounds__(kThreads)
segment_sum_kernel(const float* __restrict__ x, const uint8_t* __restrict__ valid,
                   const I* __restrict__ cu, int64_t S, int average, float* __restrict__ out,
                   float* __restrict__ count) {
  __shared__ float smem[kThreads / 32];
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t lo = cu[s], hi = cu[s + 1];
    float acc = 0.f, cnt = 0.f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      if (valid == nullptr || valid[i] != 0) {
        acc += x[i];
        cnt += 1.f;
      }
    }
    acc = block_sum<kThreads>(acc, smem);
    cnt = block_sum<kThreads>(cnt, smem);
    if (threadIdx.x == 0) {
      out[s] = average ? (cnt > 0.f ? acc / cnt : 0.f) : acc;
      if (count != nullptr) count[s] = cnt;
    }
  }
}

}  // namespace

cudaError_t segment_sum(const float* x, const uint8_t* valid, const void* cu_seqlens,
                        int cu_is_int64, int64_t S, int average, float* out, float* count,
                        cudaStream_t stream) {
  if (S < 0) return cudaErrorInvalidValue;
  if (S == 0) return cudaSuccess;
  if (cu_seqlens == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const unsigned blocks = unsigned(std::min<int64_t>(S, 65535));
  if (cu_is_int64) {
    segment_sum_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(
        x, valid, static_cast<const int64_t*>(cu_seqlens), S, average, out, count);
  } else {
    segment_sum_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(
        x, valid, static_cast<const int32_t*>(cu_seqlens), S, average, out, count);
  }
  return cudaGetLastError();
}

}  // namespace spot
