// Host emulation of the CUDA execution model used by sce_kernels.cuh: every CUDA thread of a launch
// runs as a host thread; __syncthreads is a per-block std::barrier, a cooperative grid sync a
// barrier over all threads; each block gets its own shared-memory arena. It exists so that CI runs
// the kernel source (built with AddressSanitizer) on machines without a GPU. Kernels must follow
// CUDA's rule that barriers are reached by every thread (block) — a violation deadlocks here too.
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

namespace simt {

constexpr size_t kArenaBytes = 64 * 1024;

inline thread_local int tid = 0;
inline thread_local int bid = 0;
inline thread_local int nblocks = 1;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* grid_barrier = nullptr;
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

template <typename Kernel>
void launch(int grid, int block, Kernel kernel) {
  std::barrier<> grid_bar(grid * block);
  std::vector<std::unique_ptr<std::barrier<>>> block_bars;
  std::vector<std::vector<char>> arenas(grid, std::vector<char>(kArenaBytes));
  for (int b = 0; b < grid; ++b) block_bars.emplace_back(std::make_unique<std::barrier<>>(block));
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
