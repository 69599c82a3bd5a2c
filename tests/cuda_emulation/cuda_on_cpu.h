// CUDA's execution model on one CPU thread, enough to run csrc/cuda's kernels in tests without a GPU.
//
// A launch runs its blocks one after another. Each thread of a block is a fiber (ucontext) with its
// own stack; a fiber runs until it waits at a barrier, then another one runs. Warps are scheduled
// unfairly on purpose (see launch) so that a missing barrier (a read racing a write) changes results.
// __syncthreads waits for every thread of the block; __shfl_xor_sync exchanges values between the 32
// lanes of a warp through two warp barriers (write, then read). A barrier that can never complete (threads of a block
// or warp that diverged around it, a kernel bug that hangs a real GPU) aborts with a message.
// __shared__ variables are function statics: shared by the block, which is alone while it runs;
// dynamic shared memory is a per-block buffer returned by dynamic_shared_memory().
//
// Include after torch's headers and before the kernel's header.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#define ALPHADIV_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emulation {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  int participants = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Block {
  std::vector<ucontext_t> contexts;
  std::vector<bool> finished;
  ucontext_t scheduler;
  int current = 0;
  uint64_t progress = 0;  // completed barriers and finished threads
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> lane_values;  // one 8-byte slot per thread for shuffles
  std::vector<uint64_t> dynamic_shared;  // 8-byte aligned
  std::function<void()> body;
};

inline Block* running = nullptr;

inline void yield_to_scheduler() { swapcontext(&running->contexts[running->current], &running->scheduler); }

inline void wait(Barrier& barrier) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++running->progress;
    return;
  }
  while (barrier.generation == generation) yield_to_scheduler();
}

inline void fiber_entry() {
  running->body();
  running->finished[running->current] = true;
  ++running->progress;
}  // returns to uc_link: the scheduler

// Runs kernel(args...) on `blocks` blocks of `threads` threads with `shared_bytes` of dynamic shared
// memory, filled with a NaN pattern so that reading a slot nobody wrote shows up in results.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, int threads, int64_t shared_bytes, const Args&... args) {
  if (threads % kWarp != 0) std::abort();
  std::vector<std::unique_ptr<char[]>> stacks;
  for (int i = 0; i < threads; ++i) stacks.emplace_back(new char[kStackBytes]);
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  gridDim = {static_cast<unsigned>(blocks), 1, 1};
  for (int64_t b = 0; b < blocks; ++b) {
    Block block;
    block.contexts.resize(threads);
    block.finished.assign(threads, false);
    block.block_barrier.participants = threads;
    block.warp_barriers.assign(threads / kWarp, Barrier{kWarp});
    block.lane_values.assign(threads, 0);
    block.dynamic_shared.assign((shared_bytes + 7) / 8, 0x7ff87ff87ff87ff8ull);
    block.body = [&] { kernel(args...); };
    running = &block;
    blockIdx = {static_cast<unsigned>(b), 0, 0};
    for (int i = 0; i < threads; ++i) {
      getcontext(&block.contexts[i]);
      block.contexts[i].uc_stack.ss_sp = stacks[i].get();
      block.contexts[i].uc_stack.ss_size = kStackBytes;
      block.contexts[i].uc_link = &block.scheduler;
      makecontext(&block.contexts[i], fiber_entry, 0);
    }
    // Warps run in a random priority order, each as far as it can before the next: the last warp to
    // reach a __syncthreads runs on past it while the others still wait, so a missing barrier shows.
    const int warps = threads / kWarp;
    std::mt19937 shuffler(static_cast<uint32_t>(b));
    std::vector<int> warp_order(warps), lanes(kWarp);
    std::iota(warp_order.begin(), warp_order.end(), 0);
    std::iota(lanes.begin(), lanes.end(), 0);
    std::shuffle(warp_order.begin(), warp_order.end(), shuffler);
    for (int live = threads; live > 0;) {
      const uint64_t progress_before = block.progress;
      for (const int warp : warp_order) {
        for (uint64_t warp_progress = ~uint64_t(0); warp_progress != block.progress;) {
          warp_progress = block.progress;
          std::shuffle(lanes.begin(), lanes.end(), shuffler);
          for (const int lane : lanes) {
            const int i = warp * kWarp + lane;
            if (block.finished[i]) continue;
            block.current = i;
            threadIdx = {static_cast<unsigned>(i), 0, 0};
            swapcontext(&block.scheduler, &block.contexts[i]);
          }
        }
      }
      live = static_cast<int>(std::count(block.finished.begin(), block.finished.end(), false));
      if (live > 0 && block.progress == progress_before) {
        std::fprintf(stderr, "cuda_on_cpu: block %lld deadlocked: %d threads wait at a barrier the others never "
                     "reach\n", static_cast<long long>(b), live);
        std::abort();
      }
    }
    running = nullptr;
  }
}

}  // namespace cuda_emulation

// The SFU's exp2-based exponential: exp2 of the rounded product x log2(e), flushing results below
// the smallest normal float to 0 as ex2.approx.ftz does.
inline float __expf(float x) {
  const float result = std::exp2(x * 1.44269504f);
  return std::fabs(result) < 1.17549435e-38f ? 0.0f : result;
}

inline unsigned char* dynamic_shared_memory() {
  return reinterpret_cast<unsigned char*>(cuda_emulation::running->dynamic_shared.data());
}

inline void __syncthreads() { cuda_emulation::wait(cuda_emulation::running->block_barrier); }

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes here");
  auto& block = *cuda_emulation::running;
  const int thread = static_cast<int>(threadIdx.x);
  const int warp_base = thread / cuda_emulation::kWarp * cuda_emulation::kWarp;
  auto& barrier = block.warp_barriers[thread / cuda_emulation::kWarp];
  std::memcpy(&block.lane_values[thread], &value, sizeof(T));
  cuda_emulation::wait(barrier);
  T other;
  std::memcpy(&other, &block.lane_values[warp_base + ((thread - warp_base) ^ lane_mask)], sizeof(T));
  cuda_emulation::wait(barrier);
  return other;
}

// Atomics: a fiber runs until it waits at a barrier, so a read-modify-write is never interleaved.
inline unsigned int atomicOr(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old | value;
  return old;
}
