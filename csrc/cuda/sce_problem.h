// The problem descriptor shared by the CUDA kernels (sce_kernels.cuh), their launchers and the
// ATen binding: plain C++, no CUDA or ATen headers.
#pragma once

#include <stdint.h>

namespace copa_fast {
namespace cuda {

constexpr int kThreads = 256;  // threads per block; the kernels' tile mapping assumes it
constexpr int kTile = 32;      // output tile (kTile x kTile) of the single-problem kernel's products
// Output tile of the episodes kernel's products: one block does all of an episode's tiles, so larger
// tiles (4 x 4 outputs a thread instead of 2 x 2: twice the products per shared-memory read) pay.
constexpr int kEpisodeTile = 64;

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
  // Split products of the one-launch kernel (copa_sce_single; 1, or 0 as left by an initialiser: not
  // split). Few output tiles (N = 500: 32 of S's, each 16 steps deep) would leave most blocks idle:
  // the depth is shared out, each share's partial tile stored, and the next phase sums them in a
  // fixed order.
  int ksplit_s;        // S = zn qn^T over ksplit_s ranges of D: partials in Spart (ksplit_s, n, c)
  int ksplit_q;        // dq = G^T zn over ksplit_q ranges of rows: partials in dqpart (ksplit_q, c, d)
  T* Spart;
  T* dqpart;
  // Column statistics of the phased path by strips of 32 columns x ranges of kStripRows rows (phase
  // 7: one block each, its (shift, shifted sum) pairs in Lpart (col_ranges, c, 2); phase 8 combines
  // them in range order into L). 0 / nullptr elsewhere.
  int col_ranges;
  T* Lpart;
};

// Phase 7's column tiles: strips of kStripCols columns x ranges of kStripRows rows, a block each.
constexpr int kStripCols = 32;    // one warp's lanes
constexpr int kStripRows = 512;
#if defined(__CUDACC__)
#define COPA_HOST_DEVICE __host__ __device__ inline
#else
#define COPA_HOST_DEVICE inline
#endif
COPA_HOST_DEVICE int strip_count(int c) { return (c + kStripCols - 1) / kStripCols; }
COPA_HOST_DEVICE int range_count(int n) { return (n + kStripRows - 1) / kStripRows; }
COPA_HOST_DEVICE int tile_blocks(int n, int c) { return strip_count(c) * range_count(n); }

struct SingleSplits {
  int scores;   // ksplit_s
  int dq;       // ksplit_q
};

// The splits of one problem on a grid of `blocks` co-resident blocks: S's tiles x ksplit_s up to the
// grid (each share at least one kTile step of D), dq's tiles split until a share is about as deep
// as a dz tile (K = C) and they fit the grid too; each partial buffer kept under 2^22 values.
inline SingleSplits plan_splits(long n, long c, long d, long blocks) {
  const auto cdiv = [](long a, long b) { return (a + b - 1) / b; };
  const auto clamp1 = [](long v) { return v < 1 ? 1L : v; };
  const long ti = cdiv(n, kTile), tc = cdiv(c, kTile), td = cdiv(d, kTile);
  const long budget = 1L << 22;
  long ks = blocks / (ti * tc);
  if (ks > td) ks = td;
  if (ks > budget / (n * c)) ks = budget / (n * c);
  long kq = cdiv(ti, tc);                           // dq tile depth (rows) / dz tile depth (classes)
  if (kq > blocks / (tc * td)) kq = blocks / (tc * td);
  if (kq > ti) kq = ti;
  if (kq > budget / (c * d)) kq = budget / (c * d);
  return {(int)clamp1(ks), (int)clamp1(kq)};
}

}  // namespace cuda
}  // namespace copa_fast
