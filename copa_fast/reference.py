"""Readable pure-PyTorch reference of CoPA: the oracle of every test.

Everything here follows the published formulation (N x N logits over label-expanded prototypes),
with the one documented difference that rows are normalised as ``F.normalize`` does (eps 1e-12),
so an all-zero row gives a finite result instead of NaN.

Shapes: ``N`` support samples, ``C`` classes, ``D`` feature dimension.

These functions do not validate their inputs, to stay as plain as the code they mirror: a label
outside 0..C-1 fails in PyTorch's own indexing (on CUDA, a device-side assert that ends the
process's CUDA context). For the same computation behind the package's checks, call the public
API with ``backend="reference"`` (``copa_fast.symmetric_ce``, ``copa_loss``, ``adapt``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12

# Published per-dataset presets of the episode loop: (lr, weight_decay).
DATASET_PRESETS = {
    "default": (1e-3, 0.1),
    "traffic_sign": (5e-3, 0.0),
    "mnist": (5e-3, 0.0),
}


def _scale(tau: Union[float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return tau.to(like.dtype).exp()
    return torch.full((), math.exp(tau), dtype=like.dtype, device=like.device)   # meta tensors too


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


def symmetric_ce(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    tau: Union[float, torch.Tensor] = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Published symmetric cross-entropy, N x N form.

    embeddings: (N, D); prototypes: (C, D); labels: (N,) int in 0..C-1.
    Logits ``A = exp(tau) * z E^T`` with ``E = q[labels]``; loss ½(CE(A, I) + CE(A^T, I)).
    reduction "none" gives the per-sample ½(row CE_i + column CE_i), whose mean is the loss.
    """
    z = F.normalize(embeddings, dim=-1, eps=NORM_EPS)
    q = F.normalize(prototypes, dim=-1, eps=NORM_EPS)
    expanded = q[labels]
    logits = _scale(tau, z) * z @ expanded.t()
    target = torch.arange(z.shape[0], device=z.device)
    row = F.cross_entropy(logits, target, reduction="none")
    col = F.cross_entropy(logits.t(), target, reduction="none")
    return _reduce(0.5 * (row + col), reduction)


def symmetric_ce_nxc(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    tau: Union[float, torch.Tensor] = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The same loss in its exact N x C form (DESIGN §2), eager PyTorch; never builds N x N.

    ``R_i = log sum_c n_c exp(S_ic)``, ``L_c = log sum_i exp(S_ic)``,
    per-sample loss ½(R_i + L_{y_i} - 2 S_{i,y_i}).
    """
    z = F.normalize(embeddings, dim=-1, eps=NORM_EPS)
    q = F.normalize(prototypes, dim=-1, eps=NORM_EPS)
    s = _scale(tau, z) * z @ q.t()  # (N, C)
    counts = torch.bincount(labels, minlength=q.shape[0]).to(s.dtype)
    row = torch.logsumexp(s + counts.log(), dim=1)
    col = torch.logsumexp(s, dim=0)
    target = s.gather(1, labels[:, None]).squeeze(1)
    return _reduce(0.5 * (row + col[labels] - 2 * target), reduction)


def fraction_correct(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``pred`` equal to ``labels`` as the ratio of two integers, so that every device
    gives the same float (a float32 mean on a GPU can differ in the last bit: 14/15 once read
    0.93333340 there and 0.93333334 on the CPU). NaN when there are no labels."""
    return count_ratio(pred.eq(labels).sum(), labels.numel())


def count_ratio(hits, n: int) -> float:
    """``hits`` (an int, or a number or tensor holding one) out of ``n``, as ``fraction_correct``
    forms it: the ratio of two integers; NaN for n = 0 (``hits`` is then not read)."""
    return int(hits) / n if n else float("nan")


def cosine_scores(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cosines of the rows of z against the rows of q ((M, D) x (C, D), or batched (E, M, D) x (E, C, D))."""
    return F.normalize(z, dim=-1, eps=NORM_EPS) @ F.normalize(q, dim=-1, eps=NORM_EPS).transpose(-1, -2)


def accuracy(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose most cosine-similar prototype is their label."""
    return fraction_correct(cosine_scores(embeddings, prototypes).argmax(dim=1), labels)


def symmetric_ce_with_stats(embeddings, prototypes, labels, tau=2.0):
    """Published return shape: ``(loss, {"loss": float, "acc": float})``."""
    loss = symmetric_ce(embeddings, prototypes, labels, tau)
    return loss, {"loss": loss.item(), "acc": accuracy(embeddings, prototypes, labels)}


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None):
    """Class means: (N, D) features, (N,) labels -> (C, D)."""
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    # (N, C); a comparison with arange rather than F.one_hot, which fixes C in a compiled graph
    onehot = (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(features.dtype)
    return (onehot.t() @ features) / onehot.sum(0)[:, None]


def copa_loss(features, labels, w_img, w_proto, tau=2.0, *, prototype_features=None, reduction="mean",
              num_classes=None):
    """Both adapters + published symmetric CE: prototypes are class means of prototype_features.

    num_classes (C) is read from the labels when not given.
    """
    pf = features if prototype_features is None else prototype_features
    z = features @ w_img.t()
    q = class_prototypes(pf, labels, num_classes) @ w_proto.t()
    return symmetric_ce(z, q, labels, tau, reduction=reduction)


_Loop = TypeVar("_Loop", bound=Callable[..., Any])


def _constant(v):
    """A tensor argument of an episode loop as the loop's constant: detached from the caller's
    graph, and an inference tensor (made under torch.inference_mode) copied into a plain one, which
    autograd can save; anything else as it is."""
    if not isinstance(v, torch.Tensor):
        return v
    v = v.detach()
    return v.clone() if v.is_inference() else v


def with_autograd(loop: _Loop) -> _Loop:
    """For the episode loops (``adapt`` and the baselines here, ``copa_fast.adapt`` and
    ``adapt_many``): each is a self-contained optimisation that hands back detached adapters and
    numbers, so it runs the same whatever the caller's autograd state.
    - It enables grad for itself: evaluation code often runs its episodes under
      ``torch.no_grad()`` or ``torch.inference_mode()`` (the backbone frozen); the caller's mode is
      back on return.
    - Its tensor arguments are constants: detached (features still attached to a backbone's graph
      would take the first step's gradient into the backbone and fail the second backward), and
      inference tensors copied into plain ones (autograd cannot save those).
    (adapt_many's batched path stacks its episodes into detached tensors of its own; its other
    path calls ``adapt``.)"""
    @functools.wraps(loop)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return loop(*(_constant(a) for a in args), **{k: _constant(v) for k, v in kwargs.items()})

    return cast(_Loop, run)


def adapted_scores(query: torch.Tensor, w_img: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(M, C) cosines of the adapted query rows (``query @ w_img.T``) to the adapted prototypes:
    what an episode's query accuracy takes its argmax of."""
    return cosine_scores(query.to(w_img.dtype) @ w_img.t(), prototypes.to(w_img.dtype))


def _tensor_summary(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "None"
    device = "" if t.device.type == "cpu" else f", {t.device}"
    return f"<{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}{device}>"


@dataclass(repr=False, eq=False)
class AdaptResult:
    """Outcome of one episode's adaptation.

    w_img, w_proto: (D, D) adapted maps; losses: one float per step (the loss at the start of
    that step); query_accuracy: None without a query set; prototypes: (C, D) the adapted class
    prototypes (the support's class means through the adapted prototype map), against which
    ``scores`` and ``predict`` classify new query rows — the very computation ``query_accuracy``
    counted.

    Results compare and hash by identity, as modules and tensors do: a field-by-field ``==`` would
    ask a tensor comparison for one truth value and raise (``result in results`` did), and left
    results unhashable. Compare the fields with torch.equal / torch.allclose.
    """

    w_img: torch.Tensor
    w_proto: torch.Tensor
    losses: list = field(default_factory=list)
    query_accuracy: Optional[float] = None
    prototypes: Optional[torch.Tensor] = None

    def __repr__(self) -> str:   # the matrices by shape: a printed result stays one line
        losses = f"[{len(self.losses)} steps: {self.losses[0]:.4g} -> {self.losses[-1]:.4g}]" if self.losses else "[]"
        return (f"AdaptResult(w_img={_tensor_summary(self.w_img)}, w_proto={_tensor_summary(self.w_proto)}, "
                f"losses={losses}, query_accuracy={self.query_accuracy!r}, "
                f"prototypes={_tensor_summary(self.prototypes)})")

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """(M, C) cosine similarities of the adapted rows of ``query`` (M, D) to the adapted
        prototypes (CoPA's logits are these times exp(tau)). ``query`` may be of any floating
        dtype (computed in the adapters' dtype) and must be on the adapters' device."""
        from . import _validate as V   # here, not at import: the oracle's module stays plain

        if self.prototypes is None:
            raise ValueError("prototypes: this AdaptResult holds no prototypes (made by hand?); "
                             "scores and predict need the adapted class prototypes")
        V.tensor("query", query, 2)
        V.same_device("query", query, "w_img", self.w_img)
        V.columns("query", query, self.w_img.shape[1], "w_img")
        V.finite("query", query)   # a NaN row would still be given a class
        with torch.no_grad():
            return adapted_scores(query, self.w_img, self.prototypes)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        """(M,) class index of each row of ``query`` (M, D): its most cosine-similar adapted
        prototype, as ``query_accuracy`` counts them."""
        return self.scores(query).argmax(dim=1)


# Results saved with torch.save load back with torch.load's default weights_only=True once copa_fast is
# imported: a result holds only tensors, floats, a list of floats and None, which that unpickler takes.
torch.serialization.add_safe_globals([AdaptResult])


@with_autograd
def adapt(support, support_labels, query=None, query_labels=None, *, steps=50, lr=1e-3,
          weight_decay=0.1, tau=2.0) -> AdaptResult:
    """The published CoPA episode loop.

    Identity init of both maps, ``torch.optim.Adam`` (coupled L2 weight decay), ``steps`` steps;
    prototypes are the class means of the raw support features, computed once. Query accuracy uses
    the adapted query features against the adapted prototypes.
    """
    d = support.shape[1]
    w_img = torch.eye(d, dtype=support.dtype, device=support.device, requires_grad=True)
    w_proto = torch.eye(d, dtype=support.dtype, device=support.device, requires_grad=True)
    protos = class_prototypes(support, support_labels)
    opt = torch.optim.Adam([w_img, w_proto], lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = symmetric_ce(support @ w_img.t(), protos @ w_proto.t(), support_labels, tau)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = None
    with torch.no_grad():
        adapted = protos @ w_proto.t()
        if query is not None:
            acc = fraction_correct(adapted_scores(query, w_img, adapted).argmax(dim=1), query_labels)
    return AdaptResult(w_img.detach(), w_proto.detach(), losses, acc, adapted)


@with_autograd
def adapt_pa(support, support_labels, query=None, query_labels=None, *, steps=40, lr=0.1,
             scale=10.0) -> AdaptResult:
    """URL's pre-classifier alignment baseline: ONE shared map, cosine x 10 logits against the
    class means of the transformed support, Adadelta lr 0.1, 40 steps.

    The result carries the shared map in both ``w_img`` and ``w_proto``.
    """
    d = support.shape[1]
    w = torch.eye(d, dtype=support.dtype, device=support.device, requires_grad=True)
    opt = torch.optim.Adadelta([w], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        z = support @ w.t()
        logits = scale * F.normalize(z, dim=-1, eps=NORM_EPS) @ F.normalize(
            class_prototypes(z, support_labels), dim=-1, eps=NORM_EPS).t()
        loss = F.cross_entropy(logits, support_labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = None
    with torch.no_grad():
        adapted = class_prototypes(support @ w.t(), support_labels)
        if query is not None:
            acc = fraction_correct(adapted_scores(query, w, adapted).argmax(dim=1), query_labels)
    return AdaptResult(w.detach(), w.detach(), losses, acc, adapted)


def ncc_accuracy(support, support_labels, query, query_labels) -> float:
    """Nearest-centroid (cosine) accuracy on raw features: no adaptation."""
    return accuracy(query, class_prototypes(support, support_labels), query_labels)
