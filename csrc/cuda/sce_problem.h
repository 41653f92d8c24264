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

// The scratch of one call (everything the kernels write that the caller does not get back) in ONE
// allocation: its buffers' offsets in elements of T, each a multiple of kWorkspaceAlign (256 B in
// float32, as cudaMalloc aligns its own), -1 for a buffer the call does not have. One allocation
// instead of up to fourteen: each is a trip through the framework's allocator on the host, and a
// small step's time on a GPU is mostly host work. Shared by the binding (csrc/cuda/binding.cpp) and
// the host runner of the tests (host_check.cpp), which runs the kernels over this very layout.
struct Workspace {
  long zn, qn, znorm, qnorm, cnt, wsum, S, R, L, row_dtau, wloss, Spart, dqpart, Lpart;
  long total;   // elements to allocate (at least 1)
};
constexpr long kWorkspaceAlign = 64;

// zn_separate: false when the normalised rows go over z (the caller's own buffer). s_entries: S's
// entries (N x C, or the episodes' s_total). spart, dqpart, lpart: entries of the split products'
// and the column tiles' partials, 0 for none.
inline Workspace workspace_layout(long n, long c, long d, long s_entries, bool zn_separate, long spart, long dqpart,
                                  long lpart) {
  long at = 0;
  const auto take = [&at](long count) {   // a buffer of `count` entries (0 entries: a valid, unread address)
    const long off = at;
    at += (count + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
    return off;
  };
  const auto maybe = [&take](long count) { return count > 0 ? take(count) : -1L; };
  Workspace w{};
  w.zn = zn_separate ? take(n * d) : -1;
  w.qn = take(c * d);
  w.znorm = take(n);
  w.qnorm = take(c);
  w.cnt = take(c);
  w.wsum = take(c);
  w.S = take(s_entries > 0 ? s_entries : 1);
  w.R = take(2 * n);   // (max, log sum) pairs
  w.L = take(2 * c);
  w.row_dtau = take(n);
  w.wloss = take(n);
  w.Spart = maybe(spart);
  w.dqpart = maybe(dqpart);
  w.Lpart = maybe(lpart);
  w.total = at > 0 ? at : 1;
  return w;
}

// Points p's scratch at `base` laid out as w (zn only when w has it: else the caller points it at z).
template <typename T>
void place_workspace(SceProblem<T>& p, T* base, const Workspace& w) {
  const auto at = [base](long off) { return off < 0 ? nullptr : base + off; };
  if (w.zn >= 0) p.zn = base + w.zn;
  p.qn = at(w.qn);
  p.znorm = at(w.znorm);
  p.qnorm = at(w.qnorm);
  p.cnt = at(w.cnt);
  p.wsum = at(w.wsum);
  p.S = at(w.S);
  p.R = at(w.R);
  p.L = at(w.L);
  p.row_dtau = at(w.row_dtau);
  p.wloss = at(w.wloss);
  p.Spart = at(w.Spart);
  p.dqpart = at(w.dqpart);
  p.Lpart = at(w.Lpart);
}

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
