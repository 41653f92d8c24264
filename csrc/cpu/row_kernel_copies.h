// The row kernels (row_kernels.inc) compiled once per instruction set, each copy in a namespace of
// its own: rows_baseline always; rows_avx2 and rows_avx512 (AVX-512 F, BW, DQ, VL) where GCC builds
// for x86-64, which defines COPA_FAST_ROW_ISA_COPIES; widest_row_copy() says which this CPU runs.
// Included inside the includer's namespace, by the CPU ops (symmetric_ce.cpp, which picks the
// widest copy the CPU runs) and by the host test driver tests/row_kernels_check.cpp. Needs
// <algorithm>, <cmath>, <cstdint>, <cstring> and <limits> included before.
#pragma once

namespace rows_baseline {
#include "row_kernels.inc"
}  // namespace rows_baseline
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COPA_FAST_ROW_ISA_COPIES 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace rows_avx2 {
#include "row_kernels.inc"
}  // namespace rows_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")
namespace rows_avx512 {
#include "row_kernels.inc"
}  // namespace rows_avx512
#pragma GCC pop_options
#endif

// The widest copy this CPU and its OS run: 0 baseline, 1 AVX2, 2 AVX-512 (the features of the
// targets above).
inline int widest_row_copy() {
  int best = 0;
#ifdef COPA_FAST_ROW_ISA_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = 1;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = 2;
#endif
  return best;
}
