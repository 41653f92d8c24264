"""Input validation of the public API (DESIGN §5): runs before any kernel, raises ValueError or
TypeError whose message names the argument, what was expected and what was received.

Checks that need the data (label range, empty classes, finiteness) synchronise with the device;
``check_inputs=False`` skips them (for CUDA-graph capture). The kernels stay memory-safe then: a
label outside 0..C-1 yields NaN, never an out-of-bounds access.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _extension
from ._transfer import to_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)   # what every kernel reads; uint8 would index as a mask
REDUCTIONS = ("mean", "sum", "none")


def tensor(name: str, t, rank: int, *, dtypes=FLOAT_DTYPES, what="floating") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected a {what} tensor ({', '.join(str(d) for d in dtypes)}), got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor, got shape {tuple(t.shape)}")
    if rank and t.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(t.shape)}")
    if rank == 2 and t.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one column, got shape {tuple(t.shape)}")


def rows_tensor(name: str, t) -> None:
    """A (rows, D) floating tensor, D >= 1, where zero rows are allowed (a shard of a batch)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-D tensor (rows, D) with D >= 1, got shape {tuple(t.shape)}")


def sce_inputs(embeddings, prototypes, *, allow_empty: bool = False) -> None:
    """Checks symmetric_ce's (N, D) embeddings and (C, D) prototypes."""
    if allow_empty:
        rows_tensor("embeddings", embeddings)
    else:
        tensor("embeddings", embeddings, 2)
    tensor("prototypes", prototypes, 2)
    same_dtype("prototypes", prototypes, "embeddings", embeddings)
    same_device("prototypes", prototypes, "embeddings", embeddings)
    columns("prototypes", prototypes, embeddings.shape[1], "embeddings")


def columns(name: str, t: torch.Tensor, d: int, ref_name: str) -> None:
    """A 2-D ``t`` with the ``d`` columns of ``ref_name``."""
    if t.shape[1] != d:
        raise ValueError(f"{name}: expected {d} columns (as {ref_name}), got shape {tuple(t.shape)}")


def copa_inputs(features, prototype_features, w_img, w_proto, *, allow_empty: bool = False):
    """Checks copa_loss's tensors (not the labels); returns the prototype rows (default: features)."""
    if allow_empty:
        rows_tensor("features", features)
    else:
        tensor("features", features, 2)
    d = features.shape[1]
    pf = features if prototype_features is None else prototype_features
    if prototype_features is not None:
        if allow_empty:
            rows_tensor("prototype_features", pf)
        else:
            tensor("prototype_features", pf, 2)
        same_dtype("prototype_features", pf, "features", features)
        same_device("prototype_features", pf, "features", features)
        if pf.shape != features.shape:
            raise ValueError(f"prototype_features: expected shape {tuple(features.shape)} (as features, "
                             f"same labels), got {tuple(pf.shape)}")
    for name, w in (("w_img", w_img), ("w_proto", w_proto)):
        tensor(name, w, 2)
        same_device(name, w, "features", features)
        if w.shape[1] != d:
            raise ValueError(f"{name}: expected shape (E, {d}) to map {d}-dim features, got {tuple(w.shape)}")
    if w_proto.shape != w_img.shape:
        raise ValueError(f"w_proto: expected shape {tuple(w_img.shape)} (as w_img), got {tuple(w_proto.shape)}")
    return pf


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (as {ref_name}), got {t.device}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {t.dtype}")


def finite(name: str, t: torch.Tensor) -> None:
    # min and max propagate NaN and expose +-Inf: one pass, no N x D temporary.
    lo, hi = torch.aminmax(t.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def label_tensor(name: str, y, n: int, ref: torch.Tensor, num_classes: int | None) -> None:
    """(N,) integer labels on ``ref``'s device, and ``num_classes`` a positive int when given: no
    data read."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer class indices, got {type(y).__name__}")
    if y.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (one label per row), got {tuple(y.shape)}")
    same_device(name, y, "the features", ref)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")


def labels(name: str, y, n: int, ref: torch.Tensor, num_classes: int | None, *, check_values: bool) -> int:
    """Validates (N,) integer labels; returns the number of classes C (max label + 1 when not given).

    With ``check_values`` every label must lie in 0..C-1 and every class must have a sample.
    """
    label_tensor(name, y, n, ref, num_classes)
    if not check_values:
        if num_classes is None:
            raise ValueError("num_classes: required when check_inputs=False (it cannot be read from the "
                             "labels without a device synchronisation)")
        return int(num_classes)
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0:
        raise ValueError(f"{name}: expected class indices >= 0, got {lo}")
    c = hi + 1 if num_classes is None else int(num_classes)
    if hi >= c:
        raise ValueError(f"{name}: expected class indices in 0..{c - 1}, got {hi}")
    if c <= n:
        empty = (torch.bincount(y.long(), minlength=c) == 0).nonzero().flatten()
        first, n_empty = (int(empty[0]), empty.numel()) if empty.numel() else (None, 0)
    else:   # more classes than rows: some are empty, found without c bins (raw ids such as 10**12 make c huge)
        present = torch.unique(y).tolist()   # sorted, all in 0..c-1
        first = next((i for i, v in enumerate(present) if v != i), len(present))
        n_empty = c - len(present)
    if n_empty:
        raise ValueError(f"{name}: every class in 0..{c - 1} needs at least one sample; "
                         f"class {first} has none ({n_empty} empty in all); labels are class "
                         f"indices 0..C-1: remap others with torch.unique(labels, return_inverse=True)[1]")
    return c


def values(name: str, y: torch.Tensor, n: int, ref: torch.Tensor, num_classes: int | None, tau_arg,
           tensors: list) -> int:
    """Every value check of one call — labels in 0..C-1 with every class present, a tensor tau
    finite and at most 80, each (name, tensor) of ``tensors`` finite — formed on the device and
    read back in ONE transfer (one synchronisation on a GPU instead of one or two per check);
    returns C. When any fails, the checks run one by one, in the API's order, and raise what they
    find. The types and shapes are checked before (``label_tensor``, ``tau``); ``tau_arg`` None:
    no tau to check."""
    c = _values_pass(y, n, num_classes, tau_arg, [t for _, t in tensors])
    if c is not None:
        return c
    c = labels(name, y, n, ref, num_classes, check_values=True)
    if tau_arg is not None:
        tau(tau_arg, check_values=True)
    for tname, t in tensors:
        finite(tname, t)
    return c   # not reached unless the one-read form and the detailed checks disagree


def _values_pass(y: torch.Tensor, n: int, num_classes: int | None, tau_arg, tensors: list) -> int | None:
    """C when every value check passes, else None: one call of the extension's value_summary op
    where it runs (CPU, CUDA: a few launches and one copy back), else a handful of small ops and one
    device-to-host read."""
    yd = y.detach()
    k = n if num_classes is None else int(num_classes)   # with every class present, max label < N
    if k > n:
        return None   # more classes than rows: some are empty (and k bins could be far too many to make)
    if any(t.device != yd.device for t in tensors):
        return None   # read where each lies, one by one
    tau_here = isinstance(tau_arg, torch.Tensor) and tau_arg.device == yd.device
    if isinstance(tau_arg, torch.Tensor) and not tau_here and not -math.inf < float(tau_arg.detach()) <= 80.0:
        return None   # on another device (a CPU scalar beside CUDA labels): read there
    if _summary_applies(yd, tensors):
        lo_v, hi_v, present_v, bad, tau_v = torch.ops.copa_fast.value_summary(
            yd, k, tensors, tau_arg.detach() if tau_here else None)
        rest = [tau_v] if tau_here else []
        counted_ok = bad == 0   # NaN / Inf entries of the tensors, counted there
    else:
        lo_v, hi_v, present_v, rest = _values_by_ops(yd, k, tau_arg if tau_here else None, tensors)
        counted_ok = True       # the tensors' min and max are in `rest`
    c = int(hi_v) + 1 if num_classes is None else k
    ok = lo_v >= 0 and hi_v < k and present_v == c and counted_ok and all(math.isfinite(v) for v in rest)
    return c if ok and not (tau_here and rest[-1] > 80.0) else None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _summary_applies(yd: torch.Tensor, tensors: list) -> bool:
    """The one-call form: plain tensors (no torch.func wrapper, no subclass) on a device with its kernel."""
    return (_extension.value_summary_on(yd.device.type) and type(yd) is torch.Tensor
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) in _PLAIN and t.dtype in FLOAT_DTYPES for t in tensors))


def _values_by_ops(yd: torch.Tensor, k: int, tau_t, tensors: list):
    """[min label, max label, distinct labels in [0, k)] and the values that must be finite (each
    tensor's min and max, then tau), from small ops and one read."""
    lo, hi = torch.aminmax(yd)
    # distinct labels among 0..k-1, in unit bins (a label k lands in the last one: hi >= k rejects it)
    present = torch.histc(yd.double(), bins=k, min=0, max=k).count_nonzero()
    parts = [lo.double(), hi, present]   # float64: labels exact to 2^53, NaN and +-Inf kept
    for t in tensors:
        parts.extend(torch.aminmax(t.detach()))
    if tau_t is not None:
        parts.append(tau_t.detach().reshape(()))
    lo_v, hi_v, present_v, *rest = torch.stack(parts).tolist()
    return lo_v, hi_v, present_v, rest


def finite_flags(tensors: list, *, multi_tensor: bool) -> torch.Tensor:
    """Boolean flags, all True iff every entry of ``tensors`` (one dtype, non-empty) is finite.
    ``multi_tensor`` (for CUDA): two foreach norms, a few multi-tensor launches for the lot instead
    of a reduction a tensor — an Inf entry makes the max-norm Inf (a max never overflows); a NaN entry
    makes the 2-norm NaN (a sum of squares propagates NaN in any order and is never NaN otherwise:
    finite squares that overflow give +Inf, allowed here), whether or not the max-norm's reduction,
    made of comparisons, keeps the NaN. Else one aminmax a tensor (finite iff its min and max are),
    which on a CPU, with no launch to save, is ~13x faster than the max-norm."""
    if multi_tensor:
        return torch.cat([torch.stack(torch._foreach_norm(tensors, math.inf)).isfinite(),
                          ~torch.stack(torch._foreach_norm(tensors, 2)).isnan()])
    return torch.stack([m for t in tensors for m in torch.aminmax(t)]).isfinite()


def episodes_values(items: list) -> list[int] | None:
    """Each episode's C (its largest support label + 1) when, in every (support, support_labels,
    query or None, query_labels or None) of ``items`` (one device; types, shapes and devices
    checked): the support labels are 0..C-1 with every class present, the features are finite and
    the query labels lie in 0..C-1; else None. Formed on the device for all the episodes together —
    a few operators over the concatenated labels, the features' finiteness (``finite_flags``) —
    and read back in ONE transfer, after one copy of the episodes' sizes to the device: checked one
    by one, each episode took ~35 operators and 9 reads (5,400 synchronisations for 600 episodes on
    a GPU)."""
    dev = items[0][0].device
    e = len(items)
    ns = [p[1].shape[0] for p in items]
    with_q = [k for k, p in enumerate(items) if p[3] is not None]
    offs = [0] * e
    for k in range(1, e):
        offs[k] = offs[k - 1] + ns[k - 1]
    meta = to_device(torch.tensor(ns + offs + with_q + [items[k][3].shape[0] for k in with_q], dtype=torch.int64), dev)
    n_t, off_t, qk_t, qn_t = meta.split([e, e, len(with_q), len(with_q)])
    y = torch.cat([p[1] for p in items]).long()
    total = y.shape[0]
    ep = torch.repeat_interleave(torch.arange(e, device=dev), n_t, output_size=total)
    hi = torch.zeros(e, dtype=torch.int64, device=dev).scatter_reduce_(0, ep, y, "amax", include_self=False)
    # distinct labels among each episode's 0..N-1: presence bins laid out as its rows (a label
    # outside them lands in an end bin; the minimum and the count below then reject it), counted
    # by a prefix sum (integer: exact, deterministic)
    key = off_t.index_select(0, ep) + torch.minimum(y.clamp_min(0), n_t.index_select(0, ep) - 1)
    seen = torch.zeros(total, dtype=torch.int64, device=dev).index_fill_(0, key, 1)
    upto = torch.nn.functional.pad(seen.cumsum(0), (1, 0))
    distinct = upto.index_select(0, off_t + n_t) - upto.index_select(0, off_t)
    ok = [(y.min() >= 0).reshape(1), distinct == hi + 1]
    if with_q:
        qy = torch.cat([items[k][3] for k in with_q]).long()
        qep = torch.repeat_interleave(qk_t, qn_t, output_size=qy.shape[0])
        ok += [(qy.min() >= 0).reshape(1), qy <= hi.index_select(0, qep)]
    by_dtype: dict = {}
    for p in items:
        for t in (p[0], p[2]):
            if t is not None and t.numel():
                by_dtype.setdefault(t.dtype, []).append(t.detach())
    ok += [finite_flags(v, multi_tensor=dev.type == "cuda") for v in by_dtype.values()]
    out = torch.cat([hi.double(), torch.cat(ok).all().double().reshape(1)]).tolist()
    return [int(h) + 1 for h in out[:-1]] if out[-1] == 1.0 else None


def tau(t, *, check_values: bool) -> None:
    if isinstance(t, bool):
        raise TypeError("tau: expected a float or a 1-element floating tensor, got bool")
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise TypeError(f"tau: expected a floating tensor, got {t.dtype}")
        if t.numel() != 1:
            raise ValueError(f"tau: expected one element, got shape {tuple(t.shape)}")
        if check_values:
            _tau_value(float(t.detach()))
        return
    if not isinstance(t, numbers.Real):
        raise TypeError(f"tau: expected a float or a 1-element floating tensor, got {type(t).__name__}")
    _tau_value(float(t))


def _tau_value(v: float) -> None:
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) Dynamo puts math.isfinite of
    # even a constant float into the graph and refuses it; NaN fails both comparisons.
    if not -math.inf < v < math.inf:
        raise ValueError(f"tau: expected a finite value, got {v}")
    if v > 80.0:
        raise ValueError(f"tau: expected at most 80 (exp(tau) overflows float32 beyond ~88), got {v}")


def reduction(r) -> None:
    if r not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {r!r}")
