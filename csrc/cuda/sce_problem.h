// The problem descriptor shared by the CUDA kernels (sce_kernels.cuh), their launchers and the
// ATen binding: plain C++, no CUDA or ATen headers.
#pragma once

#include <stdint.h>

namespace copa_fast {
namespace cuda {

constexpr int kThreads = 256;  // threads per block; the kernels' tile mapping assumes it
constexpr int kTile = 32;      // output tile (kTile x kTile) and depth chunk of the tiled products

template <typename T>
struct SceProblem {
  // inputs
  const T* z;          // (n, d)
  const T* q;          // (c, d)
  const int64_t* y;    // (n,)
  const T* w;          // (n,) weights or nullptr (= 1/n)
  const T* tau;        // (1,) on the device: the logit scale is exp(tau)
  int n, c, d;
  bool fused;
  // workspace, written by the kernel
  T* zn;               // (n, d)
  T* qn;               // (c, d)
  T* znorm;            // (n,)
  T* qnorm;            // (c,)
  T* cnt;              // (c,)
  T* wsum;             // (c,)
  T* S;                // (n, c): scores, then G
  // Row and column log-sum-exps as (max, log of the shifted sum) pairs: |S| reaches exp(tau), and
  // one rounded sum of the two would be all the precision left in the O(1) loss R + L - 2 S.
  T* R;                // (2n,)
  T* L;                // (2c,)
  T* row_dtau;         // (n,)
  T* wloss;            // (n,) weighted per-sample losses
  // outputs
  T* losses;           // (n,)
  int64_t* pred;       // (n,)
  T* dz;               // (n, d) when fused
  T* dq;               // (c, d) when fused
  T* loss;             // (1,)
  T* dtau;             // (1,) when fused
};

}  // namespace cuda
}  // namespace copa_fast
