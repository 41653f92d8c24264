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
#include <limits>
#include <vector>

#include "../symmetric_ce_checks.h"

namespace copa_fast {
namespace {

constexpr double kNormEps = 1e-12;

// Sum / max of f(0..D-1) over 16 independent lanes (fixed order, so deterministic), a loop shape
// the compiler vectorises without reassociating floating-point additions itself.
template <typename T, typename F>
inline T lane_sum(int64_t D, F f) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += f(d + k);
  T total = 0;
  for (; d < D; ++d) total += f(d);
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

template <typename T>
inline T abs_max(const T* x, int64_t D) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] = std::max(acc[k], std::abs(x[d + k]));
  T m = 0;
  for (; d < D; ++d) m = std::max(m, std::abs(x[d]));
  for (int k = 0; k < kLanes; ++k) m = std::max(m, acc[k]);
  return m;
}

// Row normalisation as F.normalize: x / max(||x||, eps), one fused pass per row; returns (xn, norms).
// The norm is taken of x / max|x| and scaled back, so float32 rows of magnitude 1e20 do not
// overflow and rows of 1e-20 do not underflow.
template <typename T>
std::pair<at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x) {
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor xn = at::empty_like(x), norms = at::empty({R}, x.options());
  const T* xp = x.data_ptr<T>();
  T* op = xn.data_ptr<T>();
  T* np = norms.data_ptr<T>();
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* r = xp + i * D;
      T* o = op + i * D;
      const T m = abs_max(r, D);
      const T inv_m = m > 0 ? T(1) / m : T(1);
      const T ss = lane_sum<T>(D, [&](int64_t d) { const T v = r[d] * inv_m; return v * v; });
      const T nrm = (m > 0 ? m : T(1)) * std::sqrt(ss);
      np[i] = nrm;
      const T inv = T(1) / std::max(nrm, T(kNormEps));
      for (int64_t d = 0; d < D; ++d) o[d] = r[d] * inv;
    }
  });
  return {xn, norms};
}

// In place: g <- d(normalised)/d(raw)^T g, matching F.normalize: (g - xn <xn, g>) / ||x|| where
// ||x|| > eps, and g / eps where the norm was clamped (the clamp passes no gradient to the norm).
template <typename T>
void normalize_backward_(at::Tensor& g, const at::Tensor& xn, const at::Tensor& norms) {
  const int64_t R = g.size(0), D = g.size(1);
  T* gp = g.data_ptr<T>();
  const T* xp = xn.data_ptr<T>();
  const T* np = norms.data_ptr<T>();
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* gi = gp + i * D;
      const T* xi = xp + i * D;
      const bool live = np[i] > T(kNormEps);
      const T dot = live ? lane_sum<T>(D, [&](int64_t d) { return gi[d] * xi[d]; }) : T(0);
      const T inv = T(1) / std::max(np[i], T(kNormEps));
      for (int64_t d = 0; d < D; ++d) gi[d] = (gi[d] - xi[d] * dot) * inv;
    }
  });
}

template <typename T>
std::vector<at::Tensor> symmetric_ce_cpu_impl(const at::Tensor& z_in, const at::Tensor& q_in,
                                              const at::Tensor& labels_in, double tau,
                                              const c10::optional<at::Tensor>& weights_in,
                                              bool fused_grad) {
  const at::Tensor z = z_in.contiguous();
  const at::Tensor q = q_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = z.size(0), C = q.size(0);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T s = T(std::exp(T(tau)));

  const auto [zn, znorm] = normalize_rows<T>(z);
  const auto [qn, qnorm] = normalize_rows<T>(q);

  at::Tensor S = at::mm(zn, qn.t());
  S.mul_(s);
  const T* Sp = S.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();

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

  at::Tensor R = at::empty({N}, z.options());
  at::Tensor L = at::empty({C}, z.options());
  at::Tensor pred = at::empty({N}, labels.options());
  T* Rp = R.data_ptr<T>();
  T* Lp = L.data_ptr<T>();
  int64_t* predp = pred.data_ptr<int64_t>();

  // Row log-sum-exp over the N expanded columns: class c appears counts[c] times.
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* Si = Sp + i * C;
      T m = -std::numeric_limits<T>::infinity();
      T best = -std::numeric_limits<T>::infinity();
      int64_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        if (counts[c] > 0 && Si[c] > m) m = Si[c];
        if (Si[c] > best) { best = Si[c]; arg = c; }
      }
      double acc = 0;
      for (int64_t c = 0; c < C; ++c)
        if (counts[c] > 0) acc += counts[c] * double(std::exp(Si[c] - m));
      Rp[i] = T(double(m) + std::log(acc));
      predp[i] = arg;
    }
  });

  // Column log-sum-exp over all rows, on a transposed copy so each class reads contiguous memory.
  const at::Tensor ST = S.t().contiguous();
  const T* STp = ST.data_ptr<T>();
  at::parallel_for(0, C, 4, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const T* col = STp + c * N;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < N; ++i) m = std::max(m, col[i]);
      double acc = 0;
      for (int64_t i = 0; i < N; ++i) acc += double(std::exp(col[i] - m));
      Lp[c] = T(double(m) + std::log(acc));
    }
  });

  at::Tensor losses = at::empty({N}, z.options());
  T* lp = losses.data_ptr<T>();
  double total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = y[i];
    lp[i] = (c >= 0 && c < C) ? T(0.5) * (Rp[i] + Lp[c] - 2 * Sp[i * C + c]) : nan;
    total += w[i] * double(lp[i]);
  }
  at::Tensor loss = at::full({}, total, z.options());

  at::Tensor dz, dq, dtau;
  if (fused_grad) {
    at::Tensor G = at::empty({N, C}, z.options());
    T* Gp = G.data_ptr<T>();
    std::vector<double> dtau_rows(N, 0.0);
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t yi = y[i];
        const T* Si = Sp + i * C;
        T* Gi = Gp + i * C;
        if (yi < 0 || yi >= C) {
          for (int64_t c = 0; c < C; ++c) Gi[c] = nan;
          dtau_rows[i] = double(nan);
          continue;
        }
        double acc = 0;
        for (int64_t c = 0; c < C; ++c) {
          // exp in the working precision (float exp is several times cheaper than double).
          double g = 0.5 * (w[i] * counts[c] * double(std::exp(Si[c] - Rp[i])) +
                            wsum[c] * double(std::exp(Si[c] - Lp[c])));
          if (c == yi) g -= w[i];
          Gi[c] = T(g);
          acc += g * double(Si[c]);
        }
        dtau_rows[i] = acc;
      }
    });
    double dt = 0;
    for (int64_t i = 0; i < N; ++i) dt += dtau_rows[i];
    dtau = at::full({}, dt, z.options());
    G.mul_(s);
    dz = at::mm(G, qn);
    dq = at::mm(G.t(), zn);
    normalize_backward_<T>(dz, zn, znorm);
    normalize_backward_<T>(dq, qn, qnorm);
  } else {
    dz = at::empty({0}, z.options());
    dq = at::empty({0}, z.options());
    dtau = at::empty({0}, z.options());
  }
  return {loss, losses, pred, dz, dq, dtau};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> symmetric_ce_cpu(
    const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& tau,
    const c10::optional<at::Tensor>& weights, bool fused_grad) {
  check_symmetric_ce_args(z, q, labels, tau, weights);
  CHECK_ARG(z.device().is_cpu(), "z: expected a CPU tensor, got ", z.device());
  // The products inside are part of this op: an enclosing autocast region must not recast them.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const double t = tau.to(at::kCPU).to(at::kDouble).item<double>();
  std::vector<at::Tensor> out;
  if (z.scalar_type() == at::kDouble) {
    out = symmetric_ce_cpu_impl<double>(z, q, labels, t, weights, fused_grad);
  } else {
    out = symmetric_ce_cpu_impl<float>(z, q, labels, t, weights, fused_grad);
  }
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// E episodes stacked in z / q (see the schema below): the CPU kernel episode after episode, for
// parity with the one-launch CUDA and Triton implementations of the same op.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> episodes_sce_cpu(
    const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& rows,
    const at::Tensor& classes, const at::Tensor& s_off, int64_t s_total, const at::Tensor& tau, bool fused_grad) {
  check_episodes_args(z, q, labels, rows, classes, s_off, tau);
  CHECK_ARG(z.device().is_cpu(), "z: expected a CPU tensor, got ", z.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t E = rows.size(0);
  auto rr = rows.to(at::kCPU).contiguous(), cc = classes.to(at::kCPU).contiguous();
  auto tt = tau.to(at::kCPU).to(at::kDouble).contiguous();
  const int64_t* rp = rr.data_ptr<int64_t>();
  const int64_t* cp = cc.data_ptr<int64_t>();
  auto loss = at::zeros({E}, z.options()), dtau = fused_grad ? at::zeros({E}, z.options()) : at::empty({0}, z.options());
  auto losses = at::zeros({z.size(0)}, z.options());
  auto pred = at::zeros({z.size(0)}, labels.options().dtype(at::kLong));
  auto dz = fused_grad ? at::zeros_like(z) : at::empty({0}, z.options());
  auto dq = fused_grad ? at::zeros_like(q) : at::empty({0}, z.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = rp[2 * e], n = rp[2 * e + 1], c0 = cp[2 * e], c = cp[2 * e + 1];
    if (n == 0 || c == 0) continue;
    auto zs = z.narrow(0, r0, n), qs = q.narrow(0, c0, c), ys = labels.narrow(0, r0, n);
    const double t = tt.data_ptr<double>()[e];
    auto out = z.scalar_type() == at::kDouble
                   ? symmetric_ce_cpu_impl<double>(zs, qs, ys, t, c10::nullopt, fused_grad)
                   : symmetric_ce_cpu_impl<float>(zs, qs, ys, t, c10::nullopt, fused_grad);
    loss[e].copy_(out[0]);
    losses.narrow(0, r0, n).copy_(out[1]);
    pred.narrow(0, r0, n).copy_(out[2]);
    if (fused_grad) {
      dz.narrow(0, r0, n).copy_(out[3]);
      dq.narrow(0, c0, c).copy_(out[4]);
      dtau[e].copy_(out[5]);
    }
  }
  (void)s_off;
  (void)s_total;
  return {loss, losses, pred, dz, dq, dtau};
}

}  // namespace

TORCH_LIBRARY(copa_fast, m) {
  m.def(
      "symmetric_ce(Tensor z, Tensor q, Tensor labels, Tensor tau, Tensor? weights, bool fused_grad)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // E ragged episodes stacked in z (rows) and q (classes): rows, classes (E, 2) int64 [start, count]
  // with ascending starts, labels local to each episode, s_off (E,) the start of each episode's
  // score block in a workspace of s_total entries, tau (E,). Returns per-episode loss (E,),
  // per-row losses and pred, dz, dq (zero on rows no episode owns), dtau (E,).
  m.def(
      "episodes_sce(Tensor z, Tensor q, Tensor labels, Tensor rows, Tensor classes, Tensor s_off, int s_total,"
      " Tensor tau, bool fused_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(copa_fast, CPU, m) {
  m.impl("symmetric_ce", &symmetric_ce_cpu);
  m.impl("episodes_sce", &episodes_sce_cpu);
}

}  // namespace copa_fast
