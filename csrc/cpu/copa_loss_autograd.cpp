// Autograd of copa_fast::copa_loss, in C++.
//
// The op returns, with fused_grad, the gradients of `loss` w.r.t. the adapted rows (dz, dq) and tau.
// The backward forms what is asked for from them with grad_output g folded in:
//   d w_img = g dz^T x,  d w_proto = g dq^T p0,  d x = g dz w_img,  d pf_j = g (dq w_proto)_{y_j} / n_{y_j}.
// When g is a plain CPU tensor equal to 1 (loss.backward()) there is no scaling pass at all, and each
// D x D gradient is a fresh GEMM output that AccumulateGrad takes without a copy. Registered at the
// Autograd key in C++ so that a training step pays no Python autograd wrapper. The backward uses ATen
// ops only, so it also traces under torch.compile (the fake kernel is in copa_fast/ops/symmetric_ce.py).

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>

namespace copa_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs call_below_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                            const at::Tensor& w_proto, const at::Tensor& pf, int64_t num_classes,
                            const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("copa_fast::copa_loss", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                            const c10::optional<at::Tensor>&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad);
}

// a @ b scaled by the 0-d grad_output g
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& g) {
  at::Tensor r = at::mm(a, b);
  if (at::isTensorSubclassLike(g) || !g.device().is_cpu()) return r * g;   // traced (fake) tensors
  const double v = g.item<double>();   // a CPU scalar: reading it costs no synchronisation
  if (v != 1.0) r.mul_(v);
  return r;
}

// Input slots as the autograd edges see them: the tensor arguments in order (weights last).
enum Slot : size_t { kX = 0, kLabels, kWImg, kWProto, kPf, kTau };

class CopaLoss : public torch::autograd::Function<CopaLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels,
                               const at::Tensor& w_img, const at::Tensor& w_proto, const at::Tensor& pf,
                               int64_t num_classes, const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
                               bool fused_grad) {
    auto [loss, losses, pred, dz, dq, p0, dtau] =
        call_below_autograd(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad);
    ctx->mark_non_differentiable({pred, dz, dq, p0, dtau});
    ctx->set_materialize_grads(false);
    ctx->saved_data["fused"] = fused_grad;
    ctx->saved_data["num_classes"] = num_classes;
    ctx->saved_data["tau_sizes"] = tau.sizes().vec();
    ctx->saved_data["tau_dtype"] = tau.scalar_type();
    if (fused_grad) ctx->save_for_backward({x, labels, w_img, w_proto, dz, dq, p0, dtau});
    return {loss, losses, pred, dz, dq, p0, dtau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);   // one slot per forward argument; non-tensors stay undefined
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;   // only the per-sample losses were used: they carry no gradient
    TORCH_CHECK(ctx->saved_data["fused"].toBool(),
                "copa_fast::copa_loss: gradients need fused_grad=True in the forward");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &labels = s[1], &w_img = s[2], &w_proto = s[3], &dz = s[4], &dq = s[5],
                     &p0 = s[6], &dtau = s[7];
    if (ctx->needs_input_grad(kWImg)) out[2] = scaled_mm(dz.t(), x, g);
    if (ctx->needs_input_grad(kWProto)) out[3] = scaled_mm(dq.t(), p0, g);
    if (ctx->needs_input_grad(kX)) out[0] = scaled_mm(dz, w_img, g);
    if (ctx->needs_input_grad(kPf)) {
      // d pf_j = d p0_{y_j} / n_{y_j} over valid labels; NaN on rows with an invalid label
      const int64_t C = ctx->saved_data["num_classes"].toInt();
      const at::Tensor y = labels.to(at::kLong);
      const at::Tensor valid = (y >= 0).logical_and(y < C);
      const at::Tensor yc = y.clamp(0, C - 1);
      const at::Tensor counts = at::zeros({C}, dq.options()).index_add_(0, yc, valid.to(dq.scalar_type()));
      const at::Tensor dp0 = scaled_mm(dq, w_proto, g).div_(counts.clamp_min(1).unsqueeze(1));
      out[4] = dp0.index_select(0, yc).masked_fill_(valid.logical_not().unsqueeze(1),
                                                    std::numeric_limits<double>::quiet_NaN());
    }
    if (ctx->needs_input_grad(kTau)) {
      out[6] = (g * dtau)
                   .reshape(ctx->saved_data["tau_sizes"].toIntVector())
                   .to(ctx->saved_data["tau_dtype"].toScalarType());
    }
    return out;
  }
};

Outputs copa_loss_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                           const at::Tensor& w_proto, const at::Tensor& pf, int64_t num_classes, const at::Tensor& tau,
                           const c10::optional<at::Tensor>& weights, bool fused_grad) {
  variable_list o = CopaLoss::apply(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(copa_fast, Autograd, m) {
  m.impl("copa_loss", &copa_loss_autograd);
}

}  // namespace copa_fast
