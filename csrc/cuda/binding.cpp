// The only file of csrc/cuda that touches ATen: argument checks, workspace allocation, the
// current stream, and registration of the CUDA kernels for copa_fast::symmetric_ce,
// copa_fast::episodes_sce, copa_fast::copa_loss and copa_fast::value_summary (schemas in
// csrc/cpu/symmetric_ce.cpp).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../symmetric_ce_checks.h"
#include "sce_launch.h"

namespace copa_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What a call hands back, and its scratch (cuda::Workspace) in one allocation.
struct Buffers {
  at::Tensor losses, pred, dz, dq, loss, dtau;
  at::Tensor ws;
  cuda::Workspace layout;
};

Buffers allocate_outputs(const at::Tensor& z, const at::Tensor& q, int64_t episodes, bool fused) {
  const auto opt = z.options();
  const int64_t n = z.size(0);
  Buffers b;
  b.losses = episodes ? at::zeros({n}, opt) : at::empty({n}, opt);
  b.pred = episodes ? at::zeros({n}, opt.dtype(at::kLong)) : at::empty({n}, opt.dtype(at::kLong));
  // episodes: rows no episode owns keep zero gradients
  b.dz = fused ? (episodes ? at::zeros_like(z) : at::empty_like(z)) : at::empty({0}, opt);
  b.dq = fused ? (episodes ? at::zeros_like(q) : at::empty_like(q)) : at::empty({0}, opt);
  b.loss = at::empty({std::max<int64_t>(episodes, 1)}, opt);
  b.dtau = fused ? at::empty({std::max<int64_t>(episodes, 1)}, opt) : at::empty({0}, opt);
  return b;
}

// The problem's inputs and outputs, and its scratch allocated as `layout` (zn: z itself where the layout
// has no zn, i.e. the rows are normalised over z, the call's own buffer).
template <typename T>
cuda::SceProblem<T> problem(const at::Tensor& z, const at::Tensor& q, const at::Tensor& y, const at::Tensor* w,
                            const at::Tensor& tau, bool fused, Buffers& b, const cuda::Workspace& layout) {
  cuda::SceProblem<T> p{};
  p.z = z.data_ptr<T>();
  p.q = q.data_ptr<T>();
  p.y = y.data_ptr<int64_t>();
  p.w = w ? w->data_ptr<T>() : nullptr;
  p.tau = tau.data_ptr<T>();
  p.n = static_cast<int>(z.size(0));
  p.c = static_cast<int>(q.size(0));
  p.d = static_cast<int>(z.size(1));
  p.fused = fused;
  b.layout = layout;
  b.ws = at::empty({layout.total}, z.options());
  p.zn = z.data_ptr<T>();   // replaced by place_workspace where the layout has a zn of its own
  cuda::place_workspace<T>(p, b.ws.data_ptr<T>(), layout);
  p.losses = b.losses.data_ptr<T>();
  p.pred = b.pred.data_ptr<int64_t>();
  p.dz = fused ? b.dz.data_ptr<T>() : nullptr;
  p.dq = fused ? b.dq.data_ptr<T>() : nullptr;
  p.loss = b.loss.data_ptr<T>();
  p.dtau = fused ? b.dtau.data_ptr<T>() : nullptr;
  p.ksplit_s = p.ksplit_q = 1;
  return p;
}

// A rows x cols view of the workspace from `offset` (the phased path's operands of the vendor GEMM).
at::Tensor ws_view(const Buffers& b, long offset, int64_t rows, int64_t cols) {
  return b.ws.narrow(0, offset, rows * cols).view({rows, cols});
}

void check_size(const at::Tensor& t, const char* name) {
  CHECK_ARG(t.numel() < (int64_t(1) << 31), name, ": the CUDA kernels index with 32-bit sizes; got ", t.numel(),
            " elements");
}

// The cuBLAS products' precision for the op's `precision`, whatever torch's TF32 switch says: IEEE
// float32 for "ieee" (the default), TF32 tensor cores allowed for "tf32"; the switch restored on exit.
struct CublasTF32 {
  const bool was = at::globalContext().allowTF32CuBLAS();
  const bool want;
  explicit CublasTF32(bool tf32) : want(tf32) { if (was != want) at::globalContext().setAllowTF32CuBLAS(want); }
  ~CublasTF32() { if (was != want) at::globalContext().setAllowTF32CuBLAS(was); }
};

// The large-problem path: the phases of launch_single with the three products of N x C x D work
// (S = exp(tau) zn qn^T, dz = exp(tau) G qn, dq = exp(tau) G^T zn; G is written over S) by the
// vendor GEMM, which runs them several times faster than the kernel's tiles, in stream order. Same
// buffers, same fixed-order reductions (the GEMM is deterministic for a given device and shape).
template <typename T>
void run_phased(const cuda::SceProblem<T>& p, const at::Tensor& z, Buffers& b, const at::Tensor& tau, bool fused,
                bool tf32, cudaStream_t stream) {
  const CublasTF32 products(tf32);
  const int64_t n = p.n, c = p.c, d = p.d;
  const at::Tensor zn = b.layout.zn >= 0 ? ws_view(b, b.layout.zn, n, d) : z;
  C10_CUDA_CHECK(cuda::launch_phase<T>(p, 1, stream));
  const at::Tensor scale = tau.exp();                                // (1,), on the device: no sync
  const at::Tensor qs = ws_view(b, b.layout.qn, c, d).mul(scale);   // exp(tau) qn: the scale rides on the small operand
  at::Tensor S = ws_view(b, b.layout.S, n, c);
  at::mm_out(S, zn, qs.t());
  C10_CUDA_CHECK(cuda::launch_phase<T>(p, 7, stream));   // P3: rows by warps, columns by tiles
  C10_CUDA_CHECK(cuda::launch_phase<T>(p, 8, stream));   // ... the tiles' pairs combined
  C10_CUDA_CHECK(cuda::launch_phase<T>(p, 4, stream));
  if (fused) {
    at::mm_out(b.dz, S, qs);
    at::mm_out(b.dq, S.t(), zn);
    b.dq.mul_(scale);
  }
  C10_CUDA_CHECK(cuda::launch_phase<T>(p, 6, stream));
}

// z_is_scratch: z is a temporary of the caller's (copa_loss's x w_img^T). The normalised rows are written
// over z whenever z is this call's own (that, or a contiguous copy made here) instead of a second N x D buffer.
Outputs sce_cuda(const at::Tensor& z_in, const at::Tensor& q_in, const at::Tensor& labels, const at::Tensor& tau_in,
                 const c10::optional<at::Tensor>& weights, bool fused_grad, c10::string_view precision,
                 bool z_is_scratch) {
  check_symmetric_ce_args(z_in, q_in, labels, tau_in, weights, precision);
  CHECK_ARG(z_in.is_cuda(), "z: expected a CUDA tensor, got ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  auto z = z_in.contiguous(), q = q_in.contiguous();
  auto y = labels.to(at::kLong).contiguous();
  // tau may come on another device (a CPU scalar tensor): the kernel reads it through a device pointer
  auto tau = tau_in.reshape({1}).to(z.options()).contiguous();
  at::Tensor w;
  if (weights.has_value()) w = weights->to(z.scalar_type()).contiguous();
  check_size(z, "z");
  const int64_t n = z.size(0), c = q.size(0), d = z.size(1);
  CHECK_ARG(n * c < (int64_t(1) << 31), "z, q: N x C must stay below 2^31, got ", n, " x ", c);
  const bool zn_separate = !z_is_scratch && z.is_same(z_in);   // else zn goes over z, this call's own
  Buffers b = allocate_outputs(z, q, 0, fused_grad);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool phased = n * c >= cuda::kPhasedMinScores;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "copa_fast_symmetric_ce_cuda", [&] {
    // the one-launch kernel's split products (plan_single), or the phased path's column tiles
    const cuda::SingleSplits k = phased ? cuda::SingleSplits{1, 1} : cuda::plan_single<scalar_t>(n, c, d);
    const int ks = k.scores, kq = fused_grad ? k.dq : 1, col_ranges = phased ? cuda::range_count(n) : 0;
    const cuda::Workspace layout = cuda::workspace_layout(n, c, d, n * c, zn_separate, ks > 1 ? ks * n * c : 0,
                                                          kq > 1 ? kq * c * d : 0, 2L * col_ranges * c);
    auto p = problem<scalar_t>(z, q, y, weights.has_value() ? &w : nullptr, tau, fused_grad, b, layout);
    p.ksplit_s = ks;
    p.ksplit_q = kq;
    p.col_ranges = col_ranges;
    if (phased) {
      run_phased<scalar_t>(p, z, b, tau, fused_grad, precision == "tf32", stream);
    } else {
      C10_CUDA_CHECK(cuda::launch_single<scalar_t>(p, stream));
    }
  });
  return {b.loss.reshape({}), b.losses, b.pred, b.dz, b.dq, fused_grad ? b.dtau.reshape({}) : b.dtau};
}

Outputs symmetric_ce_cuda(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& tau,
                          const c10::optional<at::Tensor>& weights, bool fused_grad, c10::string_view precision) {
  return sce_cuda(z, q, labels, tau, weights, fused_grad, precision, /*z_is_scratch=*/false);
}

Outputs episodes_sce_cuda(const at::Tensor& z_in, const at::Tensor& q_in, const at::Tensor& labels,
                          const at::Tensor& rows, const at::Tensor& classes, const at::Tensor& s_off, int64_t s_total,
                          const at::Tensor& tau_in, bool fused_grad) {
  check_episodes_args(z_in, q_in, labels, rows, classes, s_off, tau_in);
  CHECK_ARG(z_in.is_cuda(), "z: expected a CUDA tensor, got ", z_in.device());
  CHECK_ARG(s_total >= 0 && s_total < (int64_t(1) << 31), "s_total: expected 0 <= s_total < 2^31, got ", s_total);
  const c10::cuda::CUDAGuard guard(z_in.device());
  auto z = z_in.contiguous(), q = q_in.contiguous();
  auto y = labels.contiguous();
  auto tau = tau_in.to(z.scalar_type()).contiguous();
  check_size(z, "z");
  const int64_t E = rows.size(0);
  Buffers b = allocate_outputs(z, q, E, fused_grad);
  const cuda::Workspace layout =
      cuda::workspace_layout(z.size(0), q.size(0), z.size(1), s_total, /*zn_separate=*/true, 0, 0, 0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto rr = rows.contiguous(), cc = classes.contiguous(), so = s_off.contiguous();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "copa_fast_episodes_sce_cuda", [&] {
    auto p = problem<scalar_t>(z, q, y, nullptr, tau, fused_grad, b, layout);
    C10_CUDA_CHECK(cuda::launch_episodes<scalar_t>(p, rr.data_ptr<int64_t>(), cc.data_ptr<int64_t>(),
                                                    so.data_ptr<int64_t>(), static_cast<long>(s_total),
                                                    static_cast<int>(E), stream));
  });
  return {b.loss.narrow(0, 0, E), b.losses, b.pred, b.dz, b.dq, fused_grad ? b.dtau.narrow(0, 0, E) : b.dtau};
}

// Class means of pf's rows (C x D): one launch of copa_class_means (rows summed in index order,
// deterministic; labels outside [0, C) clamped, memory-safe).
at::Tensor class_means(const at::Tensor& pf_in, const at::Tensor& labels, int64_t num_classes) {
  const at::Tensor pf = pf_in.contiguous();
  const at::Tensor y = labels.to(at::kLong).contiguous();
  check_size(pf, "prototype_features");
  CHECK_ARG(num_classes * pf.size(1) < (int64_t(1) << 31), "num_classes: C x D must stay below 2^31, got ",
            num_classes, " x ", pf.size(1));
  at::Tensor p0 = at::empty({num_classes, pf.size(1)}, pf.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pf.scalar_type(), "copa_fast_class_means_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_class_means<scalar_t>(pf.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
                                                      static_cast<int>(pf.size(0)), static_cast<int>(num_classes),
                                                      static_cast<int>(pf.size(1)), p0.data_ptr<scalar_t>(), stream));
  });
  return p0;
}

// One whole CoPA step on CUDA tensors (copa_fast::copa_loss; schema in csrc/cpu/symmetric_ce.cpp, autograd in
// csrc/cpu/autograd.cpp): class means p0 of pf, z = x w_img^T, q = p0 w_proto^T, then the symmetric-CE
// kernel with its fused gradients. One call from Python a step instead of a dozen: the class means and the
// adapters are launched from here. Labels outside [0, C) are clamped for the means and reach the kernel as
// they are, which makes the loss NaN.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> copa_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img, const at::Tensor& w_proto,
    const at::Tensor& pf, int64_t num_classes, const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
    bool fused_grad, c10::string_view precision) {
  check_copa_loss_args(x, labels, w_img, w_proto, pf, num_classes, tau, weights, precision);
  CHECK_ARG(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor p0 = class_means(pf, labels, num_classes);
  // z is this call's own: its rows are normalised in place (peak memory: one N x D buffer fewer)
  Outputs o = sce_cuda(at::mm(x, w_img.t()), at::mm(p0, w_proto.t()), labels, tau, weights, fused_grad, precision,
                       /*z_is_scratch=*/true);
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o), std::get<4>(o), p0, std::get<5>(o)};
}

// copa_fast::value_summary on CUDA tensors (csrc/cpu/value_checks.cpp has the CPU kernel and the
// meaning): a counting launch per checked tensor, one block over the labels, one copy back — the
// call's only synchronisation.
std::vector<double> value_summary_cuda(const at::Tensor& labels_in, int64_t k, at::TensorList tensors,
                                       const c10::optional<at::Tensor>& tau) {
  check_value_summary_args(labels_in, k, tensors, tau);
  CHECK_ARG(labels_in.is_cuda(), "labels: expected a CUDA tensor, got ", labels_in.device());
  const c10::cuda::CUDAGuard guard(labels_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor labels = labels_in.contiguous();
  std::vector<std::pair<at::Tensor, int>> views;   // each checked tensor as rows x cols, its partial counts
  int64_t parts = 0;
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    views.emplace_back(t.dim() == 2 ? t : t.reshape({1, -1}), cuda::summary_parts(t.numel()));
    parts += views.back().second;
  }
  at::Tensor partial = at::empty({std::max<int64_t>(parts, 1)}, labels.options().dtype(at::kLong));
  at::Tensor seen = at::empty({k}, labels.options().dtype(at::kInt));
  at::Tensor out = at::empty({5}, labels.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cudaMemsetAsync(seen.data_ptr(), 0, k * sizeof(int), stream));
  int64_t at_part = 0;
  for (const auto& [v, v_parts] : views) {
    const long rows = v.size(0), cols = v.size(1), s0 = v.stride(0), s1 = v.stride(1);
    const uint64_t mask = exponent_mask(v.scalar_type());
    int64_t* slot = partial.data_ptr<int64_t>() + at_part;
    switch (v.element_size()) {
      case 2:
        C10_CUDA_CHECK(cuda::launch_count_nonfinite<uint16_t>(static_cast<const uint16_t*>(v.data_ptr()), rows, cols,
                                                              s0, s1, uint16_t(mask), slot, stream));
        break;
      case 4:
        C10_CUDA_CHECK(cuda::launch_count_nonfinite<uint32_t>(static_cast<const uint32_t*>(v.data_ptr()), rows, cols,
                                                              s0, s1, uint32_t(mask), slot, stream));
        break;
      default:
        C10_CUDA_CHECK(cuda::launch_count_nonfinite<uint64_t>(static_cast<const uint64_t*>(v.data_ptr()), rows, cols,
                                                              s0, s1, mask, slot, stream));
    }
    at_part += v_parts;
  }
  at::Tensor tau_d;
  if (tau.has_value()) tau_d = tau->reshape({1}).to(at::kDouble).contiguous();
  const double* tau_p = tau_d.defined() ? tau_d.data_ptr<double>() : nullptr;
  const int np = static_cast<int>(parts);
  if (labels.scalar_type() == at::kLong) {
    C10_CUDA_CHECK(cuda::launch_label_summary<int64_t>(labels.data_ptr<int64_t>(), labels.numel(), k,
                                                       seen.data_ptr<int>(), partial.data_ptr<int64_t>(), np, tau_p,
                                                       out.data_ptr<double>(), stream));
  } else {
    C10_CUDA_CHECK(cuda::launch_label_summary<int32_t>(labels.data_ptr<int32_t>(), labels.numel(), k,
                                                       seen.data_ptr<int>(), partial.data_ptr<int64_t>(), np, tau_p,
                                                       out.data_ptr<double>(), stream));
  }
  const at::Tensor host = out.to(at::kCPU);
  const double* h = host.data_ptr<double>();
  return std::vector<double>(h, h + 5);
}

}  // namespace

TORCH_LIBRARY_IMPL(copa_fast, CUDA, m) {
  m.impl("value_summary", &value_summary_cuda);
  m.impl("symmetric_ce", &symmetric_ce_cuda);
  m.impl("episodes_sce", &episodes_sce_cuda);
  m.impl("copa_loss", &copa_loss_cuda);
}

}  // namespace copa_fast
