"""Public API of copa_fast: the symmetric CE, the CoPA loss, the head module and the episode loop.

Shapes: N samples, C classes, D input feature dimension, E adapted dimension (E = D for the
published square maps). Every function validates its inputs first (DESIGN §5); pass
``check_inputs=False`` to skip the checks that read the data (needed for CUDA-graph capture;
they are skipped automatically while torch.compile traces, and cannot read a tensor batched by
torch.vmap).

Derivatives: the kernels form the gradient during the forward; a backward with
create_graph=True, calls under torch.func transforms and forward-mode AD use the differentiable
composite of ``ops/composite.py`` instead, so higher derivatives are those of the loss on every
backend.

Precision: float32 and float64 inputs are computed in their own precision; float16 and bfloat16
inputs are computed in float32 and the result is returned in the input dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from . import _validate as V
from . import backends as _backends
from . import reference
from ._transfer import to_device as _to_device
from .ops import composite as _composite
from .ops import symmetric_ce as _ops
from .reference import AdaptResult

Tau = Union[float, torch.Tensor]


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _composite_only(*tensors) -> bool:
    """True where only differentiable ops will do (ops/composite.py): under torch.func transforms,
    and for forward-mode AD (a dual tensor among the inputs), which the kernels' autograd lacks."""
    if _functorch_active():
        return True
    if getattr(torch.autograd.forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _check_values(check_inputs: bool) -> bool:
    return check_inputs and not torch.compiler.is_compiling()


@contextlib.contextmanager
def _readable_values():
    """The value checks read the data; inside torch.vmap a batched tensor cannot be read: say so."""
    try:
        yield
    except RuntimeError as e:
        # a batched tensor read: item() names vmap, tolist() the missing storage
        if _functorch_active() and ("vmap" in str(e) or "have storage" in str(e)):
            raise ValueError("check_inputs: the input checks read the data, which torch.vmap cannot do for a "
                             "batched tensor; pass check_inputs=False (and num_classes to copa_loss)") from e
        raise


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TAU_TENSORS: dict = {}   # (value, dtype, device) -> a 0-d tensor holding a float tau; read-only
_TAU_TENSORS_MAX = 64


def _tau_tensor(tau: Tau, like: torch.Tensor) -> torch.Tensor:
    """tau as the 0-d tensor the ops take. A float tau's tensor is made once per (value, dtype,
    device) and reused (the ops only read it): no allocation — on CUDA no fill launch — per call.
    Not kept where only a fresh one is right: under torch.compile's tracing or a dispatch mode (fake
    tensors), inside a torch.func transform (factories make wrapped tensors there), in inference
    mode (an inference tensor cannot be saved for a later backward), and while a CUDA stream is
    being captured (a tensor made there is filled only when the graph replays)."""
    if isinstance(tau, torch.Tensor):
        return tau.reshape(()).to(device=like.device)
    value, device = float(tau), like.device
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return torch.full((), value, dtype=like.dtype, device=device)
    key = (value, like.dtype, device)
    t = _TAU_TENSORS.get(key)
    if t is not None:
        return t
    t = torch.full((), value, dtype=like.dtype, device=device)
    if (not torch.is_inference_mode_enabled() and not _functorch_active() and type(t) is torch.Tensor
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        if len(_TAU_TENSORS) >= _TAU_TENSORS_MAX:
            _TAU_TENSORS.clear()
        _TAU_TENSORS[key] = t
    return t


# precision -> the backends that take it (None: every backend)
_PRECISION_BACKENDS = {"ieee": None, "tf32": ("triton", "cuda"), "tf32x3": ("triton",)}
PRECISIONS = tuple(_PRECISION_BACKENDS)


def _check_precision(precision, backend: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    takers = _PRECISION_BACKENDS[precision]
    if takers is not None and backend not in takers:
        names = " and ".join(takers) + (" backends" if len(takers) > 1 else " backend")
        raise ValueError(f"precision: {precision!r} is a tensor-core mode of the {names}; backend {backend!r} "
                         f"computes in IEEE float32/float64 (use precision='ieee')")


def _sce_core(z, q, labels, tau: Tau, reduction: str, backend: str, precision: str = "ieee"):
    """Runs a validated problem on a kernel backend; returns (loss or per-sample losses, pred)."""
    work = _working_dtype(z.dtype)
    zw, qw = z.to(work), q.to(work)
    tau_t = _tau_tensor(tau, zw)
    if _composite_only(zw, qw, tau_t):   # torch.func, forward AD: differentiable ops, not the kernels
        with torch.no_grad():
            pred = _cosine_predict(zw, qw)
        return reference._reduce(_composite.sce_losses(zw, qw, labels, tau_t), reduction).to(z.dtype), pred
    op = _ops.triton_call() if backend == "triton" else _ops.cpp_op()
    weights = torch.ones(z.shape[0], dtype=work, device=z.device) if reduction == "sum" else None
    needs_grad = torch.is_grad_enabled() and (zw.requires_grad or qw.requires_grad or tau_t.requires_grad)
    loss, losses, pred, _, _, _ = op(zw, qw, labels, tau_t, weights, needs_grad and reduction != "none", precision)
    out = losses if reduction == "none" else loss
    return out.to(z.dtype), pred


def _check_sce(embeddings, prototypes, labels, tau, reduction, check_inputs):
    V.sce_inputs(embeddings, prototypes)
    n, c = embeddings.shape[0], prototypes.shape[0]
    V.label_tensor("labels", labels, n, embeddings, c)
    V.tau(tau, check_values=False)
    V.reduction(reduction)
    if _check_values(check_inputs):
        with _readable_values():
            V.values("labels", labels, n, embeddings, c, tau,
                     [("embeddings", embeddings), ("prototypes", prototypes)])


_STEP_DTYPES = (torch.float32, torch.float64)


def _plain_sce(embeddings, prototypes, labels, tau: float, backend, check_inputs):
    """symmetric_ce's plain call in one frame, as ``_plain_step`` for copa_loss: the loss when
    float32/float64 tensors pass every check of the full path, tau is a float, the reduction the
    mean and the products IEEE, on a kernel backend; else None, and the full path runs."""
    tensor = torch.Tensor
    if not (isinstance(embeddings, tensor) and isinstance(prototypes, tensor) and isinstance(labels, tensor)):
        return None
    dtype, device = embeddings.dtype, embeddings.device
    if not (dtype in _STEP_DTYPES and prototypes.dtype == dtype and labels.dtype in V.LABEL_DTYPES
            and embeddings.dim() == 2 and prototypes.dim() == 2 and labels.dim() == 1
            and embeddings.shape[0] > 0 and prototypes.shape[0] > 0
            and 0 < embeddings.shape[1] == prototypes.shape[1] and labels.shape[0] == embeddings.shape[0]
            and prototypes.device == device and labels.device == device and -math.inf < tau <= 80.0):
        return None
    try:
        b = _backends.resolve(backend, device)
    except ValueError:
        return None       # raised by the full path, after the value checks (its order)
    # _composite_only, inline: under torch.func transforms or forward-mode AD the full path runs
    if b == "reference" or _functorch_active() or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return None
    if check_inputs:
        with _readable_values():
            V.values("labels", labels, embeddings.shape[0], embeddings, prototypes.shape[0], tau,
                     [("embeddings", embeddings), ("prototypes", prototypes)])
    tau_t = None if torch._C._len_torch_dispatch_stack() else _TAU_TENSORS.get((tau, dtype, device))
    if tau_t is None:
        tau_t = _tau_tensor(tau, embeddings)
    needs_grad = torch.is_grad_enabled() and (embeddings.requires_grad or prototypes.requires_grad)
    op = _ops.triton_call() if b == "triton" else _ops.cpp_op()
    return op(embeddings, prototypes, labels, tau_t, None, needs_grad, "ieee")[0]


def symmetric_ce(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, tau: Tau = 2.0,
                 *, reduction: str = "mean", backend: Optional[str] = None,
                 check_inputs: bool = True, precision: str = "ieee") -> torch.Tensor:
    """CoPA's symmetric cross-entropy; drop-in for the published helper's loss.

    embeddings: (N, D) image embeddings; prototypes: (C, D) class prototypes (not expanded);
    labels: (N,) int64/int32 in 0..C-1, every class present; tau: float or 1-element tensor, the
    logit scale is exp(tau). Both sides are L2-normalised (eps 1e-12). Returns a 0-d loss
    (reduction "mean" or "sum") or (N,) per-sample losses ("none") whose mean is the loss.
    Differentiable w.r.t. embeddings, prototypes and a tensor tau. ``precision="tf32"`` (float32)
    lets products run on TF32 tensor cores: every dot product of the triton kernels; on cuda, the
    cuBLAS products of large problems (from 2^22 scores; its fused kernel for smaller ones computes
    IEEE products at either precision). ``precision="tf32x3"`` (triton) runs each dot product as
    three TF32 products, float32-grade. See the README for the error bounds.
    """
    if reduction == "mean" and precision == "ieee" and type(tau) is float and not torch.compiler.is_compiling():
        loss = _plain_sce(embeddings, prototypes, labels, tau, backend, check_inputs)
        if loss is not None:
            return loss
    _check_sce(embeddings, prototypes, labels, tau, reduction, check_inputs)
    b = _backends.resolve(backend, embeddings.device)
    _check_precision(precision, b)
    if b == "reference":
        return reference.symmetric_ce(embeddings, prototypes, labels, tau, reduction=reduction)
    return _sce_core(embeddings, prototypes, labels, tau, reduction, b, precision)[0]


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
    return loss, {"loss": loss.item(), "acc": reference.fraction_correct(pred, labels)}


def _plain_step(features, labels, w_img, w_proto, tau: float, num_classes, backend, check_inputs):
    """copa_loss's training-step call in one frame: the loss when the call is the plain form —
    float32/float64 tensors that pass every check of copa_loss's full path, a float tau, the mean,
    IEEE products, a backend with the one-op step (cpu, cuda, triton) — else None, and the full
    path runs (it checks in its order and raises what it finds; a call taken here could not fail
    there). Why: in a training step the API runs after the step's GEMMs have evicted the
    interpreter's state, where every Python frame costs several times its tight-loop time; the full
    path's dozen helper calls took ~75 us of a ~2.8 ms CPU step at N = 500 (benchmarks/NOTES.md)."""
    tensor = torch.Tensor
    if not (isinstance(features, tensor) and isinstance(labels, tensor) and isinstance(w_img, tensor)
            and isinstance(w_proto, tensor)):
        return None
    dtype, device, shape = features.dtype, features.device, w_img.shape
    if not (dtype in _STEP_DTYPES and w_img.dtype == dtype and w_proto.dtype == dtype
            and labels.dtype in V.LABEL_DTYPES and features.dim() == 2 and labels.dim() == 1
            and len(shape) == 2 and w_proto.shape == shape and shape[0] > 0 and features.shape[0] > 0
            and 0 < features.shape[1] == shape[1] and labels.shape[0] == features.shape[0]
            and w_img.device == device and w_proto.device == device and labels.device == device
            and -math.inf < tau <= 80.0):
        return None
    if num_classes is None:
        if not check_inputs:
            return None   # the full path says that it is required
    elif type(num_classes) is not int or num_classes < 1:
        return None
    try:
        b = _backends.resolve(backend, device)
    except ValueError:
        return None       # raised by the full path, after the value checks (its order)
    step = _ops.copa_op() if b in ("cpu", "cuda") else _ops.triton_step_op() if b == "triton" else None
    # _composite_only, inline: under torch.func transforms or forward-mode AD the full path runs
    if step is None or _functorch_active() or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return None
    if check_inputs:
        with _readable_values():
            num_classes = V.values("labels", labels, features.shape[0], features, num_classes, tau,
                                   [("features", features)])
    # _tau_tensor's cache, read inline where it applies (no dispatch mode; not compiling, above)
    tau_t = None if torch._C._len_torch_dispatch_stack() else _TAU_TENSORS.get((tau, dtype, device))
    if tau_t is None:
        tau_t = _tau_tensor(tau, features)
    needs_grad = torch.is_grad_enabled() and (features.requires_grad or w_img.requires_grad
                                              or w_proto.requires_grad)
    return step(features, labels, w_img, w_proto, features, num_classes, tau_t, None, needs_grad, "ieee")[0]


def copa_loss(features: torch.Tensor, labels: torch.Tensor, w_img: torch.Tensor, w_proto: torch.Tensor,
              tau: Tau = 2.0, *, prototype_features: Optional[torch.Tensor] = None, reduction: str = "mean",
              num_classes: Optional[int] = None, backend: Optional[str] = None,
              check_inputs: bool = True, precision: str = "ieee") -> torch.Tensor:
    """Both CoPA adapters + symmetric CE.

    features: (N, D); labels: (N,) in 0..C-1, every class present; w_img, w_proto: (E, D) maps
    (E = D, identity-initialised, in the published method); prototype_features: (N, D) rows whose
    class means are the prototypes (default: ``features``). ``Z = features @ w_img.T``,
    ``Q = class_means(prototype_features) @ w_proto.T``, loss = symmetric_ce(Z, Q, labels, tau).
    Differentiable w.r.t. every tensor input (through the class means too) and a tensor tau.
    ``num_classes`` (C) is read from the labels when not given; it is required with
    ``check_inputs=False``, and under torch.compile reading it is a graph break (an error with
    ``fullgraph=True``): pass it to trace the step as one graph. ``precision="tf32"`` as in ``symmetric_ce``
    (the adapter GEMMs follow torch's own TF32 setting).
    """
    if (prototype_features is None and reduction == "mean" and precision == "ieee" and type(tau) is float
            and not torch.compiler.is_compiling()):
        loss = _plain_step(features, labels, w_img, w_proto, tau, num_classes, backend, check_inputs)
        if loss is not None:
            return loss
    pf = V.copa_inputs(features, prototype_features, w_img, w_proto)
    n = features.shape[0]
    check = _check_values(check_inputs)
    if num_classes is None and not check_inputs:
        raise ValueError("num_classes: required with check_inputs=False (reading it from the labels would "
                         "synchronise)")
    V.label_tensor("labels", labels, n, features, num_classes)
    V.tau(tau, check_values=False)
    V.reduction(reduction)
    finite = [("features", features)] + ([("prototype_features", pf)] if prototype_features is not None else [])
    if check:
        with _readable_values():
            c = V.values("labels", labels, n, features, num_classes, tau, finite)
    elif num_classes is None:   # traced by torch.compile: C and the checks at a graph break, as in eager
        from . import _graph_break
        c = _graph_break.values("labels", labels, n, features, num_classes, tau, finite)
    else:
        assert num_classes is not None   # required above without the checks
        c = int(num_classes)
    b = _backends.resolve(backend, features.device)
    _check_precision(precision, b)
    if b == "reference":   # in the features' dtype, as the other backends (adapters of another dtype cast)
        wi, wp = (w if w.dtype == features.dtype else w.to(features.dtype) for w in (w_img, w_proto))
        return reference.copa_loss(features, labels, wi, wp, tau, prototype_features=prototype_features,
                                   reduction=reduction, num_classes=c)
    work = _working_dtype(features.dtype)
    x, wi, wp, pfw = (t if t.dtype == work else t.to(work) for t in (features, w_img, w_proto, pf))
    if _composite_only(x, wi, wp, pfw, tau if isinstance(tau, torch.Tensor) else None):
        # torch.func, forward AD: differentiable ops (ops/composite.py), not the kernels
        losses = _composite.copa_losses(x, labels, wi, wp, pfw, c, _tau_tensor(tau, x))
        return reference._reduce(losses, reduction).to(features.dtype)
    step = (_ops.copa_op() if b in ("cpu", "cuda") else _ops.triton_step_op()) if reduction != "none" else None
    if step is not None:   # the whole step, gradients included, in one op call with a C++ autograd
        tau_t = _tau_tensor(tau, x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or wi.requires_grad or wp.requires_grad
                                                  or pfw.requires_grad or tau_t.requires_grad)
        weights = torch.ones(x.shape[0], dtype=work, device=x.device) if reduction == "sum" else None
        out = step(x, labels, wi, wp, pfw, c, tau_t, weights, needs_grad, precision)
        return out[0] if out[0].dtype == features.dtype else out[0].to(features.dtype)
    p0 = _composite.class_means(pfw, labels, c)
    return _sce_core(x @ wi.t(), p0 @ wp.t(), labels, tau, reduction, b, precision)[0].to(features.dtype)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None, *,
                check_inputs: bool = True) -> torch.Tensor:
    """(C, D) means of the rows of ``features`` (N, D) by ``labels`` (N,) in 0..C-1: CoPA's
    prototypes before their adapter. Differentiable w.r.t. features; deterministic on every device.

    ``num_classes`` (C) is read from the labels when not given; it is required with
    ``check_inputs=False``, and under torch.compile reading it is a graph break. The checks want
    every label in 0..C-1 and every class present. Without them a label outside 0..C-1 makes the
    whole result NaN (never an out-of-bounds read) and a class with no row gets zeros.
    """
    V.tensor("features", features, 2)
    n = features.shape[0]
    check = _check_values(check_inputs)
    if check_inputs and not check and num_classes is None:
        # traced by torch.compile: C and the checks at a graph break, as in eager
        from . import _graph_break
        c = _graph_break.labels("labels", labels, n, features, num_classes)
    else:   # unchecked, V.labels wants num_classes and returns it
        with _readable_values():
            c = V.labels("labels", labels, n, features, num_classes, check_values=check)
    means = _composite.class_means(features, labels, c)
    if check:
        return means
    y = labels.long()   # unchecked: a label out of range poisons the result, read on the device only
    return means + torch.where(((y < 0) | (y >= c)).any(), math.nan, 0.0).to(means.dtype)


def _cosine_predict(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return reference.cosine_scores(z, q).argmax(dim=-1)


class CoPAHead(nn.Module):
    """The two CoPA adapters as a module: ``w_img``, ``w_proto`` (dim, dim), identity-initialised.

    ``forward(features, labels)`` returns the CoPA loss; ``predict(query, support, support_labels)``
    returns (M,) class indices of the query rows (cosine to the adapted support class means).
    ``tau``: a float or a one-element tensor, whose value the head copies (a tensor that requires
    grad, another head's learned tau for one, is read without a warning and stays the caller's);
    ``learn_tau=True`` makes the head's tau a parameter of its own.
    """

    def __init__(self, dim: int, tau: float = 2.0, *, learn_tau: bool = False, backend: Optional[str] = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        V.tau(tau, check_values=True)
        self.w_img = nn.Parameter(torch.eye(dim))
        self.w_proto = nn.Parameter(torch.eye(dim))
        tau_v = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
        self.tau = nn.Parameter(torch.tensor(tau_v)) if learn_tau else tau_v
        self.backend = backend

    def extra_repr(self) -> str:
        tau = "learned" if isinstance(self.tau, nn.Parameter) else repr(self.tau)
        return f"dim={self.w_img.shape[0]}, tau={tau}, backend={self.backend!r}"

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
            V.columns(name, t, self.w_img.shape[1], "w_img")
        V.label_tensor("support_labels", support_labels, support.shape[0], support, None)
        # the data checks in one read (NaN rows would still give predictions, silently wrong)
        c = V.values("support_labels", support_labels, support.shape[0], support, None, None,
                     [("support", support), ("query", query)])
        w_img, w_proto = self.w_img.to(query.dtype), self.w_proto.to(support.dtype)
        protos = _composite.class_means(support, support_labels, c) @ w_proto.t()
        return _cosine_predict(query @ w_img.t(), protos.to(query.dtype))


def _check_episode(support, support_labels, query, query_labels):
    """One episode's checks, its form (``_check_episode_form``) then its data; returns its number
    of classes."""
    _check_episode_form(support, support_labels, query, query_labels)
    c = V.labels("support_labels", support_labels, support.shape[0], support, None, check_values=True)
    V.finite("support", support)
    if query is not None:
        V.finite("query", query)   # a NaN row's cosines would still give a prediction, counted in the accuracy
        lo, hi = (int(v) for v in torch.aminmax(query_labels))
        if lo < 0 or hi >= c:
            raise ValueError(f"query_labels: expected class indices in 0..{c - 1} (the support's classes), "
                             f"got {lo}..{hi}")
    return c


def _check_episode_form(support, support_labels, query, query_labels) -> None:
    """``_check_episode``'s checks that read no data: types, ranks, shapes, devices."""
    V.tensor("support", support, 2)
    V.label_tensor("support_labels", support_labels, support.shape[0], support, None)
    if (query is None) != (query_labels is None):
        raise ValueError("query, query_labels: give both or neither")
    if query is not None:
        V.tensor("query", query, 2)
        V.same_device("query", query, "support", support)
        V.columns("query", query, support.shape[1], "support")
        V.label_tensor("query_labels", query_labels, query.shape[0], query, None)


def _episode_classes(items: list) -> Optional[list]:
    """Each episode's number of classes when every check of ``_check_episode`` passes on every
    episode of ``items``, with the data read once for them all (``V.episodes_values``), else None:
    the caller then runs ``_check_episode`` one episode at a time, which raises what fails, in order."""
    try:
        for parts in items:
            _check_episode_form(*parts)
    except (TypeError, ValueError):
        return None
    if any(p[0].device != items[0][0].device for p in items):
        return None
    return V.episodes_values(items)


def _check_episodes(indexed) -> list:
    """Checks (index, (support, support_labels, query, query_labels)) pairs; returns each episode's
    number of classes. All at once when they pass (``_episode_classes``), else one at a time in
    order: an error names the first bad episode, ``episodes[index]: ...``, as ``adapt`` words it."""
    indexed = list(indexed)
    classes = _episode_classes([parts for _, parts in indexed]) if indexed else []
    if classes is not None:
        return classes
    classes = []
    for k, parts in indexed:
        try:
            classes.append(_check_episode(*parts))
        except (TypeError, ValueError) as e:
            raise type(e)(f"episodes[{k}]: {e}") from None
    return classes


def _check_hparams(steps, lr, weight_decay, tau):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
            raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
    V.tau(tau, check_values=True)


@reference.with_autograd
def adapt(support: torch.Tensor, support_labels: torch.Tensor, query: Optional[torch.Tensor] = None,
          query_labels: Optional[torch.Tensor] = None, *, steps: int = 50, lr: float = 1e-3,
          weight_decay: float = 0.1, tau: float = 2.0, backend: Optional[str] = None) -> AdaptResult:
    """CoPA adaptation of one episode, as the published loop.

    support: (N, D), support_labels: (N,) in 0..C-1 (every class present), query: (M, D),
    query_labels: (M,). Identity init of both maps, Adam with coupled weight decay (on CPU and CUDA
    tensors the update of ``torch.optim.Adam(fused=True)``, bit for bit), ``steps`` steps;
    prototypes are the class means of the raw support, computed once. Returns AdaptResult(w_img,
    w_proto, losses (one per step), query_accuracy or None). Float16 / bfloat16 features are adapted
    in float32 on every backend (the adapters come back in float32).
    """
    parts = (support, support_labels, query, query_labels)
    c = (_episode_classes([parts]) or [_check_episode(*parts)])[0]
    _check_hparams(steps, lr, weight_decay, tau)
    return _adapt_one(support, support_labels, query, query_labels, c, steps=steps, lr=lr,
                      weight_decay=weight_decay, tau=tau, backend=_backends.resolve(backend, support.device))


def _adapt_one(support, support_labels, query, query_labels, c: int, *, steps: int, lr: float,
               weight_decay: float, tau: float, backend: str) -> AdaptResult:
    """``adapt``'s work on an episode that passed ``_check_episode`` (``c``: its number of classes),
    hyper-parameters that passed ``_check_hparams`` and a resolved ``backend`` (called under
    ``with_autograd``, by ``adapt`` and by adapt_many's per-episode path)."""
    b = backend
    work = _working_dtype(support.dtype)
    if b == "reference":   # in the working dtype too: Adam on float16 adapters divides by an eps that underflows
        return reference.adapt(support.to(work), support_labels, None if query is None else query.to(work),
                               query_labels, steps=steps, lr=lr, weight_decay=weight_decay, tau=tau)
    x = support.to(work)
    d = x.shape[1]
    step_op = _ops.copa_op() if b in ("cpu", "cuda") else _ops.triton_step_op()
    w_img = torch.eye(d, dtype=work, device=x.device, requires_grad=step_op is None)
    w_proto = torch.eye(d, dtype=work, device=x.device, requires_grad=step_op is None)
    protos = _composite.class_means(x, support_labels, c)
    opt = _adam([w_img, w_proto], lr, weight_decay)
    losses = []
    if step_op is not None:
        # The whole step is one op (the raw support's class means are its prototypes), which returns
        # the loss's gradients w.r.t. the adapted rows; the adapters' gradients are then one GEMM each,
        # the very calls of the op's backward (dz^T x, dq^T p0), without the autograd engine.
        # The gradients are written into the same two buffers every step: a fresh D x D pair a step
        # (1 MiB each at D = 512) made the CPU allocator map and fault in new pages, step after step.
        tau_t = _tau_tensor(tau, x)
        w_img.grad, w_proto.grad = torch.empty_like(w_img), torch.empty_like(w_proto)
        with torch.no_grad():
            for _ in range(steps):
                loss, _, _, dz, dq, p0, _ = step_op(x, support_labels, w_img, w_proto, x, c, tau_t, None, True)
                torch.mm(dz.t(), x, out=w_img.grad)
                torch.mm(dq.t(), p0, out=w_proto.grad)
                opt.step()
                losses.append(loss)
    else:   # no C++ extension: the adapters and the symmetric-CE op as separate calls, through autograd
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = _sce_core(x @ w_img.t(), protos @ w_proto.t(), support_labels, tau, "mean", b)[0]
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    with torch.no_grad():
        adapted = protos @ w_proto.t()
        read = [torch.stack(losses).double()] if losses else []
        if query is not None and query_labels is not None:   # the correct predictions, read with the losses
            pred = reference.adapted_scores(query, w_img, adapted).argmax(dim=1)
            read.append(pred.eq(query_labels).sum().double().reshape(1))
        values = torch.cat(read).tolist() if read else []   # one read-back (one synchronisation on a GPU)
    acc = None
    if query is not None and query_labels is not None:
        acc = reference.count_ratio(values.pop(), query_labels.numel())
    return AdaptResult(w_img.detach(), w_proto.detach(), values, acc, adapted)


class _FusedAdam:
    """The published optimizer's update as ``torch.optim.Adam(params, lr, weight_decay=wd,
    fused=True)`` makes it (coupled L2 weight decay, betas (0.9, 0.999), eps 1e-8, no amsgrad):
    the same two calls a step (the step counts' increment, then ``torch._fused_adam_``) on the
    same state (zero moments, float32 step counts), so the same bits — without the optimizer's
    Python around them (grouping by device and dtype, state lookups, hooks): ~100 us of a step on
    the project's CPU machine, where the update itself takes ~170 us at D = 512."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = list(params)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):   # never in this module's loops: each step reaches both maps
            raise RuntimeError("adapt: a step left an adapter without a gradient")
        with torch.no_grad():
            torch._foreach_add_(self.steps, 1)
            torch._fused_adam_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, lr=self.lr,
                               beta1=0.9, beta2=0.999, weight_decay=self.weight_decay, eps=1e-8, amsgrad=False,
                               maximize=False, grad_scale=None, found_inf=None)


def _adam(params, lr: float, weight_decay: float):
    """The published optimizer (Adam, coupled weight decay) in torch's fused form where it has one
    (CPU and CUDA tensors): one pass over each matrix and its moments instead of ~8 (the stacked
    adapters of adapt_many are 2 x E x D x D: 0.3 G values for 600 episodes at D = 512), called
    directly (``_FusedAdam``); ``torch.optim.Adam`` elsewhere."""
    if hasattr(torch, "_fused_adam_") and all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_ADAM_DTYPES
                                              for p in params):
        return _FusedAdam(params, lr, weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


_FUSED_ADAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def adapt_many(episodes, *, steps: int = 50, lr: float = 1e-3, weight_decay: float = 0.1, tau: float = 2.0,
               backend: Optional[str] = None, group_size: int = 128) -> list:
    """CoPA adaptation of a list of ragged episodes: ``(support, support_labels, query, query_labels)``
    tuples (or ``copa_fast.episodes.Episode``), different N and C per episode, D shared. An
    episode's query and query_labels may both be None: its result then has no query_accuracy, and
    its ``predict`` classifies query rows later.

    Returns one AdaptResult per episode, equal to ``adapt`` on that episode (adapters within fp32
    rounding, the same accuracies). With the ``cuda`` or ``triton`` backend (on CUDA tensors the default
    is ``cuda`` where it is built, else ``triton``) the episodes are adapted together: per step, two
    batched GEMMs forward, ONE kernel launch for the symmetric CE and its gradient of every episode,
    two batched GEMMs for the adapters' gradients and one Adam update of the stacked adapters;
    nothing is read back to the host until the end. Episodes are grouped
    by size (at most ``group_size`` per group) to bound padding and memory. Other backends run
    the episodes one after another through ``adapt``.
    """
    items = _episode_items(episodes)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if not items:
        return []
    _check_hparams(steps, lr, weight_decay, tau)
    b = _backends.resolve(backend, items[0][0].device, batched=True)
    # every episode checked before any is adapted: a bad one fails fast, named by its index
    classes = _check_episodes(enumerate(items))
    return _adapt_checked(items, classes, steps=steps, lr=lr, weight_decay=weight_decay, tau=tau, backend=b,
                          group_size=group_size)


def _episode_items(episodes) -> list:
    """Each episode as its (support, support_labels, query, query_labels) tuple, the supports of
    one shared D (read from the shapes alone); an error names the episode by its index."""
    if isinstance(episodes, torch.Tensor) or (isinstance(episodes, tuple) and episodes
                                               and isinstance(episodes[0], torch.Tensor)):
        raise TypeError("episodes: expected a list of (support, support_labels, query, query_labels) tuples, "
                        f"got a {type(episodes).__name__} of tensors (for one episode pass [episode] or use adapt)")
    items = []
    for k, ep in enumerate(episodes):
        if isinstance(ep, torch.Tensor):
            raise TypeError(f"episodes[{k}]: expected a (support, support_labels, query, query_labels) tuple, "
                            "got a Tensor")
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
    return items


@reference.with_autograd
def _adapt_checked(items: list, classes: list, *, steps: int, lr: float, weight_decay: float, tau: float,
                   backend: Optional[str], group_size: int = 128) -> list:
    """adapt_many's work on episodes that passed ``_check_episodes`` (``classes``: each one's C) and
    hyper-parameters that passed ``_check_hparams``: batched on triton / cuda, else ``adapt`` each."""
    device = items[0][0].device
    b = _backends.resolve(backend, device, batched=True)
    batched = (b in ("triton", "cuda") and all(p[0].device == device and p[0].dtype == items[0][0].dtype for p in items)
               and items[0][0].dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if not batched:   # each episode as adapt runs it, without checking it a second time
        return [_adapt_one(sup, lab, qry, qlab, c, steps=steps, lr=lr, weight_decay=weight_decay, tau=tau, backend=b)
                for (sup, lab, qry, qlab), c in zip(items, classes, strict=True)]
    order = sorted(range(len(items)), key=lambda k: -items[k][0].shape[0])   # similar sizes share a group
    groups = [order[g0:g0 + group_size] for g0 in range(0, len(order), group_size)]
    # every group queued before anything is read: the host sets up the next group while the device
    # runs the previous one, and the losses and query counts of all groups come back in ONE read
    runs = [_adapt_group([items[k] for k in group], [classes[k] for k in group], steps, lr, weight_decay, tau,
                         _ops.episodes_call(b)) for group in groups]
    read = torch.cat([t.reshape(-1).double() for run in runs for t in (run.losses, run.hits)]).tolist()
    out: list = [None] * len(items)
    at = 0
    for group, run in zip(groups, runs, strict=True):
        e = len(group)
        loss_rows = [read[at + k * steps:at + (k + 1) * steps] for k in range(e)]
        at += e * steps
        hits = dict(zip(run.with_query, read[at:at + len(run.with_query)], strict=True))
        at += len(run.with_query)
        for j, k in enumerate(group):
            query, query_labels = items[k][2], items[k][3]
            acc = None   # an empty query set has no hits read: NaN
            if query is not None:
                acc = reference.count_ratio(hits.get(j, 0), query_labels.numel())
            out[k] = AdaptResult(run.w_img[j], run.w_proto[j], loss_rows[j], acc, run.prototypes[j])
    return out


class _GroupRun(NamedTuple):
    """One group's adaptation as queued on the device, nothing read back: each episode's adapters
    and adapted prototypes (tensors of their own), the losses (E, steps), and the correct query
    predictions (hits) of the episodes listed in with_query (their indices in the group)."""
    w_img: list
    w_proto: list
    prototypes: list
    losses: torch.Tensor
    with_query: list
    hits: torch.Tensor


def _padded(parts: list, width: int, dtype: torch.dtype, fill=0) -> torch.Tensor:
    """(E, width, ...) of ``dtype``: part k in slot k's first rows, ``fill`` after them. One
    multi-tensor copy into the slots (a few launches on CUDA whatever E; pad_sequence copies part by
    part: ~2,400 launches a call of adapt_many on 600 episodes)."""
    out = parts[0].new_full((len(parts), width, *parts[0].shape[1:]), fill, dtype=dtype)
    torch._foreach_copy_([out[k, :p.shape[0]] for k, p in enumerate(parts)], parts)
    return out


def _own_copies(views: list) -> list:
    """A tensor with storage of its own for each of ``views`` (slices of a group's stacked
    tensors: a view would keep, and torch.save would write, the whole stack): one multi-tensor
    copy (a few launches on CUDA) instead of a clone each."""
    outs = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views]
    torch._foreach_copy_(outs, views)
    return outs


def _group_query_hits(items, class_counts, adapted, w_img, work) -> tuple:
    """(with_query, hits): the group's episodes with a query set (indices) and their correct query
    predictions (cosine to the adapted class means ``adapted``, as ``adapt``), on the device."""
    with_query = [k for k, p in enumerate(items) if p[2] is not None and p[3].numel()]
    dev = adapted.device
    if not with_query:
        return with_query, torch.zeros(0, dtype=torch.int64, device=dev)
    if len(with_query) < len(items):   # the episodes with a query set picked out
        sel = _to_device(torch.tensor(with_query), dev)
        w_img, adapted, class_counts = w_img[sel], adapted[sel], class_counts[sel]
    m = max(items[k][2].shape[0] for k in with_query)
    zq = torch.bmm(_padded([items[k][2] for k in with_query], m, work), w_img.transpose(1, 2))
    scores = reference.cosine_scores(zq, adapted)   # (E', M, C): classes past an episode's own masked off
    absent = torch.arange(adapted.shape[1], device=dev)[None, :] >= class_counts[:, None]
    pred = scores.masked_fill(absent[:, None, :], -math.inf).argmax(2)
    labels = _padded([items[k][3] for k in with_query], m, torch.int64, fill=-1)
    return with_query, pred.eq(labels).sum(1)


def _adapt_group(items, classes, steps, lr, weight_decay, tau, op) -> _GroupRun:
    """The batched engine: episodes padded to the group's largest N and C, adapters stacked (E, D, D).
    Queues the group's work and returns it (``_GroupRun``) without reading anything back."""
    x0 = items[0][0]
    dev, work = x0.device, _working_dtype(x0.dtype)
    e, d = len(items), x0.shape[1]
    ns = [p[0].shape[0] for p in items]
    n_max, c_max = max(ns), max(classes)
    rows, cls, s_off, s_total = _ops.episode_layout(ns, classes, dev, row_stride=n_max, class_stride=c_max)
    # the group stacked in a few ops whatever its size (a loop over the episodes made ~5 small ops an
    # episode): rows padded with zeros, labels with -1 (no class), class means as a one-hot batched
    # GEMM (deterministic on every device)
    x = _padded([p[0].detach() for p in items], n_max, work)   # constants of the loop (with_autograd)
    y_pad = _padded([p[1] for p in items], n_max, torch.int64, fill=-1)
    onehot = (y_pad[:, None, :] == torch.arange(c_max, device=dev)[None, :, None]).to(work)   # (E, C, N)
    protos = torch.bmm(onehot, x) / onehot.sum(2).clamp_min(1)[:, :, None]   # a class with no row: 0
    y = y_pad.clamp_min(0)   # padding rows belong to no episode (rows below): their label is never read
    tau_t = torch.full((e,), float(tau), dtype=work, device=dev)
    eye = torch.eye(d, dtype=work, device=dev)
    w_img, w_proto = eye.repeat(e, 1, 1), eye.repeat(e, 1, 1)
    opt = _adam([w_img, w_proto], lr, weight_decay)
    losses = []
    y_flat = y.reshape(-1)
    with torch.no_grad():
        # No autograd: the op returns each episode's gradients w.r.t. its adapted rows (dz, dq; zero on
        # padding), and the adapters' gradients are one batched GEMM each, as the step's backward forms
        # them (dz^T x), into the same two stacked buffers every step (as adapt's): no graph, no engine,
        # no scaling by a grad_output of ones, no fresh gradient tensors.
        w_img.grad, w_proto.grad = torch.empty_like(w_img), torch.empty_like(w_proto)
        for _ in range(steps):
            z = torch.bmm(x, w_img.transpose(1, 2)).reshape(e * n_max, d)
            q = torch.bmm(protos, w_proto.transpose(1, 2)).reshape(e * c_max, d)
            loss, _, _, dz, dq, _ = op(z, q, y_flat, rows, cls, s_off, s_total, tau_t, True)
            torch.bmm(dz.view(e, n_max, d).transpose(1, 2), x, out=w_img.grad)
            torch.bmm(dq.view(e, c_max, d).transpose(1, 2), protos, out=w_proto.grad)
            opt.step()
            losses.append(loss)
        adapted = torch.bmm(protos, w_proto.transpose(1, 2))   # (E, C, D): each episode's adapted prototypes
        with_query, hits = _group_query_hits(items, cls[:, 1], adapted, w_img, work)
        copies = _own_copies([*w_img.unbind(0), *w_proto.unbind(0), *(adapted[k, :classes[k]] for k in range(e))])
    return _GroupRun(copies[:e], copies[e:2 * e], copies[2 * e:],
                     torch.stack(losses, 1) if losses else adapted.new_zeros(e, 0), with_query, hits)
