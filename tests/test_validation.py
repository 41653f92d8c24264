"""Bad input (DESIGN §5): every case raises ValueError/TypeError naming the argument, before any
kernel runs; with validation off, a bad label yields NaN, never an out-of-bounds access."""

import math
import os

import numpy as np
import pytest
import torch

import copa_fast
from conftest import (DEVICES, assert_rel, backend_device_pairs, count_tolist_reads, empty_class_problem,
                      finiteness_check_form, make_episode)

PAIRS = backend_device_pairs()


def _good(device="cpu"):
    x, y = make_episode(20, 4, 8, seed=0, device=device)
    p = torch.randn(4, 8, device=device)
    return x, p, y


def _cases():
    x, p, y = _good()
    nan_x = x.clone()
    nan_x[3, 2] = float("nan")
    inf_p = p.clone()
    inf_p[1, 0] = float("inf")
    return [
        ("embeddings", TypeError, dict(embeddings=x.numpy())),
        ("embeddings", TypeError, dict(embeddings=x.long())),
        ("embeddings", ValueError, dict(embeddings=x[0])),
        ("embeddings", ValueError, dict(embeddings=x[:0])),
        ("embeddings", ValueError, dict(embeddings=nan_x)),
        ("prototypes", ValueError, dict(prototypes=p[:, :5])),
        ("prototypes", TypeError, dict(prototypes=p.double())),
        ("prototypes", ValueError, dict(prototypes=inf_p)),
        ("labels", TypeError, dict(labels=y.float())),
        ("labels", TypeError, dict(labels=[0, 1])),
        ("labels", TypeError, dict(labels=y.to(torch.uint8))),   # would index as a mask in PyTorch
        ("labels", TypeError, dict(labels=y.to(torch.int16))),
        ("labels", ValueError, dict(labels=y[:-1])),
        ("labels", ValueError, dict(labels=y.clone().fill_(0).index_fill_(0, torch.tensor([0]), -1))),
        ("labels", ValueError, dict(labels=torch.where(y == 3, 7, y))),
        ("labels", ValueError, dict(labels=torch.where(y == 2, 1, y))),  # class 2 has no sample
        ("tau", ValueError, dict(tau=float("nan"))),
        ("tau", ValueError, dict(tau=float("inf"))),
        ("tau", ValueError, dict(tau=torch.tensor(float("nan")))),
        ("tau", TypeError, dict(tau="2")),
        ("tau", ValueError, dict(tau=torch.tensor([1.0, 2.0]))),
        ("reduction", ValueError, dict(reduction="avg")),
        ("backend", ValueError, dict(backend="tpu")),
    ]


# the Python validation runs first whatever the backend: the reference and the default one
ENTRY_BACKENDS = pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "default"])


@ENTRY_BACKENDS
@pytest.mark.parametrize("arg,exc,override", _cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_symmetric_ce_bad_input(arg, exc, override, backend):
    x, p, y = _good()
    kwargs = dict(embeddings=x, prototypes=p, labels=y, tau=2.0, backend=backend)
    kwargs.update(override)
    with pytest.raises(exc, match=arg):
        copa_fast.symmetric_ce(**kwargs)


@pytest.mark.parametrize("arg,exc,override", [
    ("w_img", ValueError, dict(w_img=torch.eye(7))),
    ("w_proto", ValueError, dict(w_proto=torch.eye(8)[:4])),
    ("w_img", TypeError, dict(w_img=torch.eye(8, dtype=torch.int64))),
    ("prototype_features", ValueError, dict(prototype_features=torch.randn(19, 8))),
    ("features", ValueError, dict(features=torch.randn(20, 8, 1))),
    ("labels", ValueError, dict(labels=torch.full((20,), 5))),
    ("labels", TypeError, dict(labels=torch.arange(20).to(torch.uint8) % 4)),
    ("num_classes", ValueError, dict(check_inputs=False)),
    ("num_classes", ValueError, dict(num_classes=0)),
    ("labels", ValueError, dict(labels=torch.arange(20) % 4 - 1)),                     # a negative label
    ("labels", ValueError, dict(labels=torch.arange(20) % 4 * (torch.arange(20) % 4 != 2))),   # class 2 empty
    ("labels", ValueError, dict(num_classes=5)),                                      # class 4 empty
    ("labels", ValueError, dict(labels=torch.where(torch.arange(20) == 7, 25, torch.arange(20) % 4))),  # >= N
    # raw class ids: C read as the largest label + 1 would be 10**12 or 2**63 bins (an allocator error
    # or an overflow before, instead of the empty classes named)
    ("labels: every class .* class 4 has none", ValueError,
     dict(labels=torch.where(torch.arange(20) == 7, 10**12, torch.arange(20) % 4))),
    ("labels: every class", ValueError, dict(labels=torch.where(torch.arange(20) == 7, 2**63 - 1, torch.arange(20) % 4))),
    ("labels: every class .* class 4 has none", ValueError, dict(num_classes=10**15)),
    ("features", ValueError, dict(features=torch.randn(20, 8).index_fill_(0, torch.tensor([5]), float("nan")))),
    ("prototype_features", ValueError,
     dict(prototype_features=torch.randn(20, 8).index_fill_(1, torch.tensor([2]), -float("inf")))),
    ("tau", ValueError, dict(tau=torch.tensor(81.0))),
    ("tau", ValueError, dict(tau=torch.tensor(float("nan")))),
])
@ENTRY_BACKENDS
def test_copa_loss_bad_input(arg, exc, override, backend):
    x, _, y = _good()
    kwargs = dict(features=x, labels=y, w_img=torch.eye(8), w_proto=torch.eye(8), backend=backend)
    kwargs.update(override)
    with pytest.raises(exc, match=arg):
        copa_fast.copa_loss(**kwargs)


def _plain_call_cases():
    x, _, y = _good()
    eye = torch.eye(8)
    bad_label = torch.where(torch.arange(20) == 7, 25, torch.arange(20) % 4)
    plain = [   # (id, overrides, whether the one-frame path takes the call)
        ("float32", dict(), True),
        ("float64", dict(features=x.double(), w_img=eye.double(), w_proto=eye.double()), True),
        ("unchecked", dict(check_inputs=False, num_classes=4), True),
        ("int32-labels", dict(labels=y.int()), True),
        ("parameters", dict(w_img=torch.nn.Parameter(eye.clone()), w_proto=torch.nn.Parameter(eye.clone())), True),
        ("strided-features", dict(features=torch.randn(8, 20).t()), True),
        ("backend-cpu", dict(backend="cpu"), True),
        ("negative-tau", dict(tau=-1.5), True),
        ("tau-80", dict(tau=80.0), True),
        ("wide-maps", dict(w_img=torch.randn(11, 8), w_proto=torch.randn(11, 8)), True),
        # what the full path alone takes: each answered as it answers it
        ("int-tau", dict(tau=2), False),
        ("tensor-tau", dict(tau=torch.tensor(2.0)), False),
        ("float64-maps", dict(w_img=eye.double(), w_proto=eye.double()), False),
        ("float16", dict(features=x.half()), False),
        ("sum", dict(reduction="sum"), False),
        ("prototype-features", dict(prototype_features=torch.randn(20, 8)), False),
        ("reference", dict(backend="reference"), False),
        ("numpy-int-classes", dict(num_classes=np.int64(4)), False),
        # bad input: the same error from either path
        ("tau-81", dict(tau=81.0), False),
        ("tau-nan", dict(tau=float("nan")), False),
        ("tau-inf", dict(tau=-float("inf")), False),
        ("classes-bool", dict(num_classes=True), False),
        ("classes-0", dict(num_classes=0), False),
        ("classes-unchecked", dict(check_inputs=False), False),
        ("labels-short", dict(labels=y[:-1]), False),
        ("labels-float", dict(labels=y.float()), False),
        ("labels-2d", dict(labels=y[:, None]), False),
        ("labels-value", dict(labels=bad_label), True),   # the value checks, inside the one-frame path
        ("labels-unchecked", dict(labels=bad_label, check_inputs=False, num_classes=4), True),   # NaN
        ("empty-class", dict(num_classes=5), True),
        ("features-empty", dict(features=x[:0], labels=y[:0]), False),
        ("features-3d", dict(features=x[:, :, None]), False),
        ("features-nan", dict(features=x.clone().index_fill_(0, torch.tensor([5]), float("nan"))), True),
        ("maps-columns", dict(w_img=torch.eye(7)), False),
        ("maps-differ", dict(w_proto=torch.eye(8)[:4]), False),
        ("maps-no-rows", dict(w_img=eye[:0], w_proto=eye[:0]), False),
        ("maps-int", dict(w_img=eye.long()), False),
        ("backend-unknown", dict(backend="tpu"), False),
    ]
    if "triton" in copa_fast.available_backends():   # the interpreter's kernels on CPU tensors
        plain.append(("backend-triton", dict(backend="triton"), True))
    return [pytest.param(o, taken, id=name) for name, o, taken in plain]


def _both_paths(monkeypatch, plain, full_check, call):
    """call() -> (loss, gradients) or (exception type, message), run with the API's one-frame path
    ``plain`` and again with it patched out; also whether the first run took it (the full path's
    first check, ``full_check`` of copa_fast._validate, not called)."""
    full_calls = []
    real = getattr(copa_fast._validate, full_check)
    monkeypatch.setattr(copa_fast._validate, full_check, lambda *a, **k: full_calls.append(1) or real(*a, **k))
    fast = call()
    took = not full_calls
    monkeypatch.setattr(copa_fast.api, plain, lambda *a, **k: None)
    full = call()
    if isinstance(full[0], type):
        assert fast == full
    else:
        assert not isinstance(fast[0], type), fast
        torch.testing.assert_close(fast, full, rtol=0, atol=0, equal_nan=True)   # bits, dtypes, None grads
    return took


def _loss_and_grads(fn, kwargs, leaf_names):
    leaves = [kwargs[k] for k in leaf_names if kwargs[k].is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    try:
        loss = fn(**kwargs)
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    if not loss.isnan().any():
        loss.sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def _fresh(override):
    return {k: (torch.nn.Parameter(v.detach().clone()) if isinstance(v, torch.nn.Parameter)
                else v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in override.items()}


@pytest.mark.parametrize("override,taken", _plain_call_cases())
def test_copa_loss_plain_call_path_matches_the_full_path(monkeypatch, override, taken):
    """copa_loss answers a plain training-step call in one frame (api._plain_step) and every other
    call by its full path; whichever takes a call, the loss and gradients are the same bits and a
    bad input raises the same error."""
    def call():
        x, _, y = _good()
        kwargs = dict(features=x, labels=y, w_img=torch.eye(8), w_proto=torch.eye(8))
        kwargs.update(_fresh(override))
        return _loss_and_grads(copa_fast.copa_loss, kwargs, ("features", "w_img", "w_proto"))

    took = _both_paths(monkeypatch, "_plain_step", "copa_inputs", call)
    assert took == taken, "the one-frame path took a call it should not, or missed a plain one"


def _plain_sce_cases():
    x, p, y = _good()
    cases = [   # (id, overrides, whether the one-frame path takes the call)
        ("float32", dict(), True),
        ("float64", dict(embeddings=x.double(), prototypes=p.double()), True),
        ("unchecked", dict(check_inputs=False), True),
        ("int32-labels", dict(labels=y.int()), True),
        ("strided", dict(embeddings=torch.randn(8, 20).t(), prototypes=torch.randn(8, 4).t()), True),
        ("backend-cpu", dict(backend="cpu"), True),
        ("tau-80", dict(tau=80.0), True),
        ("int-tau", dict(tau=2), False),
        ("tensor-tau", dict(tau=torch.tensor(2.0)), False),
        ("bfloat16", dict(embeddings=x.bfloat16(), prototypes=p.bfloat16()), False),
        ("none", dict(reduction="none"), False),
        ("reference", dict(backend="reference"), False),
        ("tf32", dict(precision="tf32"), False),
        ("tau-81", dict(tau=81.0), False),
        ("tau-nan", dict(tau=float("nan")), False),
        ("mixed-dtypes", dict(prototypes=p.double()), False),
        ("columns", dict(prototypes=p[:, :5]), False),
        ("no-prototypes", dict(prototypes=p[:0]), False),
        ("labels-short", dict(labels=y[:-1]), False),
        ("labels-float", dict(labels=y.float()), False),
        ("labels-value", dict(labels=torch.where(y == 3, 7, y)), True),
        ("labels-unchecked", dict(labels=torch.where(y == 3, 7, y), check_inputs=False), True),   # NaN
        ("empty-class", dict(labels=torch.where(y == 2, 1, y)), True),
        ("embeddings-nan", dict(embeddings=x.clone().index_fill_(0, torch.tensor([3]), float("nan"))), True),
        ("embeddings-1d", dict(embeddings=x[0]), False),
        ("backend-unknown", dict(backend="tpu"), False),
    ]
    if "triton" in copa_fast.available_backends():   # the interpreter's kernels on CPU tensors
        cases.append(("backend-triton", dict(backend="triton"), True))
    return [pytest.param(o, taken, id=name) for name, o, taken in cases]


@pytest.mark.parametrize("override,taken", _plain_sce_cases())
def test_symmetric_ce_plain_call_path_matches_the_full_path(monkeypatch, override, taken):
    """symmetric_ce's one-frame path (api._plain_sce) against its full path, as for copa_loss."""
    x, p, y = _good()

    def call():
        kwargs = _fresh({**dict(embeddings=x, prototypes=p, labels=y), **override})
        return _loss_and_grads(copa_fast.symmetric_ce, kwargs, ("embeddings", "prototypes"))

    took = _both_paths(monkeypatch, "_plain_sce", "sce_inputs", call)
    assert took == taken, "the one-frame path took a call it should not, or missed a plain one"


@pytest.mark.parametrize("one_op", [True, False], ids=["value_summary-op", "torch-ops"])
def test_value_checks_read_the_device_once(monkeypatch, one_op):
    """A valid call's value checks (labels in range, no empty class, finite features, a finite
    tensor tau) come back from the device in ONE transfer — one synchronisation on a GPU — with no
    other host read (item, nonzero, bincount: each a synchronisation of its own there): through the
    extension's value_summary op (one call) or, without it, torch ops and one tolist."""
    from torch.profiler import profile

    if one_op and not copa_fast._extension.value_summary_on("cpu"):
        pytest.skip("needs the C++ extension")
    if not one_op:
        monkeypatch.setattr(copa_fast._extension, "value_summary_on", lambda device_type: False)
    reads = count_tolist_reads(monkeypatch)
    x, p, y = _good()
    tau = torch.tensor(2.0)
    calls = [lambda: copa_fast.symmetric_ce(x, p, y, tau, backend="reference"),
             lambda: copa_fast.copa_loss(x, y, torch.eye(8), torch.eye(8), tau, prototype_features=x + 1,
                                         backend="reference"),
             lambda: copa_fast.copa_loss(x, y, torch.eye(8), torch.eye(8), 2.0, num_classes=4, backend="reference")]
    for call in calls:
        reads.clear()
        with torch.no_grad(), profile() as prof:
            call()
        syncs = {e.name for e in prof.events()} & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero",
                                                  "aten::is_nonzero", "aten::bincount"}
        summaries = sum(e.name == "copa_fast::value_summary" for e in prof.events())
        assert len(reads) + summaries == 1 and summaries == int(one_op) and not syncs, (reads, summaries, syncs)


@pytest.mark.parametrize("one_op", [True, False], ids=["value_summary-op", "torch-ops"])
def test_one_read_checks_agree_with_the_detailed_ones(monkeypatch, one_op):
    """The one-read form of the value checks passes exactly the labels, features and tau that the
    detailed checks pass, with the same C: random labels with gaps, negatives, values past N and
    past C, given and read C, int32 labels; features with NaN / +-Inf in float32, float16 and
    bfloat16, transposed; tau at and past its bounds. Through the extension's value_summary op and
    through torch ops."""
    from copa_fast import _validate as V

    if one_op and not copa_fast._extension.value_summary_on("cpu"):
        pytest.skip("needs the C++ extension")
    if not one_op:
        monkeypatch.setattr(copa_fast._extension, "value_summary_on", lambda device_type: False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g)
    for trial in range(400):
        n = int(torch.randint(1, 12, (1,), generator=g))
        hi = int(torch.randint(1, 16, (1,), generator=g))
        y = torch.randint(-1 if trial % 7 == 0 else 0, hi, (n,), generator=g)
        if trial % 5 == 0:
            y = torch.arange(n) % hi   # often valid
        c = None if trial % 2 else int(torch.randint(1, 16, (1,), generator=g))
        feats = x[:n].clone()
        if trial % 11 == 0:
            feats[0, trial % 5] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        feats = [feats, feats.half(), feats.bfloat16(), feats.t().contiguous().t()][trial % 4]
        if trial % 3 == 0:
            y = y.int()
        tau = [2.0, torch.tensor(80.0), torch.tensor(80.5), torch.tensor(float("nan")), torch.tensor(-1e30)][trial % 5]
        try:
            want = V.labels("labels", y, n, feats, c, check_values=True)
            V.tau(tau, check_values=True)
            V.finite("features", feats)
        except ValueError:
            want = None
        assert V._values_pass(y, n, c, tau, [feats]) == want, (y.tolist(), c, tau)


def test_one_read_checks_leave_a_tensor_on_another_device_to_the_detailed_ones():
    """The one-read form reads tensors on the labels' device only: one elsewhere (a query on
    another device than the support, in CoPAHead.predict) goes to the checks one by one, instead of
    an error from the one-read op that names none of the caller's arguments."""
    from copa_fast import _validate as V

    y = torch.arange(6) % 3
    assert V._values_pass(y, 6, None, None, [torch.randn(6, 4), torch.empty(2, 4, device="meta")]) is None
    assert V._values_pass(y, 6, None, None, [torch.randn(6, 4)]) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("multi_tensor", [True, False], ids=["foreach-norms", "aminmax"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e30), (torch.float16, 6e4), (torch.bfloat16, 1e38),
                                             (torch.float64, 1e300)], ids=str)
def test_episode_checks_take_extreme_finite_features_in_their_one_read(monkeypatch, device, multi_tensor, dtype,
                                                                       magnitude):
    """adapt_many's one-read episode checks (``episodes_values``) pass finite features of any
    magnitude (here their 2-norms overflow) and refuse a NaN or an Inf anywhere, in support or
    query, alone or together — in both forms of the finiteness check (CUDA's foreach norms, run
    on every device here, and the per-tensor aminmax)."""
    from copa_fast import _validate as V

    finiteness_check_form(monkeypatch, multi_tensor=multi_tensor)
    g = torch.Generator().manual_seed(11)
    big = (torch.randn(40, 8, generator=g, dtype=torch.float64) * magnitude).clamp(-torch.finfo(dtype).max,
                                                                                torch.finfo(dtype).max)
    x = big.to(dtype).to(device)
    y = (torch.arange(40) % 4).to(device)
    q = x[:6].flip(0).contiguous()
    assert torch.isfinite(x).all() and torch.isinf(torch._foreach_norm([x], 2)[0])   # its 2-norm overflows
    assert V.episodes_values([(x, y, q, y[:6]), (x[:20], y[:20], None, None)]) == [4, 4]
    for where in ("support", "query", "both"):
        for bad in ([math.nan], [math.inf], [-math.inf], [math.nan, math.inf]):
            xs, qs = x.clone(), q.clone()
            for k, v in enumerate(bad):
                if where in ("support", "both"):
                    xs[7 + k, 3] = v
                if where in ("query", "both"):
                    qs[2, k] = v
            assert V.episodes_values([(x, y, q, y[:6]), (xs, y, qs, y[:6])]) is None, (where, bad)


@pytest.mark.parametrize("call,arg", [
    (lambda x, y: copa_fast.adapt(x, y, steps=-1), "steps"),
    (lambda x, y: copa_fast.adapt(x, y, lr=float("nan")), "lr"),
    (lambda x, y: copa_fast.adapt(x, y, query=x), "query"),
    (lambda x, y: copa_fast.adapt(x, y, query=x[:, :3], query_labels=y), r"query: expected \d+ columns \(as support\)"),
    (lambda x, y: copa_fast.adapt(x, y, query=x, query_labels=y + 10), "query_labels"),
    (lambda x, y: copa_fast.adapt(x, y, query=x.index_fill(0, y[:1], float("nan")), query_labels=y), "query"),
    (lambda x, y: copa_fast.adapt_many([(x, y, x.index_fill(1, y[:1], float("inf")), y)]), r"episodes\[0\]: query"),
    (lambda x, y: copa_fast.adapt(x, y.float()), "support_labels"),
    (lambda x, y: copa_fast.CoPAHead(x.shape[1]).predict(x.index_fill(0, y[:1], float("nan")), x, y), "query"),
    (lambda x, y: copa_fast.CoPAHead(x.shape[1]).predict(x, x.index_fill(1, y[:1], float("-inf")), y), "support"),
    (lambda x, y: copa_fast.CoPAHead(x.shape[1]).predict(x[:, :3], x, y), r"query: expected \d+ columns \(as w_img\)"),
    (lambda x, y: copa_fast.CoPAHead(x.shape[1]).predict(x, x[:, :3], y), r"support: expected \d+ columns \(as w_img\)"),
    (lambda x, y: copa_fast.class_means(x[0], y), "features"),
    (lambda x, y: copa_fast.class_means(x.long(), y), "features"),
    (lambda x, y: copa_fast.class_means(x, y.float()), "labels"),
    (lambda x, y: copa_fast.class_means(x, y[1:]), "labels"),
    (lambda x, y: copa_fast.class_means(x, y + 1, int(y.max()) + 1), "labels"),
    (lambda x, y: copa_fast.class_means(x, y - 1), "labels"),
    (lambda x, y: copa_fast.class_means(x, y, int(y.max()) + 2), "labels: every class"),
    (lambda x, y: copa_fast.class_means(x, torch.where(y == 1, 10**12, y)), "labels: every class .* class 1 has none"),
    (lambda x, y: copa_fast.adapt(x, torch.where(y == 0, 2**62, y)), "support_labels: every class .* class 0 has none"),
    (lambda x, y: copa_fast.adapt_many([(x, y, None, None), (x, torch.where(y == 2, 10**12, y), None, None)]),
     r"episodes\[1\]: support_labels: every class .* class 2 has none"),
    (lambda x, y: copa_fast.CoPAHead(x.shape[1]).predict(x, x, y * 10**11), "support_labels: every class"),
    (lambda x, y: copa_fast.class_means(x, y, 0), "num_classes"),
    (lambda x, y: copa_fast.class_means(x, y, check_inputs=False), "num_classes"),
    (lambda x, y: copa_fast.CoPAHead(0), "dim"),
    (lambda x, y: copa_fast.CoPAHead(8, tau=float("inf")), "tau"),
])
def test_other_entry_points_bad_input(call, arg):
    x, _, y = _good()
    with pytest.raises((ValueError, TypeError), match=arg):
        call(x, y)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    x, p, y = _good()
    with pytest.raises(ValueError, match="cuda"):
        copa_fast.symmetric_ce(x, p, y, backend="cuda")
    monkeypatch.setenv("COPA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="COPA_FAST_BACKEND"):
        copa_fast.symmetric_ce(x, p, y)
    monkeypatch.setenv("COPA_FAST_BACKEND", "reference")
    assert torch.isfinite(copa_fast.symmetric_ce(x, p, y))


def test_default_backend_is_the_measured_fastest(monkeypatch):
    # benchmarks/RESULTS.md (H200, second lease): cuda ahead of triton on one problem at every size
    # and on batches of episodes; the selection falls back in that order
    be = copa_fast.backends
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(be, "available_backends", lambda: ["reference", "cpu", "triton", "cuda"])
    monkeypatch.delenv("COPA_FAST_BACKEND", raising=False)
    assert be.resolve(None, cuda) == "cuda" and be.resolve(None, cuda, batched=True) == "cuda"
    assert be.resolve(None, cpu) == "cpu" and be.resolve(None, cpu, batched=True) == "cpu"
    monkeypatch.setattr(be, "available_backends", lambda: ["reference", "cpu", "triton"])
    assert be.resolve(None, cuda, batched=True) == "triton"
    monkeypatch.setattr(be, "available_backends", lambda: ["reference", "triton"])
    assert be.resolve(None, cuda) == "triton" and be.resolve(None, cpu) == "reference"
    monkeypatch.setenv("COPA_FAST_BACKEND", "reference")
    assert be.resolve(None, cuda, batched=True) == "reference"


_INTERPRETER_STATE = r"""
import os, sys, torch
import copa_fast
x, y = torch.randn(12, 8), torch.arange(12) % 3
p = torch.randn(3, 8)
first = os.environ.get("TRITON_INTERPRET") == "1"
if first:
    copa_fast.symmetric_ce(x, p, y, backend="triton")   # the kernels built for the interpreter
else:
    import copa_fast.triton.symmetric_ce                  # the kernels built for a GPU
os.environ["TRITON_INTERPRET"] = "0" if first else "1"   # flipped after the kernels exist
print(copa_fast.backends.triton_interpreted(), "triton" in copa_fast.available_backends())
try:
    loss = copa_fast.symmetric_ce(x, p, y, backend="triton")
    print("ran", bool(torch.isfinite(loss)))
except ValueError as e:
    print("refused", "triton" in str(e))
"""


@pytest.mark.skipif(not copa_fast.backends._triton_importable() or torch.cuda.is_available(),
                    reason="needs triton and a machine without a GPU")
@pytest.mark.parametrize("at_start", ["1", "0"])
def test_triton_backend_follows_the_kernels_not_a_later_environment(at_start):
    # Triton decides interpreter or compiler when it decorates a kernel. Setting TRITON_INTERPRET
    # after that (a test helper once did, in the process running the GPU tests: every Triton test
    # failed there) must not make copa_fast offer CPU tensors to compiled kernels, or refuse the
    # interpreted ones it has.
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET=at_start)
    out = subprocess.run([sys.executable, "-c", _INTERPRETER_STATE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if at_start == "1":
        assert out.stdout.split() == ["True", "True", "ran", "True"]
    else:   # compiled kernels, no GPU: triton is not available, and saying so names it
        assert out.stdout.split() == ["False", "False", "refused", "True"]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("bad", [-1, 4, 10**9, -(10**9)])
def test_unchecked_bad_label_gives_nan_not_a_crash(backend, device, bad):
    x, p, y = _good(device)
    y = y.clone()
    y[5] = bad
    x.requires_grad_(True)
    loss = copa_fast.symmetric_ce(x, p, y, backend=backend, check_inputs=False)
    assert math.isnan(loss.item())
    loss.backward()
    per = copa_fast.symmetric_ce(x.detach(), p, y, backend=backend, check_inputs=False, reduction="none")
    assert math.isnan(per[5].item())
    out = copa_fast.copa_loss(x.detach(), y, torch.eye(8, device=device), torch.eye(8, device=device),
                              num_classes=4, backend=backend, check_inputs=False)
    assert math.isnan(out.item())


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("tau", [2.0, 10.0])
def test_unchecked_empty_class_is_ignored_as_in_the_published_form(backend, device, tau):
    """A prototype no label names (validation off): the published N x N form never sees it, so the
    loss is that of the other classes and its gradient is zero. The kernels once returned NaN
    gradients at tau 10 (0 samples x an exponent that overflowed)."""
    x, p, y = (t.to(device) for t in empty_class_problem(torch.float64))
    x.requires_grad_(True)
    p.requires_grad_(True)
    loss = copa_fast.symmetric_ce(x, p, y, tau, backend=backend, check_inputs=False)
    loss.backward()
    xr, pr = x.detach().clone().requires_grad_(True), p.detach()[:4].clone().requires_grad_(True)
    want = copa_fast.reference.symmetric_ce(xr, pr, y, tau)
    want.backward()
    assert_rel(loss, want, 1e-10, "loss")
    assert_rel(x.grad, xr.grad, 1e-9, "d embeddings")
    assert_rel(p.grad[:4], pr.grad, 1e-9, "d prototypes")
    assert torch.equal(p.grad[4], torch.zeros_like(p.grad[4]))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_all_zero_rows_are_finite(backend, device):
    x, p, y = _good(device)
    x = x.clone()
    x[2] = 0
    p = p.clone()
    p[1] = 0
    x.requires_grad_(True)
    loss = copa_fast.symmetric_ce(x, p, y, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    ref = copa_fast.reference.symmetric_ce(x.detach().double(), p.double(), y)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


_SUMMARY_DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available())
                    and copa_fast._extension.value_summary_on(d)]


@pytest.mark.skipif(not _SUMMARY_DEVICES, reason="needs the C++ extension")
@pytest.mark.parametrize("device", _SUMMARY_DEVICES)
def test_value_summary_op(device):
    """copa_fast::value_summary, the value checks in one call: label min / max, distinct labels in
    [0, k), NaN / +-Inf entries over every checked tensor (float16 to float64, strided, requiring
    grad), tau; errors naming the argument."""
    op = torch.ops.copa_fast.value_summary
    g = torch.Generator().manual_seed(11)
    y = torch.tensor([3, 0, 3, 7, -2, 1]).to(device)
    x = torch.randn(6, 5, generator=g).to(device).requires_grad_(True)
    clean = [x, x.t(), x.detach().half(), x.detach().bfloat16(), x.detach().double()[:, ::2]]
    assert op(y, 4, clean, None) == [-2.0, 7.0, 3.0, 0.0, 0.0]
    assert op(y.int(), 8, clean, torch.tensor([1.5], device=device)) == [-2.0, 7.0, 4.0, 0.0, 1.5]
    dirty = x.detach().clone()
    dirty[1, 2], dirty[4, 0], dirty[5, 4] = float("nan"), float("inf"), -float("inf")
    got = op(y, 4, [dirty, dirty.t(), dirty.half(), dirty.bfloat16(), torch.empty(0, 5, device=device)], None)
    assert got[3] == 12.0
    with pytest.raises(ValueError, match="k: expected >= 1, got 0"):
        op(y, 0, clean, None)
    with pytest.raises(TypeError, match="labels: expected int64 or int32"):
        op(y.float(), 4, clean, None)
    with pytest.raises(TypeError, match="tensors: expected float16, bfloat16, float32 or float64, got Int"):
        op(y, 4, [y.int()], None)
    with pytest.raises(ValueError, match="tau: expected one element, got 2"):
        op(y, 4, clean, torch.zeros(2, device=device))
