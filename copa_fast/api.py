"""Public API of copa_fast: the symmetric CE, the CoPA loss, the head module and the episode loop.

Shapes: N samples, C classes, D input feature dimension, E adapted dimension (E = D for the
published square maps). Every function validates its inputs first (DESIGN §5); pass
``check_inputs=False`` to skip the checks that read the data (needed for CUDA-graph capture;
they are skipped automatically while torch.compile traces).

Precision: float32 and float64 inputs are computed in their own precision; float16 and bfloat16
inputs are computed in float32 and the result is returned in the input dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import _validate as V
from . import backends as _backends
from . import reference
from .ops import symmetric_ce as _ops
from .reference import AdaptResult

Tau = Union[float, torch.Tensor]


def _check_values(check_inputs: bool) -> bool:
    return check_inputs and not torch.compiler.is_compiling()


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tau_tensor(tau: Tau, like: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return tau.reshape(()).to(device=like.device)
    return torch.full((), float(tau), dtype=like.dtype, device=like.device)


def _sce_core(z, q, labels, tau: Tau, reduction: str, backend: str):
    """Runs a validated problem on a kernel backend; returns (loss or per-sample losses, pred)."""
    work = _working_dtype(z.dtype)
    zw, qw = z.to(work), q.to(work)
    tau_t = _tau_tensor(tau, zw)
    op = _ops.triton_op() if backend == "triton" else _ops.cpp_op()
    weights = torch.ones(z.shape[0], dtype=work, device=z.device) if reduction == "sum" else None
    needs_grad = torch.is_grad_enabled() and (zw.requires_grad or qw.requires_grad or tau_t.requires_grad)
    loss, losses, pred, _, _, _ = op(zw, qw, labels, tau_t, weights, needs_grad and reduction != "none")
    out = losses if reduction == "none" else loss
    return out.to(z.dtype), pred


def _check_sce(embeddings, prototypes, labels, tau, reduction, check_inputs):
    V.tensor("embeddings", embeddings, 2)
    V.tensor("prototypes", prototypes, 2)
    V.same_dtype("prototypes", prototypes, "embeddings", embeddings)
    V.same_device("prototypes", prototypes, "embeddings", embeddings)
    if prototypes.shape[1] != embeddings.shape[1]:
        raise ValueError(f"prototypes: expected {embeddings.shape[1]} columns (as embeddings), "
                         f"got shape {tuple(prototypes.shape)}")
    check = _check_values(check_inputs)
    V.labels("labels", labels, embeddings.shape[0], embeddings, prototypes.shape[0], check_values=check)
    V.tau(tau, check_values=check)
    V.reduction(reduction)
    if check:
        V.finite("embeddings", embeddings)
        V.finite("prototypes", prototypes)


def symmetric_ce(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, tau: Tau = 2.0,
                 *, reduction: str = "mean", backend: Optional[str] = None,
                 check_inputs: bool = True) -> torch.Tensor:
    """CoPA's symmetric cross-entropy; drop-in for the published helper's loss.

    embeddings: (N, D) image embeddings; prototypes: (C, D) class prototypes (not expanded);
    labels: (N,) int64/int32 in 0..C-1, every class present; tau: float or 1-element tensor, the
    logit scale is exp(tau). Both sides are L2-normalised (eps 1e-12). Returns a 0-d loss
    (reduction "mean" or "sum") or (N,) per-sample losses ("none") whose mean is the loss.
    Differentiable w.r.t. embeddings, prototypes and a tensor tau.
    """
    _check_sce(embeddings, prototypes, labels, tau, reduction, check_inputs)
    b = _backends.resolve(backend, embeddings.device)
    if b == "reference":
        return reference.symmetric_ce(embeddings, prototypes, labels, tau, reduction=reduction)
    return _sce_core(embeddings, prototypes, labels, tau, reduction, b)[0]


def symmetric_ce_with_stats(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                            tau: Tau = 2.0, *, backend: Optional[str] = None, check_inputs: bool = True):
    """The published return shape: ``(loss, {"loss": float, "acc": float})``.

    acc is the fraction of rows whose most cosine-similar prototype is their label.
    Reading the two floats synchronises with the device.
    """
    _check_sce(embeddings, prototypes, labels, tau, "mean", check_inputs)
    b = _backends.resolve(backend, embeddings.device)
    if b == "reference":
        return reference.symmetric_ce_with_stats(embeddings, prototypes, labels, tau)
    loss, pred = _sce_core(embeddings, prototypes, labels, tau, "mean", b)
    return loss, {"loss": loss.item(), "acc": pred.eq(labels).float().mean().item()}


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, D) features, (N,) labels -> (C, D) class means; differentiable w.r.t. features.

    Memory-safe for any label: out-of-range labels are clamped here (the loss then turns NaN in
    the kernel, which sees the raw labels). Deterministic on every device.
    """
    n, d = features.shape
    y = labels.long().clamp(0, num_classes - 1)
    ones = torch.ones(n, dtype=features.dtype, device=features.device)
    counts = features.new_zeros(num_classes).index_add_(0, y, ones)  # sums of ones: exact in any order
    if features.device.type == "cpu":
        sums = features.new_zeros(num_classes, d).index_add(0, y, features)
    else:  # index_add on CUDA uses float atomics (order-dependent): a one-hot GEMM is deterministic
        onehot = (y[None, :] == torch.arange(num_classes, device=y.device)[:, None]).to(features.dtype)
        sums = onehot @ features
    return sums / counts.clamp_min(1)[:, None]


def copa_loss(features: torch.Tensor, labels: torch.Tensor, w_img: torch.Tensor, w_proto: torch.Tensor,
              tau: Tau = 2.0, *, prototype_features: Optional[torch.Tensor] = None, reduction: str = "mean",
              num_classes: Optional[int] = None, backend: Optional[str] = None,
              check_inputs: bool = True) -> torch.Tensor:
    """Both CoPA adapters + symmetric CE.

    features: (N, D); labels: (N,) in 0..C-1, every class present; w_img, w_proto: (E, D) maps
    (E = D, identity-initialised, in the published method); prototype_features: (N, D) rows whose
    class means are the prototypes (default: ``features``). ``Z = features @ w_img.T``,
    ``Q = class_means(prototype_features) @ w_proto.T``, loss = symmetric_ce(Z, Q, labels, tau).
    Differentiable w.r.t. every tensor input (through the class means too) and a tensor tau.
    ``num_classes`` (C) is read from the labels when not given; it is required with
    ``check_inputs=False`` and under torch.compile.
    """
    V.tensor("features", features, 2)
    n, d = features.shape
    pf = features if prototype_features is None else prototype_features
    if prototype_features is not None:
        V.tensor("prototype_features", pf, 2)
        V.same_dtype("prototype_features", pf, "features", features)
        V.same_device("prototype_features", pf, "features", features)
        if pf.shape != features.shape:
            raise ValueError(f"prototype_features: expected shape {tuple(features.shape)} (as features, "
                             f"same labels), got {tuple(pf.shape)}")
    for name, w in (("w_img", w_img), ("w_proto", w_proto)):
        V.tensor(name, w, 2)
        V.same_device(name, w, "features", features)
        if w.shape[1] != d:
            raise ValueError(f"{name}: expected shape (E, {d}) to map {d}-dim features, got {tuple(w.shape)}")
    if w_proto.shape != w_img.shape:
        raise ValueError(f"w_proto: expected shape {tuple(w_img.shape)} (as w_img), got {tuple(w_proto.shape)}")
    check = _check_values(check_inputs)
    if num_classes is None and not check:
        raise ValueError("num_classes: required with check_inputs=False or under torch.compile "
                         "(reading it from the labels would synchronise)")
    c = V.labels("labels", labels, n, features, num_classes, check_values=check)
    V.tau(tau, check_values=check)
    V.reduction(reduction)
    if check:
        V.finite("features", features)
        if prototype_features is not None:
            V.finite("prototype_features", pf)
    b = _backends.resolve(backend, features.device)
    if b == "reference":
        return reference.copa_loss(features, labels, w_img, w_proto, tau, prototype_features=prototype_features,
                                   reduction=reduction)
    work = _working_dtype(features.dtype)
    x, wi, wp = features.to(work), w_img.to(work), w_proto.to(work)
    p0 = class_means(pf.to(work), labels, c)
    return _sce_core(x @ wi.t(), p0 @ wp.t(), labels, tau, reduction, b)[0].to(features.dtype)


def _cosine_predict(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    zn = torch.nn.functional.normalize(z, dim=-1, eps=reference.NORM_EPS)
    qn = torch.nn.functional.normalize(q, dim=-1, eps=reference.NORM_EPS)
    return (zn @ qn.t()).argmax(dim=1)


class CoPAHead(nn.Module):
    """The two CoPA adapters as a module: ``w_img``, ``w_proto`` (dim, dim), identity-initialised.

    ``forward(features, labels)`` returns the CoPA loss; ``predict(query, support, support_labels)``
    returns (M,) class indices of the query rows (cosine to the adapted support class means).
    ``learn_tau=True`` makes tau a parameter.
    """

    def __init__(self, dim: int, tau: float = 2.0, *, learn_tau: bool = False, backend: Optional[str] = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        V.tau(tau, check_values=True)
        self.w_img = nn.Parameter(torch.eye(dim))
        self.w_proto = nn.Parameter(torch.eye(dim))
        self.tau = nn.Parameter(torch.tensor(float(tau))) if learn_tau else float(tau)
        self.backend = backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor, *,
                prototype_features: Optional[torch.Tensor] = None, num_classes: Optional[int] = None,
                check_inputs: bool = True) -> torch.Tensor:
        return copa_loss(features, labels, self.w_img, self.w_proto, self.tau,
                         prototype_features=prototype_features, num_classes=num_classes,
                         backend=self.backend, check_inputs=check_inputs)

    @torch.no_grad()
    def predict(self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor) -> torch.Tensor:
        V.tensor("query", query, 2)
        V.tensor("support", support, 2)
        for name, t in (("query", query), ("support", support)):
            if t.shape[1] != self.w_img.shape[1]:
                raise ValueError(f"{name}: expected {self.w_img.shape[1]} columns, got shape {tuple(t.shape)}")
        c = V.labels("support_labels", support_labels, support.shape[0], support, None, check_values=True)
        w_img, w_proto = self.w_img.to(query.dtype), self.w_proto.to(support.dtype)
        protos = class_means(support, support_labels, c) @ w_proto.t()
        return _cosine_predict(query @ w_img.t(), protos.to(query.dtype))


def _check_episode(support, support_labels, query, query_labels):
    V.tensor("support", support, 2)
    c = V.labels("support_labels", support_labels, support.shape[0], support, None, check_values=True)
    V.finite("support", support)
    if (query is None) != (query_labels is None):
        raise ValueError("query, query_labels: give both or neither")
    if query is not None:
        V.tensor("query", query, 2)
        V.same_device("query", query, "support", support)
        if query.shape[1] != support.shape[1]:
            raise ValueError(f"query: expected {support.shape[1]} columns (as support), got shape {tuple(query.shape)}")
        V.labels("query_labels", query_labels, query.shape[0], query, c, check_values=False)
        if int(query_labels.min()) < 0 or int(query_labels.max()) >= c:
            raise ValueError(f"query_labels: expected class indices in 0..{c - 1} (the support's classes), "
                             f"got {int(query_labels.min())}..{int(query_labels.max())}")
    return c


def _check_hparams(steps, lr, weight_decay, tau):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
            raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
    V.tau(tau, check_values=True)


def adapt(support: torch.Tensor, support_labels: torch.Tensor, query: Optional[torch.Tensor] = None,
          query_labels: Optional[torch.Tensor] = None, *, steps: int = 50, lr: float = 1e-3,
          weight_decay: float = 0.1, tau: float = 2.0, backend: Optional[str] = None) -> AdaptResult:
    """CoPA adaptation of one episode, as the published loop.

    support: (N, D), support_labels: (N,) in 0..C-1 (every class present), query: (M, D),
    query_labels: (M,). Identity init of both maps, ``torch.optim.Adam`` with coupled weight decay,
    ``steps`` steps; prototypes are the class means of the raw support, computed once. Returns
    AdaptResult(w_img, w_proto, losses (one per step), query_accuracy or None).
    """
    c = _check_episode(support, support_labels, query, query_labels)
    _check_hparams(steps, lr, weight_decay, tau)
    b = _backends.resolve(backend, support.device)
    if b == "reference":
        return reference.adapt(support, support_labels, query, query_labels, steps=steps, lr=lr,
                               weight_decay=weight_decay, tau=tau)
    work = _working_dtype(support.dtype)
    x = support.to(work)
    d = x.shape[1]
    w_img = torch.eye(d, dtype=work, device=x.device, requires_grad=True)
    w_proto = torch.eye(d, dtype=work, device=x.device, requires_grad=True)
    protos = class_means(x, support_labels, c)
    opt = torch.optim.Adam([w_img, w_proto], lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _sce_core(x @ w_img.t(), protos @ w_proto.t(), support_labels, tau, "mean", b)[0]
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    acc = None
    with torch.no_grad():
        if query is not None:
            pred = _cosine_predict(query.to(work) @ w_img.t(), protos @ w_proto.t())
            acc = pred.eq(query_labels).float().mean().item()
    loss_list = torch.stack(losses).tolist() if losses else []
    return AdaptResult(w_img.detach(), w_proto.detach(), loss_list, acc)


def adapt_many(episodes, *, steps: int = 50, lr: float = 1e-3, weight_decay: float = 0.1, tau: float = 2.0,
               backend: Optional[str] = None) -> list:
    """CoPA adaptation of a list of ragged episodes: ``(support, support_labels, query, query_labels)``
    tuples (or ``copa_fast.episodes.Episode``), different N and C per episode, D shared.

    Returns one AdaptResult per episode, equal to ``adapt`` on that episode. Today every backend
    runs the episodes one after another through ``adapt``; the batched one-launch engine for CUDA
    is planned.
    """
    items = []
    for k, ep in enumerate(episodes):
        parts = (ep.support, ep.support_labels, ep.query, ep.query_labels) if hasattr(ep, "support") else tuple(ep)
        if len(parts) != 4:
            raise ValueError(f"episodes[{k}]: expected (support, support_labels, query, query_labels), "
                             f"got {len(parts)} items")
        items.append(parts)
    if items:
        d = items[0][0].shape[-1]
        for k, parts in enumerate(items):
            if not isinstance(parts[0], torch.Tensor) or parts[0].dim() != 2 or parts[0].shape[1] != d:
                raise ValueError(f"episodes[{k}]: expected support of shape (N, {d}) (D shared by all episodes)")
    return [adapt(*parts, steps=steps, lr=lr, weight_decay=weight_decay, tau=tau, backend=backend)
            for parts in items]
