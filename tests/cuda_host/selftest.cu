// Checks of the host emulation itself (tests/test_cuda_host.py builds and runs this): the warp
// and block reductions of csrc/common.cuh give the right sums, a missing barrier shows up as a
// wrong result, a shuffle that lanes never reach is reported as a launch failure, and launch
// limits are a GPU's. Prints one "name value" line per check.
#include <stdio.h>

#include "common.cuh"

namespace {

__global__ void warp_sums(float* out) {  // lane i holds i: every lane ends with 0 + ... + 31
  out[threadIdx.x] = spot::warp_sum(float(threadIdx.x));
}

__global__ void block_sums(float* out) {  // 256 threads: thread 0 gets 0 + ... + 255
  __shared__ float smem[8];
  const float s = spot::block_sum<256>(float(threadIdx.x), smem);
  if (threadIdx.x == 0) out[0] = s;
}

// Lane 0 of warp w writes w + 1; thread `reader` (0 or 255) sums what it sees.
__global__ void gather_warps(float* out, bool barrier, int reader) {
  __shared__ float smem[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (int(threadIdx.x) == reader)
    for (int w = 0; w < 8; ++w) smem[w] = 0.f;
  __syncthreads();
  if (lane == 0) smem[warp] = float(warp + 1);
  if (barrier) __syncthreads();  // the same for the whole block
  if (int(threadIdx.x) == reader) {
    float s = 0.f;
    for (int w = 0; w < 8; ++w) s += smem[w];
    out[0] = s;
  }
}

// block_sum (common.cuh) twice in a row, with or without its first barrier, which keeps a warp
// that runs ahead from overwriting the partial sums warp 0 has yet to read.
template <bool FIRST_BARRIER>
__device__ float block_sum_256(float x, float* smem) {
  x = spot::warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (FIRST_BARRIER) __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) x = spot::warp_sum(lane < 8 ? smem[lane] : 0.f);
  return x;
}

template <bool FIRST_BARRIER>
__global__ void two_sums(float* out) {  // 0 + ... + 255, then 256 ones
  __shared__ float smem[8];
  const float a = block_sum_256<FIRST_BARRIER>(float(threadIdx.x), smem);
  const float b = block_sum_256<FIRST_BARRIER>(1.f, smem);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

__global__ void exited_lanes(float* out) {  // half a warp leaves before a full-warp shuffle
  if (threadIdx.x < 16) return;
  out[0] = spot::warp_sum(1.f);
}

__global__ void nothing(float*) {}

void report(const char* name, cudaError_t err, float value) {
  printf("%s %s %g\n", name, cudaGetErrorName(err), value);
}

}  // namespace

int main() {
  float out[256] = {};
  warp_sums<<<1, 32, 0, nullptr>>>(out);
  cudaError_t err = cudaGetLastError();
  float lanes_agree = 1.f;
  for (int i = 1; i < 32; ++i) lanes_agree *= out[i] == out[0] ? 1.f : 0.f;
  report("warp_sum", err, out[0] * lanes_agree);

  block_sums<<<dim3(3), 256, 0, nullptr>>>(out);
  report("block_sum", cudaGetLastError(), out[0]);

  // Each order hides a missing barrier from one reader and shows it to the other; launches
  // alternate the order, so a kernel's tests see both.
  for (int reverse = 0; reverse < 2; ++reverse) {
    for (int reader = 0; reader < 2; ++reader) {
      for (int barrier = 1; barrier >= 0; --barrier) {
        emu::reverse_order = reverse;
        gather_warps<<<1, 256, 0, nullptr>>>(out, barrier, reader ? 255 : 0);
        char name[64];
        snprintf(name, sizeof name, "%s_%s_reader%d", barrier ? "with_barrier" : "without_barrier",
                 reverse ? "reverse" : "forward", reader);
        report(name, cudaGetLastError(), out[0]);
      }
    }
  }

  // a write-after-read hazard: warps 7..1 overwrite smem before warp 0 has read it
  for (int reverse = 0; reverse < 2; ++reverse) {
    const char* tag = reverse ? "reverse" : "forward";
    char name[64];
    emu::reverse_order = reverse;
    two_sums<true><<<1, 256, 0, nullptr>>>(out);
    snprintf(name, sizeof name, "two_sums_%s", tag);
    report(name, cudaGetLastError(), out[0]);
    snprintf(name, sizeof name, "two_sums_%s_second", tag);
    report(name, cudaSuccess, out[1]);
    emu::reverse_order = reverse;
    two_sums<false><<<1, 256, 0, nullptr>>>(out);
    snprintf(name, sizeof name, "two_sums_no_first_barrier_%s", tag);
    report(name, cudaGetLastError(), out[0]);
  }

  out[0] = -1.f;
  exited_lanes<<<1, 32, 0, nullptr>>>(out);
  report("exited_lanes", cudaGetLastError(), out[0]);

  nothing<<<1, 2048, 0, nullptr>>>(out);
  report("block_2048", cudaGetLastError(), 0.f);
  nothing<<<dim3(1, 65536), 32, 0, nullptr>>>(out);
  report("grid_y_65536", cudaGetLastError(), 0.f);
  nothing<<<dim3(0), 32, 0, nullptr>>>(out);
  report("grid_x_0", cudaGetLastError(), 0.f);
  return 0;
}
