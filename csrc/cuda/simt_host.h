// Host emulation of the CUDA execution model used by sce_kernels.cuh: every CUDA thread of a launch
// runs as a host thread; __syncthreads is a per-block std::barrier, a cooperative grid sync a
// barrier over all threads, __syncwarp a barrier over the 32 lanes of a warp, and a warp shuffle an
// exchange through the warp's slots between two such barriers; each block gets its own
// shared-memory arena. It exists so that CI runs the kernel source (built with AddressSanitizer,
// and with ThreadSanitizer) on machines without a GPU. Kernels must follow CUDA's rule that
// barriers are reached by every thread (block, warp) — a violation deadlocks here too.
#pragma once

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace simt {

constexpr size_t kArenaBytes = 64 * 1024;
constexpr int kWarpSize = 32;

inline thread_local int tid = 0;
inline thread_local int bid = 0;
inline thread_local int nblocks = 1;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* grid_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local uint64_t* warp_slots = nullptr;   // kWarpSize slots of this thread's warp
inline thread_local char* arena = nullptr;
inline thread_local size_t arena_used = 0;

// Every thread of a block makes the same sequence of calls, so all get the same addresses.
template <typename T>
T* shared_array(size_t count) {
  const size_t align = alignof(std::max_align_t);
  const size_t off = (arena_used + align - 1) / align * align;
  arena_used = off + count * sizeof(T);
  if (arena_used > kArenaBytes) std::abort();
  return reinterpret_cast<T*>(arena + off);
}

// The value `v` of lane (this lane's index) ^ `mask` (as __shfl_xor_sync) or of lane `src` (as
// __shfl_sync) of this thread's warp. Every lane of the warp must call it (full-mask semantics).
template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle: at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  warp_slots[tid % kWarpSize] = bits;
  warp_barrier->arrive_and_wait();
  const uint64_t other = warp_slots[src_lane];
  warp_barrier->arrive_and_wait();   // nobody overwrites a slot before every lane has read
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

template <typename T>
T shuffle_xor(T v, int mask) {
  return shuffle(v, (tid % kWarpSize) ^ mask);
}

template <typename Kernel>
void launch(int grid, int block, Kernel kernel) {
  if (block % kWarpSize != 0) std::abort();   // whole warps only, as the kernels assume
  const int warps = block / kWarpSize;
  std::barrier<> grid_bar(grid * block);
  std::vector<std::unique_ptr<std::barrier<>>> block_bars, warp_bars;
  std::vector<std::vector<char>> arenas(grid, std::vector<char>(kArenaBytes));
  std::vector<uint64_t> slots(static_cast<size_t>(grid) * block);
  for (int b = 0; b < grid; ++b) block_bars.emplace_back(std::make_unique<std::barrier<>>(block));
  for (int w = 0; w < grid * warps; ++w) warp_bars.emplace_back(std::make_unique<std::barrier<>>(kWarpSize));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(grid) * block);
  for (int b = 0; b < grid; ++b) {
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        tid = t;
        bid = b;
        nblocks = grid;
        block_barrier = block_bars[b].get();
        grid_barrier = &grid_bar;
        warp_barrier = warp_bars[b * warps + t / kWarpSize].get();
        warp_slots = slots.data() + static_cast<size_t>(b) * block + (t / kWarpSize) * kWarpSize;
        arena = arenas[b].data();
        arena_used = 0;
        kernel();
      });
    }
  }
  for (auto& th : threads) th.join();
}

}  // namespace simt

#include <math.h>  // exp/expf, log/logf, sqrt/sqrtf, nan/nanf, INFINITY: the names CUDA's math API uses

#define COPA_DEVICE inline
#define COPA_GLOBAL
#define COPA_SHARED_ARRAY(T, name, count) T* name = simt::shared_array<T>(count)
#define COPA_TID (simt::tid)
#define COPA_BID (simt::bid)
#define COPA_NBLOCKS (simt::nblocks)
#define COPA_SYNC_BLOCK() simt::block_barrier->arrive_and_wait()
#define COPA_SYNC_GRID() simt::grid_barrier->arrive_and_wait()
#define COPA_SYNC_WARP() simt::warp_barrier->arrive_and_wait()
#define COPA_SHFL_XOR(v, mask) simt::shuffle_xor((v), (mask))
#define COPA_SHFL(v, lane) simt::shuffle((v), (lane))
#define COPA_MIN_BLOCKS(k)
#define COPA_SET_FLAG(p) std::atomic_ref<int>(*(p)).store(1, std::memory_order_relaxed)
