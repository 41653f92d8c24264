// Autograd of copa_fast::copa_loss, in C++.
//
// The op forms the gradients of `loss` in its forward (fused_grad); the backward only scales them by
// grad_output. Registered at the Autograd key in C++ so that a training step pays no Python autograd
// wrapper (argument re-packing, a Python backward): at episode sizes that overhead is a tenth of the
// whole step. The fake kernel stays in Python (copa_fast/ops/symmetric_ce.py).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace copa_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

Outputs call_below_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                            const at::Tensor& w_proto, const at::Tensor& pf, int64_t num_classes,
                            const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad,
                            bool input_grads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("copa_fast::copa_loss", "")
                             .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                            const c10::optional<at::Tensor>&, bool, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, input_grads);
}

// Input slots as the autograd edges see them: the tensor arguments in order (weights last).
enum Slot : size_t { kX = 0, kLabels, kWImg, kWProto, kPf, kTau };

class CopaLoss : public torch::autograd::Function<CopaLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels,
                               const at::Tensor& w_img, const at::Tensor& w_proto, const at::Tensor& pf,
                               int64_t num_classes, const at::Tensor& tau, const c10::optional<at::Tensor>& weights,
                               bool fused_grad, bool input_grads) {
    auto [loss, losses, pred, dx, dwi, dwp, dpf, dtau] =
        call_below_autograd(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, input_grads);
    ctx->mark_non_differentiable({pred, dx, dwi, dwp, dpf, dtau});
    ctx->set_materialize_grads(false);
    ctx->saved_data["fused"] = fused_grad;
    ctx->saved_data["input_grads"] = input_grads;
    ctx->saved_data["tau_sizes"] = tau.sizes().vec();
    ctx->saved_data["tau_dtype"] = tau.scalar_type();
    if (fused_grad) ctx->save_for_backward({dx, dwi, dwp, dpf, dtau});
    return {loss, losses, pred, dx, dwi, dwp, dpf, dtau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);   // one slot per forward argument; non-tensors stay undefined
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;   // only the per-sample losses were used: they carry no gradient
    const bool want_inputs = ctx->needs_input_grad(kX) || ctx->needs_input_grad(kPf);
    TORCH_CHECK(ctx->saved_data["fused"].toBool() && (!want_inputs || ctx->saved_data["input_grads"].toBool()),
                "copa_fast::copa_loss: the gradients asked for were not computed in the forward (call it with "
                "fused_grad=True, and input_grads=True for x and pf)");
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->needs_input_grad(kX)) out[0] = g * saved[0];
    if (ctx->needs_input_grad(kWImg)) out[2] = g * saved[1];
    if (ctx->needs_input_grad(kWProto)) out[3] = g * saved[2];
    if (ctx->needs_input_grad(kPf)) out[4] = g * saved[3];
    if (ctx->needs_input_grad(kTau)) {
      out[6] = (g * saved[4])
                   .reshape(ctx->saved_data["tau_sizes"].toIntVector())
                   .to(ctx->saved_data["tau_dtype"].toScalarType());
    }
    return out;
  }
};

Outputs copa_loss_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                           const at::Tensor& w_proto, const at::Tensor& pf, int64_t num_classes, const at::Tensor& tau,
                           const c10::optional<at::Tensor>& weights, bool fused_grad, bool input_grads) {
  variable_list o =
      CopaLoss::apply(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, input_grads);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(copa_fast, Autograd, m) {
  m.impl("copa_loss", &copa_loss_autograd);
}

}  // namespace copa_fast
