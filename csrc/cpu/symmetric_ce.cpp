// CPU kernel of copa_fast::symmetric_ce: the symmetric cross-entropy of CoPA in its exact N x C form
// (DESIGN §2), forward and — when asked — the gradient, in one call. Vendor GEMMs (at::mm) do the
// N x C x D products; everything else is fused row- or column-parallel loops. No N x N buffer.
//
// Schema (shared with the CUDA kernel):
//   symmetric_ce(Tensor z, Tensor q, Tensor labels, Tensor tau, Tensor? weights, bool fused_grad)
//     -> (Tensor loss, Tensor losses, Tensor pred, Tensor dz, Tensor dq, Tensor dtau)
// z (N, D) and q (C, D) are raw (un-normalised) rows; labels (N,) int32/int64; tau a 1-element
// tensor (the logit scale is exp(tau)); weights (N,) per-sample loss weights, None = 1/N.
// loss = sum_i w_i l_i, losses = l (N,), pred = argmax_c cos(z_i, q_c). With fused_grad the
// gradient of `loss` w.r.t. z, q and tau is returned too; otherwise dz, dq, dtau are empty.
// A label outside 0..C-1 never causes an out-of-bounds access: its row's loss and gradient are NaN.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../symmetric_ce_checks.h"

namespace copa_fast {
namespace {

// The row kernels, one copy per instruction set (row_kernel_copies.h); row_kernels<T>() picks the
// widest this CPU runs. All copies give the same bits (see row_kernels.inc), so the choice moves
// only time.
#include "row_kernel_copies.h"
using rows_baseline::lane_max;
using rows_baseline::lane_sum;

template <typename T>
struct RowKernels {
  void (*normalize)(const T*, T*, T*, int64_t, int64_t, int64_t);
  void (*normalize_backward)(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);
  void (*class_mean)(T*, T*, const T*, int64_t, const int64_t*, int64_t, T);
  void (*exp)(T*, int64_t);
};
#define COPA_FAST_ROW_KERNELS(ns, T) \
  RowKernels<T> { &ns::normalize_rows<T>, &ns::normalize_backward_rows<T>, &ns::class_mean<T>, &ns::exp_inplace<T> }

// 0 baseline, 1 AVX2, 2 AVX-512 (F, BW, DQ, VL): the widest copy this CPU and its OS run, lowered by
// the environment variable COPA_FAST_CPU_ISA=baseline|avx2 when the process first asks (for
// comparing the copies).
int row_isa() {
  static const int isa = [] {
    const int best = widest_row_copy();
    const char* env = std::getenv("COPA_FAST_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return 0;
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return std::min(best, 1);
    return best;
  }();
  return isa;
}

template <typename T>
const RowKernels<T>& row_kernels() {
  static const RowKernels<T> kernels = [] {
#ifdef COPA_FAST_ROW_ISA_COPIES
    if (row_isa() == 2) return COPA_FAST_ROW_KERNELS(rows_avx512, T);
    if (row_isa() == 1) return COPA_FAST_ROW_KERNELS(rows_avx2, T);
#endif
    return COPA_FAST_ROW_KERNELS(rows_baseline, T);
  }();
  return kernels;
}

// Row normalisation as F.normalize: out = x / max(||x||, eps) (out may be x itself); returns the norms.
template <typename T>
at::Tensor normalize_rows_into(const at::Tensor& x, at::Tensor& out) {
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor norms = at::empty({R}, x.options());
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* np = norms.data_ptr<T>();
  const auto normalize = row_kernels<T>().normalize;
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) { normalize(xp, op, np, b, e, D); });
  return norms;
}

// In place: g <- d(normalised)/d(raw)^T g (row_kernels.inc); `dots` (R values, or null) gives
// <xn_i, g_i> when the caller already has it.
template <typename T>
void normalize_backward_(at::Tensor& g, const at::Tensor& xn, const at::Tensor& norms, const T* dots = nullptr) {
  T* gp = g.data_ptr<T>();
  const T* xp = xn.data_ptr<T>();
  const T* np = norms.data_ptr<T>();
  const int64_t D = g.size(1);
  const auto backward = row_kernels<T>().normalize_backward;
  at::parallel_for(0, g.size(0), 8, [&](int64_t b, int64_t e) { backward(gp, xp, np, dots, b, e, D); });
}

// The N x C part once the rows are normalised (DESIGN §2). zn (N, D) and qn (C, D) unit rows with
// their norms; returns {loss, losses, pred, dZ, dQ, dtau}, dZ / dQ the gradients w.r.t. the RAW
// rows (normalisation backward applied; empty without fused_grad). zn and qn are only read.
//
// Every exponential is taken by the row kernels' own exp (row_kernels.inc), on each block of rows
// as it is written — not by ATen's exp, whose float path calls MKL's vector math: the first call
// of a process, split over two threads, now and then ran one thread's half with a low-accuracy
// kernel (~1e-4 relative error; pytorch/pytorch#188792, copa_fast/_mkl_vml.py), so a step's bits
// changed from process to process. Two shifts keep the exponentials in range:
// - fixed (s <= FixedShift<T>::max_scale): |S_ic| <= s, so exp(S_ic - s) lies in [e^-2s, 1], a
//   normal number of T: one exponential a score serves the row sums and the column sums alike;
// - exact maxima (larger s, up to tau = 10 and beyond): the row terms exp(S_ic - m_i), m_i the row
//   maximum over present classes, and the column terms exp(S_ic - M_c), M_c the column maximum, so
//   that whatever tau is no exponential overflows and each sum keeps its largest term at 1.
// The loops around them are plain arithmetic the compiler vectorises, run over blocks of kRowBlock
// rows; a reduction over rows (column maxima, column sums in double) is formed per block in row
// order and the blocks combined in order, so the result does not depend on the thread count.
constexpr int64_t kRowBlock = 32;

// The largest scale s for the fixed shift: e^-2s must stay a normal number (float: e^-80 = 1.8e-35
// against FLT_MIN 1.2e-38, i.e. tau <= 3.68; double: e^-700 against DBL_MIN 2.2e-308, tau <= 5.85).
template <typename T>
struct FixedShift;
template <>
struct FixedShift<float> {
  static constexpr double max_scale = 40.0;
};
template <>
struct FixedShift<double> {
  static constexpr double max_scale = 350.0;
};

template <typename T>
std::vector<at::Tensor> sce_normalised(const at::Tensor& zn, const at::Tensor& znorm, const at::Tensor& qn,
                                       const at::Tensor& qnorm, const at::Tensor& labels_in, double tau,
                                       const c10::optional<at::Tensor>& weights_in, bool fused_grad) {
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = zn.size(0), C = qn.size(0);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const auto block_rows = [&](int64_t b) {
    return std::pair<int64_t, int64_t>{b * kRowBlock, std::min(N, (b + 1) * kRowBlock)};
  };
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T s = T(std::exp(T(tau)));
  const bool fixed = double(s) <= FixedShift<T>::max_scale;
  const int64_t* y = labels.data_ptr<int64_t>();

  // S = s zn qn^T; the scale is applied by the first pass over its rows below
  at::Tensor S = at::mm(zn, qn.t());
  T* Sp = S.data_ptr<T>();

  // Per-sample weights and their per-class sums; invalid labels are left out of every count.
  std::vector<double> w(N, 1.0 / double(N));
  if (weights_in.has_value()) {
    const at::Tensor wt = weights_in->to(at::kDouble).contiguous();
    const double* wp = wt.data_ptr<double>();
    std::copy(wp, wp + N, w.begin());
  }
  std::vector<double> counts(C, 0.0), wsum(C, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = y[i];
    if (c >= 0 && c < C) {
      counts[c] += 1.0;
      wsum[c] += w[i];
    }
  }
  std::vector<T> count_t(C);
  for (int64_t c = 0; c < C; ++c) count_t[c] = T(counts[c]);
  const T* nc = count_t.data();

  // S scaled by s; the predictions; the shifted copies of S: one (S - s) with the fixed shift, else
  // the row-shifted one here (row maxima over present classes) and each block's column maxima
  // (std::max keeps the running value over a NaN, as a serial scan would).
  at::Tensor X = at::empty({fixed ? 1 : 2, N, C}, S.options());
  T* Er = X.data_ptr<T>();                  // exp(S - row shift)
  T* Ec = fixed ? Er : Er + N * C;          // exp(S - column shift)
  std::vector<T> rowshift(N, s), block_max(fixed ? 0 : blocks * C, ninf);
  at::Tensor pred = at::empty({N}, labels.options());
  int64_t* predp = pred.data_ptr<int64_t>();
  const auto exp_rows = row_kernels<T>().exp;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [i0, i1] = block_rows(b);
      for (int64_t i = i0; i < i1; ++i) {
        T* Si = Sp + i * C;
        for (int64_t c = 0; c < C; ++c) Si[c] *= s;
        // the prediction: the first class reaching the row's maximum (0 on a row of NaN)
        const T best = lane_max<T>(C, [&](int64_t c) { return Si[c]; });
        int64_t arg = 0;
        if (best > ninf)
          while (!(Si[arg] == best)) ++arg;
        predp[i] = arg;
        T* ri = Er + i * C;
        if (!fixed) {
          T* bm = block_max.data() + b * C;
          for (int64_t c = 0; c < C; ++c) bm[c] = std::max(bm[c], Si[c]);
          rowshift[i] = lane_max<T>(C, [&](int64_t c) { return nc[c] > 0 ? Si[c] : ninf; });
        }
        const T m = rowshift[i];
        for (int64_t c = 0; c < C; ++c) ri[c] = Si[c] - m;
      }
      exp_rows(Er + i0 * C, (i1 - i0) * C);
    }
  });
  std::vector<T> colshift(C, s);
  if (!fixed) {
    std::fill(colshift.begin(), colshift.end(), ninf);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < C; ++c) colshift[c] = std::max(colshift[c], block_max[b * C + c]);
    const T* M = colshift.data();
    at::parallel_for(0, N, 32, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* Si = Sp + i * C;
        T* ci = Ec + i * C;
        for (int64_t c = 0; c < C; ++c) ci[c] = Si[c] - M[c];
      }
      exp_rows(Ec + b * C, (e - b) * C);
    });
  }

  // Row sums over the N expanded columns (class c counted n_c times) and column sums over rows.
  std::vector<double> rowsum(N), block_sum(blocks * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* bs = block_sum.data() + b * C;
      const auto [i0, i1] = block_rows(b);
      for (int64_t i = i0; i < i1; ++i) {
        const T* ri = Er + i * C;
        const T* ci = Ec + i * C;
        rowsum[i] = double(lane_sum<T>(C, [&](int64_t c) { return nc[c] > 0 ? nc[c] * ri[c] : T(0); }));
        for (int64_t c = 0; c < C; ++c) bs[c] += double(ci[c]);
      }
    }
  });
  std::vector<double> colsum(C, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t c = 0; c < C; ++c) colsum[c] += block_sum[b * C + c];
  std::vector<double> L(C);   // column log-sum-exp; the row one, R_i, is formed where it is used
  for (int64_t c = 0; c < C; ++c) L[c] = double(colshift[c]) + std::log(colsum[c]);

  // One pass over the rows: the per-sample losses and, with fused_grad, G in place of the row terms.
  // G_ic = dloss/dS_ic = 1/2 (w_i n_c e^{S_ic - R_i} + wsum_c e^{S_ic - L_c}) - w_i [c == y_i],
  // written over the row terms; dtau = sum G_ic S_ic; then G is scaled by s for dz = s G qn. The
  // row sum sum_c G_ic S_ic is also <zn_i, dz_i> (S_ic = s <zn_i, qn_c>): the normalisation
  // backward of dz takes it from here instead of a pass over the D columns.
  at::Tensor losses = at::empty({N}, zn.options());
  T* lp = losses.data_ptr<T>();
  std::vector<T> col_coef(C), zdot(fused_grad ? N : 0);
  for (int64_t c = 0; c < C; ++c) col_coef[c] = nc[c] > 0 ? T(0.5 * wsum[c] / colsum[c]) : T(0);
  const T* cc = col_coef.data();
  at::parallel_for(0, N, 32, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t yi = y[i];
      const bool valid = yi >= 0 && yi < C;
      const T* Si = Sp + i * C;
      lp[i] = valid ? T(0.5 * (double(rowshift[i]) + std::log(rowsum[i]) + L[yi] - 2.0 * double(Si[yi]))) : nan;
      if (!fused_grad) continue;
      T* gi = Er + i * C;
      if (!valid) {
        for (int64_t c = 0; c < C; ++c) gi[c] = nan;
        zdot[i] = nan;
        continue;
      }
      const T* ci = Ec + i * C;
      const T row_coef = T(0.5 * w[i] / rowsum[i]);
      for (int64_t c = 0; c < C; ++c) gi[c] = (nc[c] > 0 ? row_coef * nc[c] * gi[c] : T(0)) + cc[c] * ci[c];
      gi[yi] -= T(w[i]);
      zdot[i] = lane_sum<T>(C, [&](int64_t c) { return gi[c] * Si[c]; });
      for (int64_t c = 0; c < C; ++c) gi[c] *= s;
    }
  });
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += w[i] * double(lp[i]);
  at::Tensor loss = at::full({}, total, zn.options());

  if (!fused_grad) {   // outputs must not alias one another: one empty tensor each
    const auto none = [&] { return at::empty({0}, zn.options()); };
    return {loss, losses, pred, none(), none(), none()};
  }
  double dt = 0;
  for (int64_t i = 0; i < N; ++i) dt += double(zdot[i]);
  const at::Tensor G = X[0];
  // dz = G qn and dq = G^T zn side by side, one a thread, where there are two threads to run them
  at::Tensor dz, dq;
  const auto product = [&](int64_t k) {
    if (k == 0) dz = at::mm(G, qn); else dq = at::mm(G.t(), zn);
  };
  if (at::get_num_threads() >= 2 && !at::in_parallel_region()) {
    at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) product(k);
    });
  } else {
    product(0);
    product(1);
  }
  normalize_backward_<T>(dz, zn, znorm, zdot.data());
  normalize_backward_<T>(dq, qn, qnorm);
  return {loss, losses, pred, dz, dq, at::full({}, dt, zn.options())};
}

// Above this tau, float32 rows are processed in float64. |S| <= e^tau, so one rounding of S in
// float32 moves a probability by ~e^tau * 6e-8 (1e-3 at tau = 10): in float64 the result is as exact
// as the float32 inputs allow, for ~2x the (small) N x C x D work. At tau <= 4 the float32 error is
// below 3.3e-6 and the fast path is kept.
constexpr double kWideTau = 4.0;

// The symmetric CE of raw rows z (N, D), q (C, D) in their dtype's precision or wider (above);
// results in z's dtype. With `scratch` z and q are temporaries of the caller and are normalised in
// place (no extra N x D buffer).
template <typename T>
std::vector<at::Tensor> sce_rows_as(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, double tau,
                                    const c10::optional<at::Tensor>& weights, bool fused_grad, bool scratch) {
  // (source, destination) of the normalisation: in place when the rows are ours to overwrite
  const auto buffers = [&](const at::Tensor& t) -> std::pair<at::Tensor, at::Tensor> {
    at::Tensor src = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const bool ours = scratch || !src.is_same(t);
    return {src, ours ? src : at::empty_like(src)};
  };
  auto [zs, zn] = buffers(z);
  auto [qs, qn] = buffers(q);
  const at::Tensor zn_norm = normalize_rows_into<T>(zs, zn);
  const at::Tensor qn_norm = normalize_rows_into<T>(qs, qn);
  return sce_normalised<T>(zn, zn_norm, qn, qn_norm, labels, tau, weights, fused_grad);
}

std::vector<at::Tensor> sce_rows(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, double tau,
                                 const c10::optional<at::Tensor>& weights, bool fused_grad, bool scratch) {
  if (z.scalar_type() == at::kDouble) return sce_rows_as<double>(z, q, labels, tau, weights, fused_grad, scratch);
  if (tau <= kWideTau) return sce_rows_as<float>(z, q, labels, tau, weights, fused_grad, scratch);
  std::vector<at::Tensor> o = sce_rows_as<double>(z, q, labels, tau, weights, fused_grad, scratch);
  for (int k : {0, 1, 3, 4, 5}) o[k] = o[k].to(at::kFloat);
  return o;
}

// Class means of pf (N, D) under labels, as (C, D); rows with a label outside 0..C-1 are left out
// (their loss is NaN). Rows are grouped by class first (stable), then each class sums its rows in
// row order — deterministic whatever the thread count.
template <typename T>
at::Tensor class_means_cpu(const at::Tensor& pf, const int64_t* y, int64_t C) {
  const int64_t N = pf.size(0), D = pf.size(1);
  std::vector<int64_t> start(C + 1, 0), order;
  for (int64_t i = 0; i < N; ++i)
    if (y[i] >= 0 && y[i] < C) ++start[y[i] + 1];
  for (int64_t c = 0; c < C; ++c) start[c + 1] += start[c];
  order.resize(start[C]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    if (y[i] >= 0 && y[i] < C) order[fill[y[i]]++] = i;
  at::Tensor p0 = at::empty({C, D}, pf.options());
  const T* xp = pf.data_ptr<T>();
  T* pp = p0.data_ptr<T>();
  const auto class_mean = row_kernels<T>().class_mean;
  at::parallel_for(0, C, 4, [&](int64_t cb, int64_t ce) {
    std::vector<T> acc(std::min(D, rows_baseline::kMeanChunk));
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t count = start[c + 1] - start[c];
      class_mean(pp + c * D, acc.data(), xp, D, order.data() + start[c], count, T(1) / T(std::max<int64_t>(count, 1)));
    }
  });
  return p0;
}

// One whole CoPA step: class means p0 of pf, both adapters, the symmetric CE and — with fused_grad —
// its gradients w.r.t. the adapted rows Z = x w_img^T and Q = p0 w_proto^T and tau. The weight
// gradients dZ^T x and dQ^T p0 are left to the backward (csrc/cpu/autograd.cpp), which
// folds grad_output into them: no separate scaling pass over D x D outputs. Z and Q are normalised
// in the GEMMs' own output buffers; only the returned tensors are fresh.
template <typename T>
std::vector<at::Tensor> copa_loss_cpu_impl(const at::Tensor& x, const at::Tensor& labels_in, const at::Tensor& w_img,
                                           const at::Tensor& w_proto, const at::Tensor& pf, int64_t C, double tau,
                                           const c10::optional<at::Tensor>& weights, bool fused_grad) {
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor p0 = class_means_cpu<T>(pf.contiguous(), labels.data_ptr<int64_t>(), C);
  std::vector<at::Tensor> sce =
      sce_rows(at::mm(x, w_img.t()), at::mm(p0, w_proto.t()), labels, tau, weights, fused_grad, /*scratch=*/true);
  return {sce[0], sce[1], sce[2], sce[3], sce[4], p0, sce[5]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> copa_loss_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img, const at::Tensor& w_proto,
    const at::Tensor& pf, int64_t num_classes, const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
    bool fused_grad, c10::string_view precision) {
  check_copa_loss_args(x, labels, w_img, w_proto, pf, num_classes, tau, weights, precision);
  CHECK_ARG(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const double t = tau.to(at::kCPU).to(at::kDouble).item<double>();
  std::vector<at::Tensor> o =
      x.scalar_type() == at::kDouble
          ? copa_loss_cpu_impl<double>(x, labels, w_img, w_proto, pf, num_classes, t, weights, fused_grad)
          : copa_loss_cpu_impl<float>(x, labels, w_img, w_proto, pf, num_classes, t, weights, fused_grad);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_ce_cpu(
    const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& tau,
    const c10::optional<at::Tensor>& weights, bool fused_grad, c10::string_view precision) {
  check_symmetric_ce_args(z, q, labels, tau, weights, precision);
  CHECK_ARG(z.device().is_cpu(), "z: expected a CPU tensor, got ", z.device());
  // The products inside are part of this op: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const double t = tau.to(at::kCPU).to(at::kDouble).item<double>();
  const std::vector<at::Tensor> out = sce_rows(z, q, labels, t, weights, fused_grad, /*scratch=*/false);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// E episodes stacked in z / q (see the schema below): the CPU kernel episode after episode, for
// parity with the one-launch CUDA and Triton implementations of the same op — their layout contract
// included: an episode whose rows, classes or score block (rows x classes entries at s_off of
// s_total) do not lie inside the stacked tensors gets a NaN loss and dtau and touches nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> episodes_sce_cpu(
    const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& rows,
    const at::Tensor& classes, const at::Tensor& s_off, int64_t s_total, const at::Tensor& tau, bool fused_grad) {
  check_episodes_args(z, q, labels, rows, classes, s_off, tau);
  CHECK_ARG(z.device().is_cpu(), "z: expected a CPU tensor, got ", z.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t E = rows.size(0);
  auto rr = rows.to(at::kCPU).contiguous(), cc = classes.to(at::kCPU).contiguous(), so = s_off.to(at::kCPU).contiguous();
  auto tt = tau.to(at::kCPU).to(at::kDouble).contiguous();
  const int64_t* rp = rr.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  const int64_t* sp = so.data_ptr<int64_t>();
  const auto fits = [](int64_t start, int64_t count, int64_t total) {
    return start >= 0 && start <= total && count >= 0 && count <= total - start;
  };
  auto loss = at::zeros({E}, z.options()), dtau = fused_grad ? at::zeros({E}, z.options()) : at::empty({0}, z.options());
  auto losses = at::zeros({z.size(0)}, z.options());
  auto pred = at::zeros({z.size(0)}, labels.options().dtype(at::kLong));
  auto dz = fused_grad ? at::zeros_like(z) : at::empty({0}, z.options());
  auto dq = fused_grad ? at::zeros_like(q) : at::empty({0}, z.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = rp[2 * e], n = rp[2 * e + 1], c0 = cp[2 * e], c = cp[2 * e + 1];
    if (!fits(r0, n, z.size(0)) || !fits(c0, c, q.size(0)) || !fits(sp[e], n * c, s_total)) {
      loss[e].fill_(std::numeric_limits<double>::quiet_NaN());   // n, c < 2^31 once the first two hold
      if (fused_grad) dtau[e].fill_(std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    if (n == 0 || c == 0) continue;
    auto zs = z.narrow(0, r0, n), qs = q.narrow(0, c0, c), ys = labels.narrow(0, r0, n);
    const double t = tt.data_ptr<double>()[e];
    const auto out = sce_rows(zs, qs, ys, t, c10::nullopt, fused_grad, /*scratch=*/false);
    loss[e].copy_(out[0]);
    losses.narrow(0, r0, n).copy_(out[1]);
    pred.narrow(0, r0, n).copy_(out[2]);
    if (fused_grad) {
      dz.narrow(0, r0, n).copy_(out[3]);
      dq.narrow(0, c0, c).copy_(out[4]);
      dtau[e].copy_(out[5]);
    }
  }
  return {loss, losses, pred, dz, dq, dtau};
}

}  // namespace

TORCH_LIBRARY(copa_fast, m) {
  m.def(
      "symmetric_ce(Tensor z, Tensor q, Tensor labels, Tensor tau, Tensor? weights, bool fused_grad,"
      " str precision=\"ieee\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // E ragged episodes stacked in z (rows) and q (classes): rows, classes (E, 2) int64 [start, count]
  // with ascending starts, labels local to each episode, s_off (E,) the start of each episode's
  // score block in a workspace of s_total entries, tau (E,). Returns per-episode loss (E,),
  // per-row losses and pred, dz, dq (zero on rows no episode owns), dtau (E,).
  m.def(
      "episodes_sce(Tensor z, Tensor q, Tensor labels, Tensor rows, Tensor classes, Tensor s_off, int s_total,"
      " Tensor tau, bool fused_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One CoPA step (CPU and CUDA): p0 = class means of pf (N, D) over num_classes classes, z = x w_img^T,
  // q = p0 w_proto^T, symmetric CE of (z, q) as above. With fused_grad dz, dq and dtau are the
  // gradients of `loss` w.r.t. z, q and tau (empty otherwise); p0 is returned for the backward.
  // num_classes is a SymInt: under torch.compile with dynamic shapes one graph serves every class
  // count (the kernels take it as a plain int64_t, the dispatcher unpacks it). precision (both ops):
  // "ieee" or "tf32" — TF32 tensor cores allowed where a path has them (the cuda backend's cuBLAS
  // products of large problems); the CPU kernels compute IEEE products at either.
  m.def(
      "copa_loss(Tensor x, Tensor labels, Tensor w_img, Tensor w_proto, Tensor pf, SymInt num_classes, Tensor tau,"
      " Tensor? weights, bool fused_grad, str precision=\"ieee\")"
      " -> (Tensor loss, Tensor losses, Tensor pred, Tensor dz, Tensor dq, Tensor p0, Tensor dtau)");
  // The same step on the Triton kernels (precision also "tf32x3"), with the same C++ autograd
  // (csrc/cpu/autograd.cpp); its kernel is registered by the Python package
  // (copa_fast/ops/symmetric_ce.py) for CUDA tensors, and CPU ones under Triton's interpreter.
  m.def(
      "copa_loss_triton(Tensor x, Tensor labels, Tensor w_img, Tensor w_proto, Tensor pf, SymInt num_classes,"
      " Tensor tau, Tensor? weights, bool fused_grad, str precision=\"ieee\")"
      " -> (Tensor loss, Tensor losses, Tensor pred, Tensor dz, Tensor dq, Tensor p0, Tensor dtau)");
  // The public API's value checks in one call (csrc/cpu/value_checks.cpp): [min label, max label,
  // distinct labels in [0, k), NaN / Inf entries over `tensors`, tau (0 when None)].
  m.def("value_summary(Tensor labels, int k, Tensor[] tensors, Tensor? tau) -> float[]");
}

TORCH_LIBRARY_IMPL(copa_fast, CPU, m) {
  m.impl("symmetric_ce", &symmetric_ce_cpu);
  m.impl("episodes_sce", &episodes_sce_cpu);
  m.impl("copa_loss", &copa_loss_cpu);
}

}  // namespace copa_fast
