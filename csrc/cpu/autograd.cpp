// Autograd of the ops copa_fast::copa_loss, symmetric_ce and episodes_sce (CPU and CUDA kernels) and
// copa_loss_triton (the same step on the Triton kernels), registered at the Autograd key in C++: a
// training step pays no Python autograd wrapper (argument re-packing and a Python backward, ~100 us a
// call). The backwards use ATen ops only, so they also trace under torch.compile (the fake kernels
// are in copa_fast/ops/symmetric_ce.py).
//
// copa_loss: the op returns, with fused_grad, the gradients of `loss` w.r.t. the adapted rows (dz, dq) and tau.
// The backward forms what is asked for from them with grad_output g folded in:
//   d w_img = g dz^T x,  d w_proto = g dq^T p0,  d x = g dz w_img,  d pf_j = g (dq w_proto)_{y_j} / n_{y_j}.
// When g is a plain CPU tensor equal to 1 (loss.backward()) there is no scaling pass at all, and each
// D x D gradient is a fresh GEMM output that AccumulateGrad takes without a copy.
//
// symmetric_ce: with fused_grad the op's dz, dq, dtau are the gradients of `loss`, scaled here by
// grad_output (no pass when it is a CPU 1); without it (per-sample losses, reduction="none") the
// backward calls the op again with per-row weights grad_losses + grad_loss * weights.
//
// A backward called with create_graph=True (grad mode on inside it) needs a gradient that is itself
// differentiable, which a precomputed one is not: it recomputes the per-sample losses with the
// CompositeImplicitAutograd ops of copa_fast/ops/composite.py (the same N x C form in ATen ops,
// registered by the Python package) and differentiates them with create_graph, so second-order
// terms reach every input. Under torch.compile and in plain backward calls grad mode is off there.

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace copa_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The step ops share a schema and this autograd: copa_loss (C++ kernels) and copa_loss_triton (the
// Triton kernels, registered from Python). Each instantiation is named by its op's tag.
struct CppStep {
  static constexpr const char* name = "copa_fast::copa_loss";
};
struct TritonStep {
  static constexpr const char* name = "copa_fast::copa_loss_triton";
};

template <class Step>
Outputs call_below_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                            const at::Tensor& w_proto, const at::Tensor& pf, const c10::SymInt& num_classes,
                            const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad,
                            c10::string_view precision) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(Step::name, "")
                             .template typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                     const at::Tensor&, const c10::optional<at::Tensor>&, bool,
                                                     c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision);
}

// The value of the 0-d grad_output g when it can be read for free (a plain CPU tensor), else NaN:
// traced (fake) tensors have no value, and reading a CUDA one would synchronise.
double free_value(const at::Tensor& g) {
  if (at::isTensorSubclassLike(g) || !g.device().is_cpu()) return std::numeric_limits<double>::quiet_NaN();
  return g.item<double>();
}

// a @ b scaled by the 0-d grad_output g. A g whose value cannot be read for free scales the fresh product
// in place (on CUDA: no second D x D buffer), unless g is batched or traced (a vmapped backward's g, a
// fake tensor), whose product with the plain r is a tensor of another kind: that takes the out-of-place
// product.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& g) {
  at::Tensor r = at::mm(a, b);
  const double v = free_value(g);
  if (std::isnan(v)) return at::isTensorSubclassLike(g) ? r * g : r.mul_(g);
  if (v != 1.0) r.mul_(v);
  return r;
}

// t scaled by the 0-d grad_output g (t itself, unchanged, when g is a CPU 1)
at::Tensor scaled(const at::Tensor& t, const at::Tensor& g) {
  return free_value(g) == 1.0 ? t : t * g;
}

// The row weights w of `loss = sum_i w_i losses_i`: `weights`, or 1/N each when undefined (the mean).
at::Tensor row_weights(const at::Tensor& weights, const at::Tensor& like) {
  return weights.defined() ? weights : at::full({like.size(0)}, 1.0 / double(std::max<int64_t>(like.size(0), 1)),
                                                like.options());
}

// Differentiable gradients of sum_i row_w_i losses_i, losses = composite op `name`(args), w.r.t. the
// tensor arguments at positions `wanted` (each through a fresh view of its own, so that one tensor
// passed twice, as features and prototype features, gets each path's share in its own slot).
variable_list composite_grads(const char* name, std::vector<c10::IValue> args, const std::vector<size_t>& wanted,
                              const at::Tensor& row_w) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(op.has_value(), "copa_fast: second-order gradients (create_graph=True) need the Python package "
              "(`import copa_fast`), which registers ", name);
  variable_list inputs;
  for (size_t i : wanted) {
    at::Tensor t = args[i].toTensor();
    inputs.push_back(t.view_as(t));
    args[i] = inputs.back();
  }
  if (inputs.empty()) return {};
  op->callBoxed(args);   // the arguments are replaced by the op's one output
  return torch::autograd::grad({args[0].toTensor()}, inputs, {row_w}, std::nullopt, /*create_graph=*/true,
                               /*allow_unused=*/true);
}

// Input slots as the autograd edges see them: the tensor arguments in order (weights last).
enum Slot : size_t { kX = 0, kLabels, kWImg, kWProto, kPf, kTau };

// The autograd node classes carry readable names: a tensor's repr shows the part of the node's C++
// type name after its last "::" (torch::autograd::CppNode<...::CopaLossBackward> prints as
// grad_fn=<CopaLossBackward>>), so each step variant is a class of its own over this template.
template <class Step, class Self>
class CopaLossFunction : public torch::autograd::Function<Self> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels,
                               const at::Tensor& w_img, const at::Tensor& w_proto, const at::Tensor& pf,
                               const c10::SymInt& num_classes, const at::Tensor& tau,
                               const c10::optional<at::Tensor>& weights, bool fused_grad,
                               c10::string_view precision) {
    auto [loss, losses, pred, dz, dq, p0, dtau] =
        call_below_autograd<Step>(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision);
    ctx->mark_non_differentiable({pred, dz, dq, p0, dtau});
    ctx->set_materialize_grads(false);
    ctx->saved_data["fused"] = fused_grad;
    ctx->saved_data["num_classes"] = num_classes;
    ctx->saved_data["tau_sizes"] = tau.sizes().vec();
    ctx->saved_data["tau_dtype"] = tau.scalar_type();
    if (fused_grad) {
      ctx->save_for_backward(
          {x, labels, w_img, w_proto, dz, dq, p0, dtau, pf, tau, weights.has_value() ? *weights : at::Tensor()});
    }
    return {loss, losses, pred, dz, dq, p0, dtau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);   // one slot per forward argument; non-tensors stay undefined
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;   // only the per-sample losses were used: they carry no gradient
    TORCH_CHECK(ctx->saved_data["fused"].toBool(), Step::name, ": gradients need fused_grad=True in the forward");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &labels = s[1], &w_img = s[2], &w_proto = s[3], &dz = s[4], &dq = s[5],
                     &p0 = s[6], &dtau = s[7];
    if (at::GradMode::is_enabled()) {   // create_graph=True: through the composite op
      const at::Tensor &pf = s[8], &tau = s[9];
      const std::vector<std::pair<Slot, size_t>> slots = {{kX, 0}, {kWImg, 2}, {kWProto, 3}, {kPf, 4}, {kTau, 6}};
      std::vector<size_t> wanted, outs;   // composite-op argument positions and output slots, in order
      for (const auto& [edge, o] : slots) {
        if (!ctx->needs_input_grad(edge)) continue;
        wanted.push_back(o);   // the composite op's arguments sit in the forward's positions
        outs.push_back(o);
      }
      const variable_list gr = composite_grads(
          "copa_fast::copa_losses_composite",
          {x, labels, w_img, w_proto, pf, ctx->saved_data["num_classes"].toSymInt(), tau}, wanted,
          g * row_weights(s[10], x));
      for (size_t k = 0; k < gr.size(); ++k) out[outs[k]] = gr[k];
      return out;
    }
    if (ctx->needs_input_grad(kWImg)) out[2] = scaled_mm(dz.t(), x, g);
    if (ctx->needs_input_grad(kWProto)) out[3] = scaled_mm(dq.t(), p0, g);
    if (ctx->needs_input_grad(kX)) out[0] = scaled_mm(dz, w_img, g);
    if (ctx->needs_input_grad(kPf)) {
      // d pf_j = d p0_{y_j} / n_{y_j} over valid labels; NaN on rows with an invalid label
      // (C symbolic under torch.compile with dynamic shapes: sizes and bounds stay SymInts)
      const c10::SymInt C = ctx->saved_data["num_classes"].toSymInt();
      const at::Tensor y = labels.to(at::kLong);
      const at::Tensor valid = (y >= 0).logical_and(y.lt(c10::Scalar(C)));
      const at::Tensor yc = y.clamp(0, c10::Scalar(C - 1));
      const at::Tensor counts =
          at::zeros_symint({C}, dq.options()).index_add_(0, yc, valid.to(dq.scalar_type()));
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

class CopaLossBackward final : public CopaLossFunction<CppStep, CopaLossBackward> {};
class CopaLossTritonBackward final : public CopaLossFunction<TritonStep, CopaLossTritonBackward> {};

template <class Node>
Outputs copa_loss_autograd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_img,
                           const at::Tensor& w_proto, const at::Tensor& pf, c10::SymInt num_classes,
                           const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad,
                           c10::string_view precision) {
  variable_list o =
      Node::apply(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

using SceOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SceOutputs sce_below_autograd(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                              const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad,
                              c10::string_view precision) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("copa_fast::symmetric_ce", "")
                             .typed<SceOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const c10::optional<at::Tensor>&, bool,
                                               c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(z, q, labels, tau, weights, fused_grad, precision);
}

class SymmetricCEBackward : public torch::autograd::Function<SymmetricCEBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& q,
                               const at::Tensor& labels, const at::Tensor& tau,
                               const c10::optional<at::Tensor>& weights, bool fused_grad,
                               c10::string_view precision) {
    auto [loss, losses, pred, dz, dq, dtau] = sce_below_autograd(z, q, labels, tau, weights, fused_grad, precision);
    ctx->mark_non_differentiable({pred, dz, dq, dtau});
    ctx->set_materialize_grads(false);
    ctx->saved_data["fused"] = fused_grad;
    ctx->saved_data["precision"] = std::string(precision);
    ctx->saved_data["tau_sizes"] = tau.sizes().vec();
    ctx->saved_data["tau_dtype"] = tau.scalar_type();
    // the inputs also with fused_grad: a create_graph backward recomputes the losses from them
    ctx->save_for_backward({z, q, labels, tau, weights.has_value() ? *weights : at::Tensor(), dz, dq, dtau});
    return {loss, losses, pred, dz, dq, dtau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    const at::Tensor &g_loss = grads[0], &g_losses = grads[1];
    const bool fused = ctx->saved_data["fused"].toBool();
    // with fused_grad the per-sample outputs carry no gradient
    if (!g_loss.defined() && (fused || !g_losses.defined())) return out;
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &z = s[0], &q = s[1], &labels = s[2], &tau = s[3], &weights = s[4];
    const bool create_graph = at::GradMode::is_enabled();   // only a create_graph backward runs with it on
    at::Tensor dz, dq, dtau, row_w;   // row_w: the loss's gradient taken as sum_i row_w_i losses_i
    if (create_graph || !fused) {
      row_w = g_loss.defined() ? g_loss * row_weights(weights, z) : at::zeros({z.size(0)}, z.options());
      if (g_losses.defined() && !fused) row_w = row_w + g_losses;
    }
    if (create_graph) {   // through the composite op
      std::vector<size_t> wanted;
      for (size_t i : {0, 1, 3}) {
        if (ctx->needs_input_grad(i)) wanted.push_back(i);
      }
      const variable_list gr = composite_grads("copa_fast::sce_losses_composite", {z, q, labels, tau}, wanted, row_w);
      for (size_t k = 0; k < gr.size(); ++k) out[wanted[k]] = gr[k];
      if (out[3].defined()) out[3] = out[3].reshape(ctx->saved_data["tau_sizes"].toIntVector());
      return out;
    }
    if (fused) {
      dz = scaled(s[5], g_loss);
      dq = scaled(s[6], g_loss);
      dtau = g_loss * s[7];
    } else {
      auto r = sce_below_autograd(z, q, labels, tau, row_w, /*fused_grad=*/true,
                                  ctx->saved_data["precision"].toStringRef());
      dz = std::get<3>(r);
      dq = std::get<4>(r);
      dtau = std::get<5>(r);
    }
    if (ctx->needs_input_grad(0)) out[0] = dz;
    if (ctx->needs_input_grad(1)) out[1] = dq;
    if (ctx->needs_input_grad(3)) {
      out[3] = dtau.reshape(ctx->saved_data["tau_sizes"].toIntVector())
                   .to(ctx->saved_data["tau_dtype"].toScalarType());
    }
    return out;
  }
};

SceOutputs symmetric_ce_autograd(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                                 const at::Tensor& tau, const c10::optional<at::Tensor>& weights, bool fused_grad,
                                 c10::string_view precision) {
  variable_list o = SymmetricCEBackward::apply(z, q, labels, tau, weights, fused_grad, precision);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

// episodes_sce: E ragged episodes; with fused_grad the op's dz, dq, dtau are the gradients of every
// episode's loss, and the backward scales each row (class) by its episode's grad_output.
using EpisodesOutputs = SceOutputs;

EpisodesOutputs episodes_below_autograd(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                                        const at::Tensor& rows, const at::Tensor& classes, const at::Tensor& s_off,
                                        int64_t s_total, const at::Tensor& tau, bool fused_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("copa_fast::episodes_sce", "")
                             .typed<EpisodesOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                    const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad);
}

// (count, 1) grad_output of the episode owning each of `count` stacked items, given the episodes'
// ascending starts; items before the first start take episode 0's (their gradient is zero anyway).
at::Tensor per_item(const at::Tensor& g, const at::Tensor& starts, int64_t count) {
  const at::Tensor idx = at::arange(count, starts.options());
  const at::Tensor owner = (at::searchsorted(starts, idx, /*out_int32=*/false, /*right=*/true) - 1).clamp_min(0);
  return g.index_select(0, owner).unsqueeze(1);
}

class EpisodesSCEBackward : public torch::autograd::Function<EpisodesSCEBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& q,
                               const at::Tensor& labels, const at::Tensor& rows, const at::Tensor& classes,
                               const at::Tensor& s_off, int64_t s_total, const at::Tensor& tau, bool fused_grad) {
    auto [loss, losses, pred, dz, dq, dtau] =
        episodes_below_autograd(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad);
    ctx->mark_non_differentiable({pred, dz, dq, dtau});
    ctx->set_materialize_grads(false);
    ctx->saved_data["fused"] = fused_grad;
    ctx->save_for_backward({dz, dq, dtau, rows, classes});
    return {loss, losses, pred, dz, dq, dtau};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;   // only the per-row outputs were used: they carry no gradient here
    TORCH_CHECK(ctx->saved_data["fused"].toBool(), "episodes_sce: gradients need fused_grad=True");
    TORCH_CHECK(!at::GradMode::is_enabled(), "episodes_sce: no second-order gradients (backward with "
                "create_graph=True); copa_loss and symmetric_ce have them");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &dz = s[0], &dq = s[1], &dtau = s[2], &rows = s[3], &classes = s[4];
    if (ctx->needs_input_grad(0)) out[0] = dz * per_item(g, rows.select(1, 0).contiguous(), dz.size(0));
    if (ctx->needs_input_grad(1)) out[1] = dq * per_item(g, classes.select(1, 0).contiguous(), dq.size(0));
    if (ctx->needs_input_grad(6)) out[7] = g * dtau;   // edge 6: tau (s_total is no tensor)
    return out;
  }
};

EpisodesOutputs episodes_sce_autograd(const at::Tensor& z, const at::Tensor& q, const at::Tensor& labels,
                                      const at::Tensor& rows, const at::Tensor& classes, const at::Tensor& s_off,
                                      int64_t s_total, const at::Tensor& tau, bool fused_grad) {
  variable_list o = EpisodesSCEBackward::apply(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(copa_fast, Autograd, m) {
  m.impl("copa_loss", &copa_loss_autograd<CopaLossBackward>);
  m.impl("copa_loss_triton", &copa_loss_autograd<CopaLossTritonBackward>);
  m.impl("symmetric_ce", &symmetric_ce_autograd);
  m.impl("episodes_sce", &episodes_sce_autograd);
}

}  // namespace copa_fast
