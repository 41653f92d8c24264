"""Exact global CoPA loss over torch.distributed with O(C·D) communication.

Each rank passes its shard of the batch; the result equals the single-process loss on the
concatenation of all shards (classes may be absent from some ranks). The N x C form (DESIGN §2)
needs, across ranks, only the per-class counts, the per-class prototype-feature sums (C x D,
``copa_loss`` only) and the per-class column log-sum-exp statistics (a max and a sum per class) —
never an all-gather of the N x D features.

Gradient contract (as DDP's): every rank returns the global loss; each rank's backward yields
``world_size`` times its share of the gradient, so DDP's averaging all-reduce (or an explicit
``all_reduce(grad) / world_size``) gives exactly the single-process gradients. For a sharded
input (``features``, ``embeddings``) that is world_size times the true gradient of its rows —
which is what the backbone parameters need under DDP's averaging.

Collectives per call (``check_inputs=False``; the checks add one 5-value all-gather):
- ``symmetric_ce``: forward all-reduce of C counts and all-gather of 2C + 1 values per rank;
  backward none.
- ``copa_loss``: forward all-reduce of C x (D + 1) (class sums and counts) and all-gather of 2C + 1
  values per rank; backward all-reduce of C x (D + 1) only when the prototype features require
  gradients (a frozen backbone needs none).

The local arithmetic runs in PyTorch ops (float32, or float64 for float64 inputs) in the exact
N x C form, with exact per-class maxima (safe for any tau). ``adapt_many`` splits episodes over the
ranks and gathers the results on every rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import _validate as V
from .api import _adapt_checked, _check_episodes, _check_hparams, _episode_items
from .api import _tau_tensor as _api_tau_tensor
from .api import _working_dtype
from .reference import NORM_EPS

__all__ = ["symmetric_ce", "copa_loss", "adapt_many", "communication_volume", "CommLog"]


class CommLog:
    """Records the collectives this module issues while active: (op, bytes) per collective, where
    bytes is the all-reduced tensor's size or the all-gathered result's size (world x the input)."""

    enabled = False
    records: list = []

    def __enter__(self):
        CommLog.enabled, CommLog.records = True, []
        return self

    def __exit__(self, *exc):
        CommLog.enabled = False

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in CommLog.records)


def _log(op: str, t: torch.Tensor, copies: int = 1) -> None:
    if CommLog.enabled:
        CommLog.records.append((op, copies * t.numel() * t.element_size()))


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("copa_fast.distributed: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, group, op=None) -> torch.Tensor:
    _log("all_reduce", t)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(k,) per rank -> (world, k)."""
    world = dist.get_world_size(group)
    _log("all_gather", t, world)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _all_reduce(t.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.contiguous().clone(), ctx.group), None


def _normalize_backward(dy: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient through ``y = x / max(||x||, eps)`` (F.normalize), given y and ||x||."""
    big = norm > NORM_EPS
    inner = (y * dy).sum(1, keepdim=True)
    return torch.where(big, (dy - y * inner) / norm.clamp_min(NORM_EPS), dy / NORM_EPS)


class _GlobalSymCE(torch.autograd.Function):
    """Global symmetric CE of sharded rows ``z`` against replicated prototypes ``q``.

    ``counts`` (C,) are the global class counts (no gradient). Forward: one all-gather of the local
    column statistics and loss partial. Backward: local only (the W x share contract).
    """

    @staticmethod
    def forward(ctx, z, q, labels, tau_t, counts, group, world, mean):
        c = q.shape[0]
        zn_norm = z.norm(dim=1, keepdim=True)
        qn_norm = q.norm(dim=1, keepdim=True)
        zn = z / zn_norm.clamp_min(NORM_EPS)
        qn = q / qn_norm.clamp_min(NORM_EPS)
        s = tau_t.exp()
        scores = s * (zn @ qn.t())                                   # (n, C), |S| <= s
        present = counts > 0
        log_counts = torch.where(present, counts.log(), torch.full_like(counts, -math.inf))
        row_lse = torch.logsumexp(scores + log_counts, dim=1)       # R_i over the N expanded columns
        bad = (labels < 0) | (labels >= c)
        y = labels.long().clamp(0, c - 1)
        s_y = scores.gather(1, y[:, None]).squeeze(1)
        partial = (row_lse - 2 * s_y).masked_fill(bad, math.nan).sum()
        if scores.shape[0]:
            col_max = scores.amax(0)
            col_sum = (scores - col_max).exp().sum(0)
        else:  # an empty shard contributes nothing
            col_max = torch.full((c,), -math.inf, dtype=z.dtype, device=z.device)
            col_sum = torch.zeros(c, dtype=z.dtype, device=z.device)
        stats = _all_gather(torch.cat([col_max, col_sum, partial[None]]), group)  # (world, 2C + 1)
        gmax = stats[:, :c].amax(0)
        safe_max = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        rescaled = torch.where(stats[:, :c] > -math.inf, (stats[:, :c] - safe_max).exp(), 0.0)
        col_lse = safe_max + (stats[:, c:2 * c] * rescaled).sum(0).log()   # L_c, -inf for absent classes
        total = stats[:, 2 * c].sum() + torch.where(present, counts * col_lse, 0.0).sum()
        n_global = counts.sum()
        scale = 0.5 / n_global if mean else torch.full_like(n_global, 0.5)
        ctx.save_for_backward(zn, qn, zn_norm, qn_norm, scores, row_lse, col_lse, counts, y, bad, scale, s)
        ctx.world, ctx.tau_shape = world, tau_t.shape
        return total * scale

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():   # create_graph=True: the saved statistics carry no graph to the inputs
            raise RuntimeError("copa_fast.distributed: no second-order gradients (backward with create_graph=True); "
                               "copa_fast.copa_loss and copa_fast.symmetric_ce on one process have them")
        zn, qn, zn_norm, qn_norm, scores, row_lse, col_lse, counts, y, bad, scale, s = ctx.saved_tensors
        present = counts > 0
        row_p = counts * (scores - row_lse[:, None]).exp()
        col_p = torch.where(present, counts * (scores - torch.where(present, col_lse, 0.0)).exp(), 0.0)
        grad = row_p + col_p
        grad.scatter_add_(1, y[:, None], torch.full_like(row_lse[:, None], -2.0))
        grad = grad.masked_fill(bad[:, None], math.nan) * (g * scale * ctx.world)   # W x dloss/dS
        dz = dq = dtau = None
        if ctx.needs_input_grad[0]:
            dz = _normalize_backward(s * (grad @ qn), zn, zn_norm)
        if ctx.needs_input_grad[1]:
            dq = _normalize_backward(s * (grad.t() @ zn), qn, qn_norm)
        if ctx.needs_input_grad[3]:
            dtau = (grad * scores).sum().reshape(ctx.tau_shape)
        return dz, dq, None, dtau, None, None, None, None


# ----------------------------------------------------------------------------------------------
# validation: local checks first, then one small all-gather so that every rank raises together
# (a rank that raised alone would leave the others waiting in a collective forever)


def _shard_labels(name: str, y, n: int, ref: torch.Tensor, c: Optional[int], check: bool) -> int:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer class indices, got {type(y).__name__}")
    if y.dtype not in V.LABEL_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (one label per row), got {tuple(y.shape)}")
    V.same_device(name, y, "the features", ref)
    if not check or n == 0:
        return 0 if c is None else c
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0:
        raise ValueError(f"{name}: expected class indices >= 0, got {lo}")
    if c is not None and hi >= c:
        raise ValueError(f"{name}: expected class indices in 0..{c - 1}, got {hi}")
    return hi + 1 if c is None else c


def _agree(group, device, local_error: Optional[Exception], fields) -> torch.Tensor:
    """All-gathers (error flag, *fields) of every rank; raises on every rank if any rank failed."""
    rank = dist.get_rank(group)
    mine = torch.tensor([0.0 if local_error is None else 1.0, *fields], dtype=torch.float64, device=device)
    table = _all_gather(mine, group).cpu()
    if local_error is not None:
        raise local_error
    failed = (table[:, 0] > 0).nonzero().flatten().tolist()
    if failed:
        raise ValueError(f"copa_fast.distributed: invalid input on rank(s) {failed} (see the error raised there); "
                         f"rank {rank} stops too")
    return table[:, 1:]


def _same_everywhere(table_col: torch.Tensor, name: str, what: str, rel: float = 0.0) -> None:
    lo, hi = float(table_col.min()), float(table_col.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or abs(hi - lo) > rel * max(abs(hi), abs(lo)):
        raise ValueError(f"{name}: expected the same {what} on every rank, got values from {lo:g} to {hi:g}")


def _tau_value(tau) -> float:
    return float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)


def _check_global_counts(counts: torch.Tensor, name: str) -> None:
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name}: every class in 0..{counts.numel() - 1} needs at least one sample on some rank; "
                         f"class {int(empty[0])} has none on any rank ({empty.numel()} empty in all)")


def _working(t: torch.Tensor) -> torch.Tensor:
    return t.to(_working_dtype(t.dtype))   # float64 stays, everything else computes in float32


def _tau_tensor(tau, like: torch.Tensor) -> torch.Tensor:
    return _api_tau_tensor(tau, like).to(like.dtype)   # one dtype for the hand-written backward


def _check_reduction(reduction: str) -> bool:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum' (per-sample losses of a sharded batch are not "
                         f"supported), got {reduction!r}")
    return reduction == "mean"


def _local_class_sums(pf: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    """(n, D) rows -> (C, D + 1): per-class sums and counts (last column), deterministic."""
    y = labels.long()
    onehot = (y[None, :] == torch.arange(c, device=y.device)[:, None]).to(pf.dtype)   # bad labels: no class
    return torch.cat([onehot @ pf, onehot.sum(1, keepdim=True)], dim=1)


# ----------------------------------------------------------------------------------------------
# public functions


def symmetric_ce(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, tau=2.0, *,
                 reduction: str = "mean", group=None, check_inputs: bool = True) -> torch.Tensor:
    """Global symmetric CE of row-sharded ``embeddings`` (n_r, D) with labels (n_r,) against
    ``prototypes`` (C, D), which must be the same on every rank. Returns the global loss on every
    rank (reduction "mean" over all ranks' rows, or "sum"); gradients follow the module's W x share
    contract. A shard may be empty.
    """
    world = _world(group)
    mean = _check_reduction(reduction)
    check = check_inputs and not torch.compiler.is_compiling()
    err, fields = None, [0.0, 0.0, 0.0, 0.0]
    try:
        V.sce_inputs(embeddings, prototypes, allow_empty=True)
        c = prototypes.shape[0]
        _shard_labels("labels", labels, embeddings.shape[0], embeddings, c, check)
        V.tau(tau, check_values=check)
        if check:
            if embeddings.shape[0]:
                V.finite("embeddings", embeddings)
            V.finite("prototypes", prototypes)
            fields = [c, embeddings.shape[1], _tau_value(tau), float(prototypes.double().sum())]
    except (TypeError, ValueError) as exc:
        if not check:
            raise
        err = exc
    if check:
        table = _agree(group, embeddings.device if isinstance(embeddings, torch.Tensor) else "cpu", err, fields)
        _same_everywhere(table[:, 0], "prototypes", "number of classes (rows)")
        _same_everywhere(table[:, 1], "embeddings", "number of columns D")
        _same_everywhere(table[:, 2], "tau", "value")
        _same_everywhere(table[:, 3], "prototypes", "values (their sum differs)", rel=1e-5)
    z, q = _working(embeddings), _working(prototypes)
    c = q.shape[0]
    y = labels.long()
    counts = (y[None, :] == torch.arange(c, device=y.device)[:, None]).to(z.dtype).sum(1)
    counts = _all_reduce(counts, group)
    if check:
        _check_global_counts(counts, "labels")
    loss = _GlobalSymCE.apply(z, q, labels, _tau_tensor(tau, z), counts, group, world, mean)
    return loss.to(embeddings.dtype)


def copa_loss(features: torch.Tensor, labels: torch.Tensor, w_img: torch.Tensor, w_proto: torch.Tensor, tau=2.0,
              *, prototype_features: Optional[torch.Tensor] = None, reduction: str = "mean",
              num_classes: Optional[int] = None, group=None, check_inputs: bool = True) -> torch.Tensor:
    """Global CoPA loss of a row-sharded batch: ``features`` (n_r, D), ``labels`` (n_r,), the
    replicated adapters ``w_img``, ``w_proto`` (E, D), ``prototype_features`` (n_r, D, default
    ``features``) whose global class means are the prototypes. Equals
    ``copa_fast.copa_loss`` on the concatenation of all shards; gradients follow the module's
    W x share contract. ``num_classes`` is read from the labels of all ranks when not given
    (required with ``check_inputs=False``).
    """
    world = _world(group)
    mean = _check_reduction(reduction)
    check = check_inputs and not torch.compiler.is_compiling()
    if not check and num_classes is None:
        raise ValueError("num_classes: required with check_inputs=False or under torch.compile")
    err, fields = None, [0.0, 0.0, 0.0, 0.0]
    pf = features if prototype_features is None else prototype_features
    try:
        pf = V.copa_inputs(features, prototype_features, w_img, w_proto, allow_empty=True)
        n, d = features.shape
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        c_local = _shard_labels("labels", labels, n, features, num_classes, check)
        V.tau(tau, check_values=check)
        if check:
            if n:
                V.finite("features", features)
                if prototype_features is not None:
                    V.finite("prototype_features", pf)
            fields = [c_local, d, _tau_value(tau), float(w_img.double().sum() + w_proto.double().sum())]
    except (TypeError, ValueError) as exc:
        if not check:
            raise
        err = exc
    c: int = num_classes if num_classes is not None else 0   # read from every rank's labels below
    if check:
        table = _agree(group, features.device if isinstance(features, torch.Tensor) else "cpu", err, fields)
        _same_everywhere(table[:, 1], "features", "number of columns D")
        _same_everywhere(table[:, 2], "tau", "value")
        _same_everywhere(table[:, 3], "w_img, w_proto", "values (their sum differs)", rel=1e-5)
        if num_classes is None:
            c = int(table[:, 0].max())
            if c < 1:
                raise ValueError("labels: no rank holds any sample")
        else:
            _same_everywhere(table[:, 0], "num_classes", "value")
    x, pw = _working(features), _working(pf)
    wi, wp = _working(w_img), _working(w_proto)
    packed = _AllReduceSum.apply(_local_class_sums(pw, labels, c), group)     # (C, D + 1), global
    counts = packed[:, -1].detach()
    if check:
        _check_global_counts(counts, "labels")
    protos = packed[:, :-1] / counts.clamp_min(1)[:, None]
    loss = _GlobalSymCE.apply(x @ wi.t(), protos @ wp.t(), labels, _tau_tensor(tau, x), counts, group, world, mean)
    return loss.to(features.dtype)


def communication_volume(n: int, c: int, d: int, world_size: int, *, dtype_bytes: int = 4,
                         prototype_grads: bool = True, check_inputs: bool = False) -> dict:
    """Bytes per rank per training step (forward + backward) of ``copa_loss``, counted as CommLog
    counts them, for this design and for the all-gather design (every rank gathers the N x D
    features and labels, and its backward all-reduces the N x D feature gradient).

    n is the global batch size; ``prototype_grads`` says whether the prototype features require
    gradients (a trained backbone); ``check_inputs`` adds the 5-value float64 agreement gather.
    """
    ours = c * (d + 1) * dtype_bytes + world_size * (2 * c + 1) * dtype_bytes
    if prototype_grads:
        ours += c * (d + 1) * dtype_bytes
    if check_inputs:
        ours += world_size * 5 * 8
    gather = n * d * dtype_bytes + n * 8 + n * d * dtype_bytes
    return {"copa_fast": ours, "all_gather": gather}


def shard_indices(count: int, group=None) -> list:
    """The episode indices this rank handles: round-robin over the ranks (k % world == rank)."""
    world = _world(group)
    return list(range(dist.get_rank(group), count, world))


def adapt_many(episodes, *, steps: int = 50, lr: float = 1e-3, weight_decay: float = 0.1, tau: float = 2.0,
               backend: Optional[str] = None, group=None, dst: int = 0):
    """``copa_fast.adapt_many`` split over the ranks: rank r adapts episodes r, r + W, ...; the
    results (AdaptResult with CPU tensors) are gathered on rank ``dst`` in episode order, equal to a
    single-process run. Every rank must pass the same episode list. Returns the full list on
    ``dst`` and None elsewhere.
    """
    episodes = list(episodes)
    mine = shard_indices(len(episodes), group)
    # this rank's episodes checked first (the list's form and shared D on every rank, the data of its
    # own share), and every rank told: one bad episode makes every rank raise here, rather than leave
    # the others waiting in the gather below; the checked episodes are then adapted as adapt_many
    # adapts them, without checking them again
    err, parts, classes = None, [], []
    try:
        _check_hparams(steps, lr, weight_decay, tau)
        items = _episode_items(episodes)
        parts = [items[k] for k in mine]
        classes = _check_episodes(zip(mine, parts, strict=True))
    except (TypeError, ValueError) as exc:
        err = exc
    nccl = dist.get_backend(group) == "nccl"   # its collectives take CUDA tensors only; a rank may hold no episode
    _agree(group, torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu", err, [])
    local = _adapt_checked(parts, classes, steps=steps, lr=lr, weight_decay=weight_decay, tau=tau,
                           backend=backend) if parts else []
    payload = [(k, type(r)(r.w_img.cpu(), r.w_proto.cpu(), r.losses, r.query_accuracy,
                           None if r.prototypes is None else r.prototypes.cpu()))
               for k, r in zip(mine, local, strict=True)]
    return _gather_ordered(payload, len(episodes), group, dst)


def _gather_ordered(payload: list, count: int, group, dst: int):
    """Gathers (index, item) pairs of every rank on ``dst``; returns the items in index order there."""
    rank = dist.get_rank(group)
    parts: Optional[list] = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(payload, parts, dst=dst, group=group)
    if parts is None:   # not dst
        return None
    out = [None] * count
    for part in parts:
        for k, item in part:
            out[k] = item
    return out
