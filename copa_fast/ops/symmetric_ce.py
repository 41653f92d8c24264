"""Registration of the symmetric-CE operators: fake kernels, autograd, the Triton custom op.

Every backend's op has one schema:

    symmetric_ce(z, q, labels, tau, weights, fused_grad, precision="ieee") -> (loss, losses, pred, dz, dq, dtau)

z (N, D), q (C, D): raw rows (normalised inside); labels (N,) int; tau: 1-element tensor, the
logit scale is exp(tau); weights (N,) or None (= 1/N): loss = sum_i weights_i * losses_i.
pred (N,) int64 is argmax_c cos(z_i, q_c). With ``fused_grad`` the op also returns the gradient
of ``loss`` w.r.t. z, q and tau, computed while the forward's intermediates are at hand, and the
backward only scales it by grad_output. Without it, dz/dq/dtau are empty and the backward calls
the op again with ``weights = grad_losses + grad_loss * weights``: that path serves per-sample
losses (reduction="none").

``copa_fast::symmetric_ce`` is the C++ op (CPU kernel, and CUDA kernel where built);
``copa_fast::symmetric_ce_triton`` is the Triton one (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). ``precision`` ("ieee" or "tf32"; the Triton op also "tf32x3", three TF32
products a product): for float32 tensors, whether products may run on TF32 tensor cores — every
dot product of the Triton kernels; on the C++ op, the cuBLAS products of the CUDA large-problem
path (the CPU kernels and the fused CUDA kernel compute IEEE products at either).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from .._transfer import to_device
from . import composite as _composite

SCE_CPP = "copa_fast::symmetric_ce"
SCE_TRITON = "copa_fast::symmetric_ce_triton"


def _fake(z, q, labels, tau, weights, fused_grad, precision="ieee"):
    torch._check(z.dim() == 2, lambda: f"z: expected 2-D, got {z.dim()}-D")
    torch._check(q.dim() == 2, lambda: f"q: expected 2-D, got {q.dim()}-D")
    torch._check(q.shape[1] == z.shape[1], lambda: "q: expected as many columns as z")
    torch._check(labels.dim() == 1 and labels.shape[0] == z.shape[0],
                 lambda: "labels: expected one entry per row of z")
    n, d = z.shape
    c = q.shape[0]
    grad_shape = (lambda *s: s) if fused_grad else (lambda *s: (0,))
    return (z.new_empty(()), z.new_empty((n,)), labels.new_empty((n,), dtype=torch.int64),
            z.new_empty(grad_shape(n, d)), z.new_empty(grad_shape(c, d)), z.new_empty(grad_shape()))


def _autograd_parts(qualname):
    """(setup_context, backward) of a symmetric-CE op, for torch.library.register_autograd and for
    the eager autograd.Function of the same kernels (``_eager_function``)."""
    def setup_context(ctx, inputs, output):
        z, q, labels, tau, weights, fused_grad = inputs[:6]
        ctx.extra = tuple(inputs[6:])   # the Triton op's precision
        _, _, pred, dz, dq, dtau = output
        ctx.mark_non_differentiable(pred, dz, dq, dtau)
        ctx.set_materialize_grads(False)   # no zero-filled (N, D) grads for the unused outputs
        ctx.fused = fused_grad
        ctx.tau_meta = (tau.shape, tau.dtype)
        # the inputs too: a create_graph backward recomputes the loss from them (ops/composite.py)
        ctx.save_for_backward(z, q, labels, tau, weights, dz, dq, dtau)

    def backward(ctx, g_loss, g_losses, _g_pred, _g_dz, _g_dq, _g_dtau):
        tau_shape, tau_dtype = ctx.tau_meta
        nones = (None,) * (6 + len(ctx.extra))
        if g_loss is None and (ctx.fused or g_losses is None):
            return nones   # with fused_grad the per-sample outputs carry no gradient
        z, q, labels, tau, weights, dz, dq, dtau = ctx.saved_tensors
        need = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()   # only a create_graph backward runs with grad mode on
        if create_graph or not ctx.fused:   # the loss's gradient taken as sum_i row_w_i losses_i
            row_w = (g_loss * _composite.row_weights(z.shape[0], weights, z) if g_loss is not None else 0) + (
                g_losses if g_losses is not None and not ctx.fused else 0)
        if create_graph:   # a gradient that is itself differentiable
            dz, dq, _, dtau = _composite.differentiable_grads(
                _composite.sce_losses, (z, q, labels, tau), [i for i in (0, 1, 3) if need[i]], row_w)
        elif ctx.fused:
            dz, dq, dtau = g_loss * dz, g_loss * dq, g_loss * dtau
        else:
            op = getattr(torch.ops.copa_fast, qualname.split("::")[1]).default
            _, _, _, dz, dq, dtau = op(z, q, labels, tau, row_w, True, *ctx.extra)
        dtau = dtau.reshape(tau_shape).to(tau_dtype) if need[3] and dtau is not None else None
        return (dz if need[0] else None, dq if need[1] else None,
                None, dtau, None, None) + (None,) * len(ctx.extra)

    return setup_context, backward


def _eager_function(name, impl, setup_context, backward):
    """A torch.autograd.Function running ``impl`` (the op's own kernels) with the op's autograd.

    Eager calls go through it instead of the custom op: torch.library's Python autograd wrapper
    costs ~0.25 ms per forward + backward on this project's CPU (measured with an empty kernel:
    0.37 ms vs 0.12 ms through a Function), more than a whole small-episode step on a GPU. Under
    torch.compile the custom op is used (opaque to the tracer, with its fake kernel)."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(impl), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


def _eager_or_op(op, function):
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else function.apply(*args)
    return call


# --- the C++ op (CPU, and CUDA where built); its autograd is C++ (csrc/cpu/autograd.cpp) -------------
if _extension.loaded():
    torch.library.register_fake(SCE_CPP)(_fake)


def cpp_op():
    return torch.ops.copa_fast.symmetric_ce.default


# --- the fused CoPA step (CPU; CUDA where built) -------------------------------------------------
# copa_loss(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision="ieee")
#   -> (loss, losses, pred, dz, dq, p0, dtau)
# p0 = class means of pf, z = x w_img^T and q = p0 w_proto^T are formed inside; with fused_grad dz,
# dq, dtau are the gradients of ``loss`` w.r.t. z, q and tau, and the backward (registered in C++,
# csrc/cpu/autograd.cpp) forms the weight and input gradients from them with grad_output
# folded in. Per-sample losses carry no gradient through this op: reduction="none" uses the
# symmetric_ce op.
COPA_CPP = "copa_fast::copa_loss"


def _copa_fake(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision="ieee"):
    torch._check(x.dim() == 2 and pf.dim() == 2 and w_img.dim() == 2, lambda: "x, pf, w_img: expected 2-D")
    n, e = x.shape[0], w_img.shape[0]

    def grad(*shape):   # one fresh tensor per output: outputs never alias
        return x.new_empty(shape if fused_grad else (0,))

    return (x.new_empty(()), x.new_empty((n,)), labels.new_empty((n,), dtype=torch.int64), grad(n, e),
            grad(num_classes, e), x.new_empty((num_classes, x.shape[1])), grad())


if _extension.loaded():
    torch.library.register_fake(COPA_CPP)(_copa_fake)   # its autograd is C++: csrc/cpu/autograd.cpp


def copa_op():
    return torch.ops.copa_fast.copa_loss.default


# The same step on the Triton kernels: schema and C++ autograd from the extension, kernel from here.
COPA_TRITON = "copa_fast::copa_loss_triton"


def _copa_triton_impl(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision="ieee"):
    from ..triton import symmetric_ce as kernels

    return kernels.copa_loss(x, labels, w_img, w_proto, pf, num_classes, tau, weights, fused_grad, precision)


_HAS_TRITON_STEP = _extension.loaded() and hasattr(torch.ops.copa_fast, "copa_loss_triton")
if _HAS_TRITON_STEP:
    torch.library.register_fake(COPA_TRITON)(_copa_fake)
    # CPU tensors reach it only under Triton's interpreter (the API's backend choice)
    torch.library.impl(COPA_TRITON, ("cpu", "cuda"))(_copa_triton_impl)


def triton_step_op():
    """copa_fast::copa_loss_triton, or None without the extension (which defines its schema and
    autograd): the API then runs the Triton step as adapters + symmetric_ce_triton."""
    return torch.ops.copa_fast.copa_loss_triton.default if _HAS_TRITON_STEP else None


# --- the Triton op --------------------------------------------------------------------------------
def _triton_impl(z, q, labels, tau, weights, fused_grad, precision="ieee"):
    from ..triton import symmetric_ce as kernels

    return kernels.symmetric_ce(z, q, labels, tau, weights, fused_grad, precision)


@torch.library.custom_op(SCE_TRITON, mutates_args=())
def symmetric_ce_triton(z: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor,
                        weights: Optional[torch.Tensor], fused_grad: bool, precision: str = "ieee"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    return _triton_impl(z, q, labels, tau, weights, fused_grad, precision)


symmetric_ce_triton.register_fake(_fake)
_SCE_TRITON_PARTS = _autograd_parts(SCE_TRITON)
torch.library.register_autograd(SCE_TRITON, _SCE_TRITON_PARTS[1], setup_context=_SCE_TRITON_PARTS[0])
_TritonSCE = _eager_function("_TritonSCE", _triton_impl, *_SCE_TRITON_PARTS)


def triton_op():
    """The Triton custom op itself (torch.compile, opcheck)."""
    return torch.ops.copa_fast.symmetric_ce_triton.default


def triton_call():
    """What the API calls: the same kernels and autograd, through the custom op only under
    torch.compile (see ``_eager_function``)."""
    return _eager_or_op(triton_op(), _TritonSCE)


# --- the batched-episodes Triton op (internal) ------------------------------------------------------
EPISODES_TRITON = "copa_fast::episodes_sce_triton"


def _episodes_triton_impl(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad, precision="ieee"):
    from ..triton import symmetric_ce as kernels

    return kernels.episodes_sce(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad, precision)


@torch.library.custom_op(EPISODES_TRITON, mutates_args=())
def episodes_sce_triton(z: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                        classes: torch.Tensor, s_off: torch.Tensor, s_total: int, tau: torch.Tensor,
                        fused_grad: bool, precision: str = "ieee"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """E ragged episodes in one launch (internal; see copa_fast.triton.symmetric_ce._episodes).

    z (R, D) and q (K, D) stack the episodes' rows and classes (packed or padded); rows and classes
    (E, 2) int64 give [start, count] of each episode, starts ascending; labels (R,) are local to
    each episode; s_off (E,) the start of each N_e x C_e score block, s_total their total size;
    tau (E,). Returns per-episode losses (E,), per-row losses, pred, dz, dq, dtau (E,).
    """
    return _episodes_triton_impl(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad, precision)


@episodes_sce_triton.register_fake
def _episodes_fake(z, q, labels, rows, classes, s_off, s_total, tau, fused_grad, precision="ieee"):
    e = rows.shape[0]
    n, d = z.shape
    grad = (lambda t: torch.empty_like(t)) if fused_grad else (lambda t: t.new_empty(0))
    return (z.new_empty(e), z.new_empty(n), labels.new_empty(n, dtype=torch.int64), grad(z), grad(q),
            z.new_empty(e) if fused_grad else z.new_empty(0))


def _episodes_setup(ctx, inputs, output):
    z, q, labels, rows, classes, s_off, s_total, tau, fused_grad = inputs[:9]
    _, _, pred, dz, dq, dtau = output
    ctx.mark_non_differentiable(pred, dz, dq, dtau)
    ctx.set_materialize_grads(False)
    ctx.fused = fused_grad
    ctx.n_extra = len(inputs) - 9   # the Triton op's precision
    ctx.save_for_backward(dz, dq, dtau, rows, classes)


def _episodes_backward(ctx, g_loss, g_losses, _g_pred, _g_dz, _g_dq, _g_dtau):
    if g_loss is None:   # only the per-row outputs were used: they carry no gradient here
        return (None,) * (9 + ctx.n_extra)
    if not ctx.fused:
        raise RuntimeError("episodes_sce: gradients need fused_grad=True")
    if torch.is_grad_enabled():
        raise RuntimeError("episodes_sce: no second-order gradients (backward with create_graph=True); "
                           "copa_loss and symmetric_ce have them")
    dz, dq, dtau, rows, classes = ctx.saved_tensors
    # scale each row (class) by its episode's grad_output; rows owned by no episode have zero grads

    def per_item(starts, count):
        owner = torch.searchsorted(starts, torch.arange(count, device=starts.device), right=True) - 1
        return g_loss[owner.clamp_min(0)][:, None]

    return (dz * per_item(rows[:, 0].contiguous(), dz.shape[0]), dq * per_item(classes[:, 0].contiguous(), dq.shape[0]),
            None, None, None, None, None, g_loss * dtau, None) + (None,) * ctx.n_extra


torch.library.register_autograd(EPISODES_TRITON, _episodes_backward, setup_context=_episodes_setup)


_TritonEpisodes = _eager_function("_TritonEpisodes", _episodes_triton_impl, _episodes_setup, _episodes_backward)

EPISODES_CPP = "copa_fast::episodes_sce"
if _extension.loaded():   # its autograd is C++ (csrc/cpu/autograd.cpp), the same as _episodes_backward
    torch.library.register_fake(EPISODES_CPP)(_episodes_fake)


def episode_layout(rows_per_episode, classes_per_episode, device, *, row_stride=None, class_stride=None):
    """Offsets of the episodes op for episodes stacked in order: packed (each episode starts where
    the previous one ends) or padded (episode e starts at e * stride). Returns rows, classes (E, 2)
    int64 [start, count], s_off (E,) and s_total, all but s_total on ``device``."""
    ns, cs = list(rows_per_episode), list(classes_per_episode)

    def starts(counts, stride):
        if stride is not None:
            return torch.arange(len(counts), dtype=torch.int64) * stride
        return torch.tensor([0] + counts[:-1], dtype=torch.int64).cumsum(0)

    sizes = [n * c for n, c in zip(ns, cs, strict=True)]
    host = torch.cat([torch.stack([starts(ns, row_stride), torch.tensor(ns, dtype=torch.int64)], 1).reshape(-1),
                      torch.stack([starts(cs, class_stride), torch.tensor(cs, dtype=torch.int64)], 1).reshape(-1),
                      starts(sizes, None)])
    # one copy, queued without waiting for the device (to_device)
    rows, classes, s_off = to_device(host, torch.device(device)).split([2 * len(ns), 2 * len(cs), len(sizes)])
    return rows.view(-1, 2), classes.view(-1, 2), s_off, sum(sizes)


def episodes_op(backend: str = "triton"):
    """The batched-episodes op of a backend: ``triton``, or ``cpu`` / ``cuda`` (the C++ op)."""
    if backend == "triton":
        return torch.ops.copa_fast.episodes_sce_triton.default
    return torch.ops.copa_fast.episodes_sce.default


def episodes_call(backend: str = "triton"):
    """What adapt_many calls: for ``triton`` the op's kernels through an autograd.Function outside
    torch.compile (see ``_eager_function``), else the op."""
    if backend == "triton":
        return _eager_or_op(episodes_op(backend), _TritonEpisodes)
    return episodes_op(backend)
