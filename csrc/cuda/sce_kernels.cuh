// copa_fast CUDA kernels: the symmetric CE of CoPA in its exact N x C form (DESIGN §2), forward
// and (fused) gradient, in ONE launch.
//
// Raw pointers and a stream only, no ATen: nvcc compiles this without torch, and the same source
// compiles as plain C++ against simt_host.h, which runs every CUDA thread as a host thread (block
// and grid barriers included) so that CI checks the kernel logic — under AddressSanitizer — on a
// machine without a GPU.
//
// Work is split into phases separated by a barrier; within a phase, work items are taken
// round-robin: a row or a column (norms, statistics, losses, normalisation backward) by one warp
// — its reductions are warp shuffles, no block barrier — and a product tile by a whole block of
// kThreads threads:
//   P1  row norms and normalised rows of z and q; class counts and weight sums
//   P2  S = exp(tau) zn qn^T by kT x kT tiles (one launch, few tiles: shares of D, summed in P3)
//   P3  row log-sum-exp over the N expanded columns + row argmax; column log-sum-exp
//   P4  per-sample losses; (fused) G = dloss/dS written over S, per-row dloss/dtau
//   P5  (fused) dz = s G qn and dq = s G^T zn by kT x kT tiles (dq: shares of rows, summed in P6)
//   P6  (fused) normalisation backward of dz, dq; totals (loss, dtau) summed in a fixed order
// Three entry points share the phases: copa_sce_single (all blocks of a cooperative grid on one
// problem, grid-wide barriers, kT = 32), copa_sce_episodes (one block per episode, block barriers,
// kT = 64: one block does all of an episode's tiles, 4 x 4 outputs a thread) and
// copa_sce_phase (one phase per launch, for large problems whose P2 and P5 a vendor GEMM computes;
// there P3 is "phase 7", its columns by tiles of 32 columns x 512 rows, a block each, reading whole
// lines of S, and "phase 8" combines each column's tiles).
// Every reduction has a fixed order: results are bitwise reproducible. Labels outside 0..C-1 are
// never used as an index: their rows get NaN.
#pragma once

#include <stdint.h>

#include "sce_problem.h"

#ifdef COPA_SIMT_HOST
#include "simt_host.h"
#else
#include <cooperative_groups.h>
#define COPA_DEVICE __device__ __forceinline__
#define COPA_GLOBAL __global__
#define COPA_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#define COPA_TID ((int)threadIdx.x)
#define COPA_BID ((int)blockIdx.x)
#define COPA_NBLOCKS ((int)gridDim.x)
#define COPA_SYNC_BLOCK() __syncthreads()
#define COPA_SYNC_GRID() cooperative_groups::this_grid().sync()
#define COPA_SYNC_WARP() __syncwarp()
template <typename T>
__device__ __forceinline__ T copa_shfl_xor(T v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
template <typename T>
__device__ __forceinline__ T copa_shfl(T v, int lane) { return __shfl_sync(0xffffffffu, v, lane); }
template <>
__device__ __forceinline__ int64_t copa_shfl_xor<int64_t>(int64_t v, int mask) {
  return (int64_t)__shfl_xor_sync(0xffffffffu, (long long)v, mask);
}
template <>
__device__ __forceinline__ int64_t copa_shfl<int64_t>(int64_t v, int lane) {
  return (int64_t)__shfl_sync(0xffffffffu, (long long)v, lane);
}
#define COPA_SHFL_XOR(v, mask) copa_shfl_xor((v), (mask))
#define COPA_SHFL(v, lane) copa_shfl((v), (lane))
#define COPA_MIN_BLOCKS(k) __launch_bounds__(kThreads, k)
#define COPA_SET_FLAG(p) atomicExch((p), 1)
#endif

namespace copa_fast {
namespace cuda {


// Operand tiles of the products, k-major: A(i, k) at a[k * (kT + kPad) + i], B(k, j) at
// b[k * (kT + kPad) + j], kDepth steps deep (kT the kernel's output tile: see tile_product).
template <typename T>
struct Shared {
  T* a;
  T* b;
};

constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;   // warps of a block: each takes its own row items
static_assert(kThreads % kWarpSize == 0, "whole warps per block");

template <typename T> COPA_DEVICE T neg_inf() { return T(-INFINITY); }
template <typename T> COPA_DEVICE T quiet_nan();
template <> COPA_DEVICE float quiet_nan<float>() { return nanf(""); }
template <> COPA_DEVICE double quiet_nan<double>() { return nan(""); }
template <typename T> COPA_DEVICE T dev_exp(T x);
template <typename T> COPA_DEVICE T dev_log(T x);
template <typename T> COPA_DEVICE T dev_sqrt(T x);
template <> COPA_DEVICE float dev_exp<float>(float x) { return expf(x); }
template <> COPA_DEVICE double dev_exp<double>(double x) { return exp(x); }
template <> COPA_DEVICE float dev_log<float>(float x) { return logf(x); }
template <> COPA_DEVICE double dev_log<double>(double x) { return log(x); }
template <> COPA_DEVICE float dev_sqrt<float>(float x) { return sqrtf(x); }
template <> COPA_DEVICE double dev_sqrt<double>(double x) { return sqrt(x); }
template <typename T> COPA_DEVICE T dev_abs(T x) { return x < T(0) ? -x : x; }
template <typename T> COPA_DEVICE T dev_max(T a, T b) { return a > b ? a : b; }
template <typename T> COPA_DEVICE T dev_min(T a, T b) { return a > b ? b : a; }   // a NaN a stays NaN

constexpr double kNormEps = 1e-12;

// ---- warp reductions: a fixed xor-butterfly order over the 32 lanes ---------------------------------
// Every lane ends with lane 0's result (broadcast): one value for the whole warp even where NaN
// makes the operator order-dependent.

COPA_DEVICE int lane_id() { return COPA_TID % kWarpSize; }
COPA_DEVICE int warp_id() { return COPA_TID / kWarpSize; }

struct SumOp {
  template <typename T> COPA_DEVICE T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T> COPA_DEVICE T operator()(T a, T b) const { return dev_max(a, b); }
};

template <typename T, typename Op>
COPA_DEVICE T warp_reduce(T v, Op op) {
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, COPA_SHFL_XOR(v, m));
  return COPA_SHFL(v, 0);
}

template <typename T> COPA_DEVICE T warp_sum(T v) { return warp_reduce(v, SumOp{}); }
template <typename T> COPA_DEVICE T warp_max(T v) { return warp_reduce(v, MaxOp{}); }

// (value, index) maximum, the smallest index on ties; index -1 marks an empty slot.
template <typename T>
COPA_DEVICE int64_t warp_argmax(T v, int64_t i) {
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const T ov = COPA_SHFL_XOR(v, m);
    const int64_t oi = COPA_SHFL_XOR(i, m);
    if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) {
      v = ov;
      i = oi;
    }
  }
  return COPA_SHFL(i, 0);
}

// ---- phase 1: norms, normalised rows, class counts ------------------------------------------------

// Scaled norm (max |x| first) so that float32 neither overflows at 1e20 nor underflows at 1e-20.
// One warp per row; each lane reads and writes its own columns (xn may be x itself).
template <typename T>
COPA_DEVICE void normalize_row(const T* x, T* xn, T* norm_out, int d) {
  const int l = lane_id();
  T m = T(0);
  for (int k = l; k < d; k += kWarpSize) m = dev_max(m, dev_abs(x[k]));
  m = warp_max(m);
  const T safe = m > T(0) ? m : T(1);
  T ss = T(0);
  for (int k = l; k < d; k += kWarpSize) {
    const T v = x[k] / safe;
    ss += v * v;
  }
  ss = warp_sum(ss);
  const T nrm = m * dev_sqrt(ss);
  if (l == 0) *norm_out = nrm;
  const T inv = T(1) / dev_max(nrm, T(kNormEps));
  for (int k = l; k < d; k += kWarpSize) xn[k] = x[k] * inv;
}

template <typename T>
COPA_DEVICE void count_class(const SceProblem<T>& p, int cls) {
  T cnt = T(0), ws = T(0);
  for (int i = lane_id(); i < p.n; i += kWarpSize) {
    if (p.y[i] == cls) {
      cnt += T(1);
      ws += p.w ? p.w[i] : T(0);
    }
  }
  cnt = warp_sum(cnt);
  ws = warp_sum(ws);
  if (lane_id() == 0) {
    p.cnt[cls] = cnt;
    p.wsum[cls] = p.w ? ws : cnt / T(p.n);
  }
}

// ---- tiled products: out(i, j) = alpha * sum_k A(i, k) B(k, j) on one kT x kT tile ----------------
// Element (i, k) of A is at A[i * sai + k * sak], (k, j) of B at B[k * sbk + j * sbj]. The 16 x 16
// threads each own kT/16 x kT/16 outputs: rows kPer * (t / 16) + u, columns kPer * (t % 16) + v. Each
// depth step (kDepth deep) is staged through shared memory, k-major, so that a thread reads its
// kPer values of A and of B at k as consecutive words (vector loads where aligned) and makes kPer^2
// products of them. Software-pipelined: each thread's global loads for step s + 1 are issued before
// the products of step s. Out-of-range loads give 0; every output sums its products in ascending k
// (whatever kT: the same bits for the same depth).

constexpr int kDepth = 32;   // depth step of the tiled products
constexpr int kPad = 4;      // shared rows of kT + 4 values: 16-byte aligned, stores at most 4-way conflicted

template <int kT>
struct SharedTile {
  static constexpr int kValues = kDepth * (kT + kPad);   // of each operand
};

// kAIFast: A's rows are contiguous (sai == 1: A read transposed); kBJFast: B's columns are (sbj == 1).
template <int kT, bool kAIFast, bool kBJFast, typename T>
COPA_DEVICE void tile_product(const T* A, long sai, long sak, const T* B, long sbk, long sbj, int M, int N, int K,
                              int tile_i, int tile_j, T alpha, T* out, long ld_out, const Shared<T>& sh) {
  constexpr int kPer = kT / 16;                    // outputs a thread along each axis
  constexpr int kRow = kT + kPad;
  constexpr int kStage = kT * kDepth / kThreads;   // elements of each operand a thread stages a step
  static_assert(kThreads == 256 && kT % 16 == 0 && (kT * kDepth) % kThreads == 0, "tile geometry");
  static_assert(kThreads % kT == 0 && kThreads % kDepth == 0, "whole tile rows per stage");
  const int t = COPA_TID;
  const int ty = t / 16, tx = t % 16;
  const int i0 = tile_i * kT, j0 = tile_j * kT;
  // Staged element u of each operand: consecutive threads along the operand's contiguous axis
  // (coalesced global loads): A's row ia + u * dia at depth ka + u * dka, B's column jb + u * djb at
  // depth kb + u * dkb.
  const int ia = kAIFast ? t % kT : t / kDepth, ka = kAIFast ? t / kT : t % kDepth;
  constexpr int dia = kAIFast ? 0 : kThreads / kDepth, dka = kAIFast ? kThreads / kT : 0;
  const int jb = kBJFast ? t % kT : t / kDepth, kb = kBJFast ? t / kT : t % kDepth;
  constexpr int djb = kBJFast ? 0 : kThreads / kDepth, dkb = kBJFast ? kThreads / kT : 0;
  T ra[kStage], rb[kStage];
  const auto fetch = [&](int k0) {
    for (int u = 0; u < kStage; ++u) {
      const int gi = i0 + ia + u * dia, gk = k0 + ka + u * dka;
      ra[u] = (gi < M && gk < K) ? A[gi * sai + gk * sak] : T(0);
      const int gj = j0 + jb + u * djb, gkb = k0 + kb + u * dkb;
      rb[u] = (gj < N && gkb < K) ? B[gkb * sbk + gj * sbj] : T(0);
    }
  };
  T acc[kPer][kPer];
  for (int u = 0; u < kPer; ++u)
    for (int v = 0; v < kPer; ++v) acc[u][v] = T(0);
  fetch(0);
  for (int k0 = 0; k0 < K; k0 += kDepth) {
    for (int u = 0; u < kStage; ++u) {
      sh.a[(ka + u * dka) * kRow + ia + u * dia] = ra[u];
      sh.b[(kb + u * dkb) * kRow + jb + u * djb] = rb[u];
    }
    COPA_SYNC_BLOCK();
    if (k0 + kDepth < K) fetch(k0 + kDepth);   // in flight during this step's products
    for (int k = 0; k < kDepth; ++k) {
      T a[kPer], b[kPer];
      for (int u = 0; u < kPer; ++u) a[u] = sh.a[k * kRow + kPer * ty + u];
      for (int v = 0; v < kPer; ++v) b[v] = sh.b[k * kRow + kPer * tx + v];
      for (int u = 0; u < kPer; ++u)
        for (int v = 0; v < kPer; ++v) acc[u][v] += a[u] * b[v];
    }
    COPA_SYNC_BLOCK();
  }
  for (int u = 0; u < kPer; ++u) {
    for (int v = 0; v < kPer; ++v) {
      const int gi = i0 + kPer * ty + u, gj = j0 + kPer * tx + v;
      if (gi < M && gj < N) out[(long)gi * ld_out + gj] = alpha * acc[u][v];
    }
  }
}

// ---- phase 3: row and column statistics -------------------------------------------------------------

// S(i, c) of a split product (p.ksplit_s > 1): exp(tau) x the shares of D summed in split order. The
// row items of phase 3 write it into S; the column items of the same phase form it themselves.
template <typename T>
COPA_DEVICE T split_score(const SceProblem<T>& p, long at, T scale) {
  T acc = T(0);
  for (int k = 0; k < p.ksplit_s; ++k) acc += p.Spart[(long)k * p.n * p.c + at];
  return scale * acc;
}

template <typename T>
COPA_DEVICE void row_stats(const SceProblem<T>& p, int i, T scale) {
  T* s = p.S + (long)i * p.c;
  const int l = lane_id();
  if (p.ksplit_s > 1) {
    for (int c = l; c < p.c; c += kWarpSize) s[c] = split_score(p, (long)i * p.c + c, scale);
    COPA_SYNC_WARP();
  }
  T m = neg_inf<T>(), best = neg_inf<T>();
  int64_t arg = -1;
  for (int c = l; c < p.c; c += kWarpSize) {
    if (p.cnt[c] > T(0)) m = dev_max(m, s[c]);
    if (arg < 0 || s[c] > best) {
      best = s[c];
      arg = c;
    }
  }
  m = warp_max(m);
  const int64_t am = warp_argmax(best, arg);
  const T shift = m == neg_inf<T>() ? T(0) : m;
  T sum = T(0);
  for (int c = l; c < p.c; c += kWarpSize)
    if (p.cnt[c] > T(0)) sum += p.cnt[c] * dev_exp(s[c] - shift);
  sum = warp_sum(sum);
  if (l == 0) {
    p.R[2 * i] = shift;   // the pair (max, log of the shifted sum); see SceProblem::R
    p.R[2 * i + 1] = dev_log(sum);
    p.pred[i] = am < 0 ? 0 : am;
  }
}

template <typename T>
COPA_DEVICE void col_stats(const SceProblem<T>& p, int c, T scale) {
  // S(i, c): S itself, or formed from the split shares as the row items form it (the same bits)
  const auto score = [&](int i) {
    const long at = (long)i * p.c + c;
    return p.ksplit_s > 1 ? split_score(p, at, scale) : p.S[at];
  };
  const int l = lane_id();
  T m = neg_inf<T>();
  for (int i = l; i < p.n; i += kWarpSize) m = dev_max(m, score(i));
  m = warp_max(m);
  const T shift = m == neg_inf<T>() ? T(0) : m;
  T sum = T(0);
  for (int i = l; i < p.n; i += kWarpSize) sum += dev_exp(score(i) - shift);
  sum = warp_sum(sum);
  if (l == 0) {
    p.L[2 * c] = shift;
    p.L[2 * c + 1] = dev_log(sum);
  }
}

// Column statistics of the phased path (large N), phase 7: one block a tile of kWarpSize columns x
// kStripRows rows, lane = column, the block's warps taking rows w, w + kWarps, ... of the tile — each
// load a row's 32 consecutive scores (one 128-byte line), where a warp walking a column at a stride
// of C read 32 lines for 32 scores, ~N / 32 steps in sequence (most of the phased step's ~0.9 ms of
// phases at N = 16384 on an H200). The warps' maxima, then sums, are combined in warp order in shared
// memory (sh: kThreads values); the tile's (shift, shifted sum) pair goes to Lpart, and phase 8
// combines a column's pairs in range order: a fixed order whatever the grid.
static_assert(kStripCols == kWarpSize, "a column tile's strip is one warp's lanes");

template <typename T>
COPA_DEVICE void col_tile_stats(const SceProblem<T>& p, int strip, int range, T* sh) {
  const int l = lane_id(), w = warp_id();
  const int c = strip * kWarpSize + l;
  const bool live = c < p.c;
  const int i0 = range * kStripRows, i1 = i0 + kStripRows < p.n ? i0 + kStripRows : p.n;
  T m = neg_inf<T>();
  if (live)
    for (int i = i0 + w; i < i1; i += kWarps) m = dev_max(m, p.S[(long)i * p.c + c]);
  sh[w * kWarpSize + l] = m;
  COPA_SYNC_BLOCK();
  m = neg_inf<T>();
  for (int v = 0; v < kWarps; ++v) m = dev_max(m, sh[v * kWarpSize + l]);
  const T shift = m == neg_inf<T>() ? T(0) : m;
  T sum = T(0);
  if (live)
    for (int i = i0 + w; i < i1; i += kWarps) sum += dev_exp(p.S[(long)i * p.c + c] - shift);
  COPA_SYNC_BLOCK();   // every warp has read the maxima
  sh[w * kWarpSize + l] = sum;
  COPA_SYNC_BLOCK();
  if (w == 0 && live) {
    sum = T(0);
    for (int v = 0; v < kWarps; ++v) sum += sh[v * kWarpSize + l];
    T* pair = p.Lpart + 2 * ((long)range * p.c + c);
    pair[0] = shift;
    pair[1] = sum;
  }
  COPA_SYNC_BLOCK();   // sh is rewritten by the block's next tile
}

// Phase 8: column c's pairs of phase 7, combined in range order (lane r takes ranges r, r + 32, ...,
// then a fixed butterfly): L = (M, log sum_r s_r exp(m_r - M)), M the largest shift.
template <typename T>
COPA_DEVICE void col_combine(const SceProblem<T>& p, int c) {
  const int l = lane_id();
  T m = neg_inf<T>();
  for (int r = l; r < p.col_ranges; r += kWarpSize) m = dev_max(m, p.Lpart[2 * ((long)r * p.c + c)]);
  m = warp_max(m);
  const T shift = m == neg_inf<T>() ? T(0) : m;
  T sum = T(0);
  for (int r = l; r < p.col_ranges; r += kWarpSize) {
    const T* pair = p.Lpart + 2 * ((long)r * p.c + c);
    sum += pair[1] * dev_exp(pair[0] - shift);
  }
  sum = warp_sum(sum);
  if (l == 0) {
    p.L[2 * c] = shift;
    p.L[2 * c + 1] = dev_log(sum);
  }
}

// ---- phase 4: losses and G -----------------------------------------------------------------------

template <typename T>
COPA_DEVICE void row_loss_and_grad(const SceProblem<T>& p, int i) {
  T* s = p.S + (long)i * p.c;
  const int64_t yi = p.y[i];
  const bool valid = yi >= 0 && yi < p.c;
  const int yc = valid ? (int)yi : 0;
  const T wi = p.w ? p.w[i] : T(1) / T(p.n);
  const T r_max = p.R[2 * i], r_log = p.R[2 * i + 1];
  // (R - S) + (L - S) from the pairs: max - S is exact when S is near the max, and the O(1) loss
  // keeps the working precision whatever exp(tau)
  const T loss =
      valid ? T(0.5) * (((r_max - s[yc]) + r_log) + ((p.L[2 * yc] - s[yc]) + p.L[2 * yc + 1])) : quiet_nan<T>();
  T dt = T(0);
  if (p.fused) {
    COPA_SYNC_WARP();  // every lane has read S[i, y_i] above; now S -> G in place, entry by entry
    for (int c = lane_id(); c < p.c; c += kWarpSize) {
      const T sc = s[c];
      // both exponents are <= 0 wherever their term counts; the clamp keeps 0 * exp(overflow) from
      // making NaN for a class with no sample (n_c = 0, validation off) that scores above the row max
      T g = T(0.5) * (wi * p.cnt[c] * dev_exp(dev_min((sc - r_max) - r_log, T(0))) +
                      p.wsum[c] * dev_exp(dev_min((sc - p.L[2 * c]) - p.L[2 * c + 1], T(0))));
      if (c == yc) g -= wi;
      if (!valid) g = quiet_nan<T>();
      dt += g * sc;
      s[c] = g;
    }
    dt = warp_sum(dt);
  }
  if (lane_id() == 0) {
    p.losses[i] = loss;
    p.wloss[i] = wi * loss;
    p.row_dtau[i] = dt;
  }
}

// ---- phase 6: normalisation backward, totals --------------------------------------------------------

// g <- (g - xn <xn, g>) / ||x|| (g / eps where the norm was clamped), as F.normalize's backward.
// One warp per row; each lane updates its own columns.
template <typename T>
COPA_DEVICE void normalize_backward(T* g, const T* xn, T nrm, int d) {
  const int l = lane_id();
  T dot = T(0);
  for (int k = l; k < d; k += kWarpSize) dot += xn[k] * g[k];
  dot = warp_sum(dot);
  const bool live = nrm > T(kNormEps);
  const T inv = T(1) / dev_max(nrm, T(kNormEps));
  for (int k = l; k < d; k += kWarpSize) g[k] = live ? (g[k] - xn[k] * dot) * inv : g[k] * inv;
}

template <typename T>
COPA_DEVICE void totals(const SceProblem<T>& p) {
  T l = T(0), dt = T(0);
  for (int i = lane_id(); i < p.n; i += kWarpSize) {
    l += p.wloss[i];
    dt += p.row_dtau[i];
  }
  l = warp_sum(l);
  dt = warp_sum(dt);
  if (lane_id() == 0) {
    p.loss[0] = l;
    if (p.fused) p.dtau[0] = dt;
  }
}

// ---- the phases, shared by every entry point --------------------------------------------------------
// Each runs its items round-robin over `workers` workers (blocks): the row phases over the workers'
// warps (worker w's warp k is row worker w * kWarps + k), the products over whole blocks; `scale`
// is exp(tau).

template <typename T>
COPA_DEVICE void phase_norms(const SceProblem<T>& p, int worker, int workers) {  // P1
  for (int item = worker * kWarps + warp_id(); item < p.n + 2 * p.c; item += workers * kWarps) {
    if (item < p.n) {
      normalize_row(p.z + (long)item * p.d, p.zn + (long)item * p.d, p.znorm + item, p.d);
    } else if (item < p.n + p.c) {
      const int c = item - p.n;
      normalize_row(p.q + (long)c * p.d, p.qn + (long)c * p.d, p.qnorm + c, p.d);
    } else {
      count_class(p, item - p.n - p.c);
    }
  }
}

// P2: S = scale * zn qn^T (n x c) by kT x kT tiles
template <int kT, typename T>
COPA_DEVICE void phase_scores(const SceProblem<T>& p, T scale, int worker, int workers, const Shared<T>& sh) {
  const int ti = (p.n + kT - 1) / kT, tc = (p.c + kT - 1) / kT;
  if (p.ksplit_s <= 1) {
    for (int item = worker; item < ti * tc; item += workers)
      tile_product<kT, false, false>(p.zn, p.d, 1, p.qn, 1, p.d, p.n, p.c, p.d, item / tc, item % tc, scale, p.S,
                                     p.c, sh);
    return;
  }
  // share k of D: columns k0 .. k0 + depth - 1 (whole kDepth steps; a share past D stores zeros)
  const int span = ((p.d + kDepth - 1) / kDepth + p.ksplit_s - 1) / p.ksplit_s * kDepth;
  for (int item = worker; item < ti * tc * p.ksplit_s; item += workers) {
    const int tile = item % (ti * tc), k = item / (ti * tc);
    const int k0 = k * span, depth = dev_max(0, dev_min(span, p.d - k0));
    tile_product<kT, false, false>(p.zn + k0, p.d, 1, p.qn + k0, 1, p.d, p.n, p.c, depth, tile / tc, tile % tc, T(1),
                 p.Spart + (long)k * p.n * p.c, p.c, sh);
  }
}

template <typename T>
COPA_DEVICE void phase_stats(const SceProblem<T>& p, T scale, int worker, int workers) {  // P3
  for (int item = worker * kWarps + warp_id(); item < p.n + p.c; item += workers * kWarps) {
    if (item < p.n) row_stats(p, item, scale);
    else col_stats(p, item - p.n, scale);
  }
}

template <typename T>
COPA_DEVICE void phase_losses(const SceProblem<T>& p, int worker, int workers) {  // P4
  for (int item = worker * kWarps + warp_id(); item < p.n; item += workers * kWarps) row_loss_and_grad(p, item);
}

// P5: dz = scale * G qn (n x d), dq = scale * G^T zn (c x d) by kT x kT tiles
template <int kT, typename T>
COPA_DEVICE void phase_products(const SceProblem<T>& p, T scale, int worker, int workers, const Shared<T>& sh) {
  const int ti = (p.n + kT - 1) / kT, tc = (p.c + kT - 1) / kT, td = (p.d + kT - 1) / kT;
  const int kq = p.ksplit_q > 1 ? p.ksplit_q : 1;
  // dq share k: rows i0 .. i0 + depth - 1 (whole kDepth steps; a share past N stores zeros)
  const int span = ((p.n + kDepth - 1) / kDepth + kq - 1) / kq * kDepth;
  for (int item = worker; item < ti * td + tc * td * kq; item += workers) {
    if (item < ti * td) {
      tile_product<kT, false, true>(p.S, p.c, 1, p.qn, p.d, 1, p.n, p.d, p.c, item / td, item % td, scale, p.dz,
                                    p.d, sh);
    } else if (kq == 1) {
      const int it = item - ti * td;
      tile_product<kT, true, true>(p.S, 1, p.c, p.zn, p.d, 1, p.c, p.d, p.n, it / td, it % td, scale, p.dq, p.d, sh);
    } else {
      const int it = (item - ti * td) % (tc * td), k = (item - ti * td) / (tc * td);
      const int i0 = k * span, depth = dev_max(0, dev_min(span, p.n - i0));
      tile_product<kT, true, true>(p.S + (long)i0 * p.c, 1, p.c, p.zn + (long)i0 * p.d, p.d, 1, p.c, p.d, depth,
                                   it / td, it % td, T(1), p.dqpart + (long)k * p.c * p.d, p.d, sh);
    }
  }
}

template <typename T>
COPA_DEVICE void phase_finish(const SceProblem<T>& p, T scale, int worker, int workers) {  // P6
  for (int item = worker * kWarps + warp_id(); item < 1 + (p.fused ? p.n + p.c : 0); item += workers * kWarps) {
    if (item == 0) totals(p);
    else if (item <= p.n) normalize_backward(p.dz + (long)(item - 1) * p.d, p.zn + (long)(item - 1) * p.d,
                                             p.znorm[item - 1], p.d);
    else {
      const int c = item - 1 - p.n;
      T* g = p.dq + (long)c * p.d;
      if (p.ksplit_q > 1) {   // dq row c: exp(tau) x the row shares summed in split order (each lane its k)
        for (int k = lane_id(); k < p.d; k += kWarpSize) {
          T acc = T(0);
          for (int s = 0; s < p.ksplit_q; ++s) acc += p.dqpart[((long)s * p.c + c) * p.d + k];
          g[k] = scale * acc;
        }
      }
      normalize_backward(g, p.qn + (long)c * p.d, p.qnorm[c], p.d);
    }
  }
}

// Work items (rows, one warp each) of the phases the one-phase kernel runs (the launcher sizes its
// grid by them: kWarps items a block).
inline long phase_items(int phase, int n, int c, bool fused) {
  switch (phase) {
    case 1: return (long)n + 2L * c;
    case 3: return (long)n + c;
    case 7: return n;   // the row items; the column tiles get blocks of their own (launch_phase)
    case 8: return c;
    case 4: return n;
    default: return 1 + (fused ? (long)n + c : 0L);
  }
}

template <int kT, typename T, typename Sync>
COPA_DEVICE void run_problem(const SceProblem<T>& p, int worker, int workers, const Shared<T>& sh, Sync sync) {
  const T scale = dev_exp(p.tau[0]);
  phase_norms(p, worker, workers);
  sync();
  phase_scores<kT>(p, scale, worker, workers, sh);
  sync();
  phase_stats(p, scale, worker, workers);
  sync();
  phase_losses(p, worker, workers);
  sync();
  if (p.fused) {
    phase_products<kT>(p, scale, worker, workers, sh);
    sync();
  }
  phase_finish(p, scale, worker, workers);
}

struct GridSync {
  COPA_DEVICE void operator()() const { COPA_SYNC_GRID(); }
};
struct BlockSync {
  COPA_DEVICE void operator()() const { COPA_SYNC_BLOCK(); }
};

#define COPA_DECLARE_SHARED(T, kT)                                       \
  COPA_SHARED_ARRAY(T, copa_sh_a, SharedTile<kT>::kValues);            \
  COPA_SHARED_ARRAY(T, copa_sh_b, SharedTile<kT>::kValues);            \
  const Shared<T> sh{copa_sh_a, copa_sh_b}

// One problem, every block of a cooperative grid (launched with cudaLaunchCooperativeKernel, at
// most as many blocks as fit on the device at once).
template <typename T>
COPA_GLOBAL void COPA_MIN_BLOCKS(sizeof(T) == 4 ? 3 : 2) copa_sce_single(SceProblem<T> p) {
  COPA_DECLARE_SHARED(T, kTile);
  run_problem<kTile>(p, COPA_BID, COPA_NBLOCKS, sh, GridSync{});
}

// One phase (1, 3, 4 or 6) of one problem over an ordinary grid: the large-problem path, where the two
// products P2 and P5 go to a vendor GEMM between launches (csrc/cuda/binding.cpp) and the launch
// boundaries stand in for the grid barriers.
template <typename T>
COPA_GLOBAL void copa_sce_phase(SceProblem<T> p, int phase) {   // no product here
  COPA_SHARED_ARRAY(T, sh, kThreads);   // phase 7's column tiles
  const T scale = dev_exp(p.tau[0]);   // (used by split products only; the phased path has none)
  if (phase == 1) phase_norms(p, COPA_BID, COPA_NBLOCKS);
  else if (phase == 3) phase_stats(p, scale, COPA_BID, COPA_NBLOCKS);
  else if (phase == 7) {   // P3 of the phased path: the last tile_blocks(n, c) blocks take column tiles
    const int tiles = tile_blocks(p.n, p.c), row_blocks = COPA_NBLOCKS - tiles, strips = strip_count(p.c);
    if (COPA_BID < row_blocks) {
      for (int item = COPA_BID * kWarps + warp_id(); item < p.n; item += row_blocks * kWarps)
        row_stats(p, item, scale);
    } else {
      const int t = COPA_BID - row_blocks;
      col_tile_stats(p, t % strips, t / strips, sh);
    }
  } else if (phase == 8) {
    for (int item = COPA_BID * kWarps + warp_id(); item < p.c; item += COPA_NBLOCKS * kWarps) col_combine(p, item);
  }
  else if (phase == 4) phase_losses(p, COPA_BID, COPA_NBLOCKS);
  else if (phase == 6) phase_finish(p, scale, COPA_BID, COPA_NBLOCKS);
}

// E episodes, one block each. Episode e owns rows rows[2e] + (0..rows[2e+1]) of z (and of every
// per-row buffer), classes cls[2e] + (0..cls[2e+1]) of q, and the score block of rows[2e+1] x
// cls[2e+1] entries at s_off[e] of the s_total of S; its labels are local to it. The template
// problem `base` holds the stacked buffers (base.n rows, base.c classes). The layout is the
// caller's and is not trusted: an episode whose rows, classes or score block do not lie inside
// those buffers (a negative start or count included) touches nothing and gets a NaN loss and dtau
// — memory-safe without a host check, which would cost a synchronisation a step.
COPA_DEVICE bool episode_fits(long start, long count, long total) {
  return start >= 0 && start <= total && count >= 0 && count <= total - start;
}

template <typename T>
COPA_GLOBAL void COPA_MIN_BLOCKS(1) copa_sce_episodes(SceProblem<T> base, const int64_t* rows, const int64_t* cls,
                                                      const int64_t* s_off, long s_total, const T* tau) {
  COPA_DECLARE_SHARED(T, kEpisodeTile);
  const int e = COPA_BID;
  const long r0 = rows[2 * e], c0 = cls[2 * e], n_e = rows[2 * e + 1], c_e = cls[2 * e + 1], s0 = s_off[e];
  if (!episode_fits(r0, n_e, base.n) || !episode_fits(c0, c_e, base.c) ||
      !episode_fits(s0, n_e * c_e, s_total)) {   // n_e, c_e < 2^31 here: their product fits
    if (COPA_TID == 0) {
      base.loss[e] = quiet_nan<T>();
      if (base.fused) base.dtau[e] = quiet_nan<T>();
    }
    return;
  }
  const long d = base.d;
  SceProblem<T> p = base;
  p.n = (int)n_e;
  p.c = (int)c_e;
  p.tau = tau + e;
  p.z += r0 * d;
  p.zn += r0 * d;
  p.q += c0 * d;
  p.qn += c0 * d;
  p.y += r0;
  p.znorm += r0;
  p.R += 2 * r0;
  p.row_dtau += r0;
  p.wloss += r0;
  p.losses += r0;
  p.pred += r0;
  p.qnorm += c0;
  p.cnt += c0;
  p.wsum += c0;
  p.L += 2 * c0;
  p.S += s0;
  if (p.fused) {
    p.dz += r0 * d;
    p.dq += c0 * d;
    p.dtau += e;
  }
  p.loss += e;
  p.w = nullptr;
  if (p.n > 0 && p.c > 0) {
    run_problem<kEpisodeTile>(p, 0, 1, sh, BlockSync{});
  } else if (COPA_TID == 0) {  // an empty episode: zero loss, no gradient
    p.loss[0] = T(0);
    if (p.fused) p.dtau[0] = T(0);
  }
}

// Class means of copa_loss's prototype rows: p0[c] = mean of the rows i of pf with label c (C x D), one
// class per block (round-robin), kMeanCols columns a thread (D <= 1024 in one pass over the labels),
// rows summed in index order (deterministic). Labels outside [0, C) are clamped into it, never used
// as an index as they are (their rows' losses are NaN anyway); a class with no row gets zeros. One
// launch in place of a one-hot GEMM and its helpers.
//
// The labels are read by the whole block, kThreads at a time (coalesced); a chunk's rows of the
// block's class are listed in ascending order in shared memory (a prefix count of the matches over
// each warp by shuffles, then over the warps), then every thread adds its columns of those rows in
// list order: the same additions in the same order as a walk over the rows one by one, without a
// dependent global load per row (that walk took 2.9 ms of a 5.3 ms step at N = 16384, C = 1000 on
// an H200: 16,384 label loads in sequence in each block).
constexpr int kMeanCols = 4;

template <typename T>
COPA_GLOBAL void copa_class_means(const T* pf, const int64_t* y, int n, int c, int d, T* p0) {
  COPA_SHARED_ARRAY(int, hit_rows, kThreads);   // a chunk's rows of the class, ascending
  COPA_SHARED_ARRAY(int, warp_hits, kWarps);    // matches per warp in the chunk
  const int lane = lane_id(), warp = warp_id();
  for (int cls = COPA_BID; cls < c; cls += COPA_NBLOCKS) {
    for (int k0 = 0; k0 < d; k0 += kThreads * kMeanCols) {
      T acc[kMeanCols];
      for (int j = 0; j < kMeanCols; ++j) acc[j] = T(0);
      T cnt = T(0);
      for (int i0 = 0; i0 < n; i0 += kThreads) {
        const int i = i0 + COPA_TID;
        int hit = 0;
        if (i < n) {
          const int64_t yi = y[i];
          hit = (yi < 0 ? 0 : (yi >= c ? c - 1 : yi)) == cls;
        }
        int upto = hit;   // matches among lanes 0..lane of this warp (inclusive prefix)
        for (int o = 1; o < kWarpSize; o <<= 1) {
          const int v = COPA_SHFL(upto, lane >= o ? lane - o : lane);
          if (lane >= o) upto += v;
        }
        if (lane == kWarpSize - 1) warp_hits[warp] = upto;
        COPA_SYNC_BLOCK();
        int before = 0, total = 0;
        for (int w = 0; w < kWarps; ++w) {
          const int h = warp_hits[w];
          before += w < warp ? h : 0;
          total += h;
        }
        if (hit) hit_rows[before + upto - 1] = i;
        COPA_SYNC_BLOCK();
        for (int r = 0; r < total; ++r) {   // the same count for every thread of the block
          const T* row = pf + (long)hit_rows[r] * d;
          for (int j = 0; j < kMeanCols; ++j) {
            const int k = k0 + j * kThreads + COPA_TID;
            if (k < d) acc[j] += row[k];
          }
        }
        cnt += T(total);
        // no barrier here: the next chunk writes warp_hits only after every thread passed the barrier
        // above (all reads of it done), and hit_rows only after its own first barrier
      }
      const T denom = cnt > T(0) ? cnt : T(1);
      for (int j = 0; j < kMeanCols; ++j) {
        const int k = k0 + j * kThreads + COPA_TID;
        if (k < d) p0[(long)cls * d + k] = acc[j] / denom;
      }
    }
  }
}

// ---- value checks: one summary of a call's data, read back in one copy --------------------------
// The public API's value checks (labels in 0..C-1 with every class present, finite features, tau)
// as two kernels: copa_count_nonfinite counts a checked tensor's NaN and +-Inf entries (one partial
// count a block), then copa_label_summary, one block, writes [min label, max label, distinct labels
// in [0, k), non-finite entries, tau] as doubles. A value is non-finite when its exponent bits are
// all ones, so the counting kernel reads bits (U: the float's width) and serves every floating dtype.
// Integer counts: the same result whatever the block count or the schedule.
template <typename U>
COPA_GLOBAL void copa_count_nonfinite(const U* x, long rows, long cols, long s0, long s1, U exp_mask,
                                      int64_t* partial) {
  COPA_SHARED_ARRAY(int64_t, warp_part, kWarps);
  int64_t cnt = 0;
  const long total = rows * cols;
  const long step = (long)COPA_NBLOCKS * kThreads;
  if (s1 == 1 && s0 == cols) {   // contiguous
    for (long i = (long)COPA_BID * kThreads + COPA_TID; i < total; i += step) cnt += (x[i] & exp_mask) == exp_mask;
  } else {
    for (long i = (long)COPA_BID * kThreads + COPA_TID; i < total; i += step) {
      const long r = i / cols, c = i - r * cols;
      cnt += (x[r * s0 + c * s1] & exp_mask) == exp_mask;
    }
  }
  cnt = warp_sum(cnt);
  if (lane_id() == 0) warp_part[warp_id()] = cnt;
  COPA_SYNC_BLOCK();
  if (COPA_TID == 0) {
    int64_t sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += warp_part[w];
    partial[COPA_BID] = sum;
  }
}

// seen: k zeroed flags (this launch's alone); partial: `parts` counts of copa_count_nonfinite; tau:
// one double or null; out: 5 doubles. One block.
template <typename L>
COPA_GLOBAL void copa_label_summary(const L* y, long n, long k, int* seen, const int64_t* partial, int parts,
                                    const double* tau, double* out) {
  COPA_SHARED_ARRAY(int64_t, warp_vals, 4 * kWarps);
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (long i = COPA_TID; i < n; i += kThreads) {
    const int64_t v = (int64_t)y[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    if (v >= 0 && v < k) COPA_SET_FLAG(seen + v);   // several threads may set the same flag
  }
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const int64_t olo = COPA_SHFL_XOR(lo, m), ohi = COPA_SHFL_XOR(hi, m);
    lo = olo < lo ? olo : lo;
    hi = ohi > hi ? ohi : hi;
  }
  COPA_SYNC_BLOCK();   // every flag set (a block barrier orders this block's global writes too)
  int64_t present = 0, bad = 0;
  for (long j = COPA_TID; j < k; j += kThreads) present += seen[j];
  for (int j = COPA_TID; j < parts; j += kThreads) bad += partial[j];
  present = warp_sum(present);
  bad = warp_sum(bad);
  if (lane_id() == 0) {
    warp_vals[warp_id()] = lo;
    warp_vals[kWarps + warp_id()] = hi;
    warp_vals[2 * kWarps + warp_id()] = present;
    warp_vals[3 * kWarps + warp_id()] = bad;
  }
  COPA_SYNC_BLOCK();
  if (COPA_TID == 0) {
    for (int w = 1; w < kWarps; ++w) {
      lo = warp_vals[w] < lo ? warp_vals[w] : lo;
      hi = warp_vals[kWarps + w] > hi ? warp_vals[kWarps + w] : hi;
    }
    present = 0;
    bad = 0;
    for (int w = 0; w < kWarps; ++w) {
      present += warp_vals[2 * kWarps + w];
      bad += warp_vals[3 * kWarps + w];
    }
    out[0] = (double)lo;
    out[1] = (double)hi;
    out[2] = (double)present;
    out[3] = (double)bad;
    out[4] = tau ? tau[0] : 0.0;
  }
}

}  // namespace cuda
}  // namespace copa_fast
