"""The symmetric CE and the CoPA step as differentiable PyTorch ops, in the exact N x C form.

The kernels compute the gradient during the forward and their backward only scales it by
grad_output: exact, but not itself differentiable. What needs a differentiable gradient runs here
instead: a backward called with ``create_graph=True`` (second-order terms: MAML-style inner
steps, gradient penalties, ``torch.autograd.gradgradcheck``) and calls under ``torch.func``
transforms. Same semantics as the kernels and memory-safe for any label: a row whose label is out of
range matches no class and its loss is NaN. Deterministic on every device.

``sce_losses_composite`` and ``copa_losses_composite`` are also registered as
CompositeImplicitAutograd ops, which the C++ autograd (csrc/cpu/autograd.cpp) calls in its
create_graph backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import NORM_EPS


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, D) features, (N,) labels -> (C, D) class means; differentiable w.r.t. features.

    Memory-safe for any label: out-of-range labels are clamped here (the loss then turns NaN in
    the kernel, which sees the raw labels). Deterministic on every device.
    """
    n, d = features.shape
    y = labels.long().clamp(0, max(num_classes - 1, 0))
    ones = torch.ones(n, dtype=features.dtype, device=features.device)
    counts = features.new_zeros(num_classes).index_add_(0, y, ones)  # sums of ones: exact in any order
    if features.device.type == "cpu":
        sums = features.new_zeros(num_classes, d).index_add(0, y, features)
    else:  # index_add on CUDA uses float atomics (order-dependent): a one-hot GEMM is deterministic
        onehot = (y[None, :] == torch.arange(num_classes, device=y.device)[:, None]).to(features.dtype)
        sums = onehot @ features
    return sums / counts.clamp_min(1)[:, None]


def sce_losses(z: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample symmetric-CE losses of raw rows z (N, D) and q (C, D); tau a 1-element
    log-scale tensor. ``R_i = log sum_c n_c exp(S_ic)``, ``L_c = log sum_i exp(S_ic)``,
    loss_i = (R_i + L_{y_i} - 2 S_{i,y_i}) / 2 with S = exp(tau) cos(z_i, q_c) (DESIGN §2)."""
    c = q.shape[0]
    y = labels.long()
    valid = (y >= 0) & (y < c)
    zn = F.normalize(z, dim=1, eps=NORM_EPS)
    qn = F.normalize(q, dim=1, eps=NORM_EPS)
    s = tau.reshape(()).to(z.dtype).exp() * (zn @ qn.t())
    # label lookups as a one-hot (N, C) matrix, the size of s: their gradients are GEMMs and
    # sums, deterministic on every device (index_select's backward accumulates with atomics on CUDA)
    onehot = (y[:, None] == torch.arange(c, device=y.device)[None, :]).to(z.dtype)
    row = torch.logsumexp(s + onehot.sum(0).log(), dim=1)
    col = torch.logsumexp(s, dim=0)
    losses = 0.5 * (row + onehot @ col - 2 * (onehot * s).sum(1))
    # NaN rows for out-of-range labels, in value and (through the product) in the gradient, as the kernels
    return losses * torch.where(valid, 1.0, float("nan")).to(losses.dtype)


def copa_losses(x: torch.Tensor, labels: torch.Tensor, w_img: torch.Tensor, w_proto: torch.Tensor,
                pf: torch.Tensor, num_classes: int, tau: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample losses of the CoPA step: ``sce_losses(x w_img^T, class_means(pf) w_proto^T)``."""
    return sce_losses(x @ w_img.t(), class_means(pf, labels, num_classes) @ w_proto.t(), labels, tau)


def row_weights(n: int, weights, like: torch.Tensor) -> torch.Tensor:
    """The ops' row weights: ``weights``, or 1/N each when None (the mean)."""
    return weights if weights is not None else like.new_full((n,), 1.0 / max(n, 1))


def differentiable_grads(fn, args, wanted, row_w: torch.Tensor):
    """Gradients of ``sum_i row_w_i fn(*args)_i`` w.r.t. ``args[i]`` for i in ``wanted`` (None for
    the others), themselves differentiable: what a backward called with create_graph=True returns.
    Each wanted argument goes in through a fresh view of its own, so that one tensor passed twice
    (embeddings as their own prototypes) gets each path's share in its own slot."""
    args = list(args)
    for i in wanted:
        args[i] = args[i].view_as(args[i])
    out = [None] * len(args)
    if wanted:
        grads = torch.autograd.grad(fn(*args), [args[i] for i in wanted], row_w, create_graph=True, allow_unused=True)
        for i, g in zip(wanted, grads, strict=True):
            out[i] = g
    return out


_lib = torch.library.Library("copa_fast", "FRAGMENT")
_lib.define("sce_losses_composite(Tensor z, Tensor q, Tensor labels, Tensor tau) -> Tensor")
_lib.impl("sce_losses_composite", sce_losses, "CompositeImplicitAutograd")
_lib.define("copa_losses_composite(Tensor x, Tensor labels, Tensor w_img, Tensor w_proto, Tensor pf, "
            "SymInt num_classes, Tensor tau) -> Tensor")
_lib.impl("copa_losses_composite", copa_losses, "CompositeImplicitAutograd")
