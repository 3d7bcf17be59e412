// Host stand-in for <cuda_runtime.h>: the slice of the CUDA runtime and device API that csrc/
// uses, so the kernels' own source runs on the CPU in tests (tests/cuda_host builds it).
//
// Execution model: a launch runs its blocks one after another on the calling thread. A block's
// threads are cooperative fibers (ucontext). Warps run one at a time, each as far as it can
// before the next (see run_block), lanes in turn; the order alternates between launches, warp
// and lane 0 first or last (emu::reverse_order, flipped by every launch), so a missing barrier
// shows up whichever side of it the reader or the writer sits:
//   * __syncthreads() waits until every thread of the block that has not exited waits there;
//   * __shfl_xor_sync(0xffffffff, ...) is two barriers of the thread's warp (write the value,
//     read the partner's), so all 32 lanes must take part, as on a GPU.
// When no thread can run and no barrier can open (a barrier in divergent code, a shuffle
// missing lanes: a hang or undefined behaviour on a GPU), the launch fails and
// cudaGetLastError() reports cudaErrorLaunchFailure with the reason. The launch limits are a
// GPU's: at most 1024 threads per block, grid.y and grid.z at most 65535, no empty dimension.
// Nothing here emulates the memory model: data races are for compute-sanitizer on a GPU
// (benchmarks/cuda_memcheck.py). Out-of-bounds accesses: tests/cuda_host/bounds.py.
//
// Kernel launches `k<<<grid, block, shmem, stream>>>(args)` are not C++: the build rewrites
// them to `::emu::launch(k, ::emu::Config{grid, block, shmem, stream}, args)`.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-local static is the running block's shared memory.
#define __shared__ static

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

enum class State { kRun, kBlockBarrier, kWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  int lane, warp;
  State state;
};

struct Config {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
};

inline constexpr size_t kStackBytes = 64 << 10;
inline constexpr int kMaxThreads = 1024;

inline Thread* cur = nullptr;  // the running thread (there is one OS thread: no races here)
inline dim3 block_idx, block_dim, grid_dim;
inline ucontext_t scheduler;
inline std::function<void()> body;
inline uint32_t exchange[kMaxThreads / 32][32];  // one 4-byte slot per lane, for shuffles
inline bool reverse_order = false;  // this launch's turn order; every launch flips it
inline cudaError_t last_error = cudaSuccess;
inline const char* last_message = "no error";

inline void wait(State s) {
  cur->state = s;
  swapcontext(&cur->ctx, &scheduler);
}

inline void entry() {  // a fiber's start: run the kernel, then return to the scheduler (uc_link)
  body();
  cur->state = State::kDone;
}

inline cudaError_t fail(cudaError_t err, const char* why) {
  if (last_error == cudaSuccess) {
    last_error = err;
    last_message = why;
  }
  return err;
}

// Runs one block to completion; false (with last_error set) on a deadlock. Warp by warp, each
// as far as it can go (through its shuffles, up to a __syncthreads() or its end) before the
// next starts: warps drift apart as far as a GPU lets them, so a shared-memory read or write
// that lacks a barrier meets the other warps' writes (or misses them).
inline bool run_block(std::vector<Thread>& threads, bool reverse) {
  const int n = int(threads.size()), warps = (n + 31) / 32;
  for (;;) {
    for (int wi = 0; wi < warps; ++wi) {
      const int w = reverse ? warps - 1 - wi : wi;
      const int lo = w * 32, hi = std::min(n, lo + 32);
      for (;;) {
        for (int li = 0; li < hi - lo; ++li) {
          Thread& t = threads[size_t(reverse ? hi - 1 - li : lo + li)];
          if (t.state != State::kRun) continue;
          cur = &t;
          swapcontext(&scheduler, &t.ctx);  // runs until it waits or ends
        }
        int waiting = 0;
        for (int i = lo; i < hi; ++i) waiting += threads[size_t(i)].state == State::kWarpBarrier;
        if (waiting != 32) break;  // a warp barrier opens when all 32 lanes wait at it
        for (int i = lo; i < hi; ++i) threads[size_t(i)].state = State::kRun;
      }
    }
    int done = 0, at_block = 0;
    for (const Thread& t : threads) {
      done += t.state == State::kDone;
      at_block += t.state == State::kBlockBarrier;
    }
    if (done == n) return true;
    if (at_block == 0 || at_block + done != n) {
      fail(cudaErrorLaunchFailure,
           "deadlock: a __syncthreads() or a warp shuffle that not every thread reaches "
           "(divergent barrier, exited lanes, or a partial warp)");
      return false;
    }
    for (Thread& t : threads)
      if (t.state == State::kBlockBarrier) t.state = State::kRun;
  }
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), Config c, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  const bool reverse = reverse_order;
  reverse_order = !reverse_order;
  const long nthreads = long(c.block.x) * c.block.y * c.block.z;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || nthreads == 0) {
    fail(cudaErrorInvalidConfiguration, "invalid configuration argument: an empty dimension");
    return;
  }
  if (nthreads > kMaxThreads || c.block.z > 64 || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.grid.x > 0x7fffffffu) {
    fail(cudaErrorInvalidConfiguration,
         "invalid configuration argument: over 1024 threads per block, or grid.y / grid.z "
         "over 65535");
    return;
  }
  std::tuple<std::decay_t<P>...> params(static_cast<P>(args)...);  // copied once, like a launch
  body = [&] { std::apply(kernel, params); };
  static std::vector<char> stacks;
  stacks.resize(size_t(nthreads) * kStackBytes);
  std::vector<Thread> threads(static_cast<size_t>(nthreads));
  block_dim = c.block;
  grid_dim = c.grid;
  for (unsigned bz = 0; bz < c.grid.z; ++bz)
    for (unsigned by = 0; by < c.grid.y; ++by)
      for (unsigned bx = 0; bx < c.grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        for (long i = 0; i < nthreads; ++i) {
          Thread& t = threads[size_t(i)];
          t.idx = dim3(unsigned(i % c.block.x), unsigned(i / c.block.x % c.block.y),
                       unsigned(i / (long(c.block.x) * c.block.y)));
          t.lane = int(i % 32);
          t.warp = int(i / 32);
          t.state = State::kRun;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = stacks.data() + size_t(i) * kStackBytes;
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = &scheduler;
          makecontext(&t.ctx, entry, 0);
        }
        if (!run_block(threads, reverse)) return;
      }
}

}  // namespace emu

#define threadIdx (::emu::cur->idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::wait(emu::State::kBlockBarrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "4-byte shuffles only");
  if (mask != 0xffffffffu || width != 32) {
    emu::fail(cudaErrorLaunchFailure, "only full-warp shuffles are emulated");
    return value;
  }
  uint32_t* slot = emu::exchange[emu::cur->warp];
  const int lane = emu::cur->lane;
  memcpy(&slot[lane], &value, 4);
  emu::wait(emu::State::kWarpBarrier);  // every lane has written
  T out;
  memcpy(&out, &slot[(lane ^ lane_mask) & 31], 4);
  emu::wait(emu::State::kWarpBarrier);  // every lane has read: the slots may be reused
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaErrorInvalidValue) return "invalid argument";
  return e == cudaSuccess ? "no error" : emu::last_message;
}

inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;  // no driver: the host emulation
  return cudaSuccess;
}

inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
