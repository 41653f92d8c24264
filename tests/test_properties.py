"""Property-based checks (hypothesis) of the kernel backends against the float64 reference
(symmetric_ce, copa_loss, the batched-episodes op): cpu; triton (on CUDA tensors where there is a
GPU, else under the interpreter); cuda where there is a GPU:
random shapes and class-count patterns, tau in [0, 10] (float or tensor), feature magnitudes from
1e-20 to 1e20, zero and duplicated rows, non-contiguous and transposed inputs."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import copa_fast
from copa_fast import reference as ref
from conftest import DEVICES, TOL, device_for, tied_one_class_problem

BACKENDS = [b for b in copa_fast.available_backends() if b in ("cpu", "triton", "cuda")]


def _every_class_labels(n, c, g):
    """n labels in 0..c-1, each class present, in random order."""
    return torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])[torch.randperm(n, generator=g)]


def _draw_episode_labels(draw, most_c, most_n):
    """An episode's C (1..most_c), N (C..most_n), a seeded generator and its N labels."""
    c = draw(st.integers(1, most_c))
    n = draw(st.integers(c, most_n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return c, n, g, _every_class_labels(n, c, g)


@st.composite
def problems(draw):
    c = draw(st.integers(1, 12))
    n = draw(st.integers(c, 40))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = _every_class_labels(n, c, g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(c, d, generator=g, dtype=torch.float64)
    x = x * 10.0 ** draw(st.integers(-20, 20))
    p = p * 10.0 ** draw(st.integers(-20, 20))
    if draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = 0
    if n > 1 and draw(st.booleans()):
        x[1] = x[0]
    tau = draw(st.floats(0.0, 10.0))
    tau_tensor = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    return x, p, labels, tau, tau_tensor, layout


def _layout(t, layout):
    if layout == "transposed":
        return t.t().contiguous().t()  # same values, column-major storage
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]  # non-contiguous view
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=problems())
# Found by a CI run: the Triton kernel's float32 log-sum-exps (rounded at |S| = 1097) gave dtau =
# -0.035 for 0 at tau 7, and at tau 10 the loss 0.6924 for 0.6931 (log 2).
@example(prob=(*tied_one_class_problem(torch.float64), 7.0, True, "contiguous"))
@example(prob=(*tied_one_class_problem(torch.float64), 10.0, True, "contiguous"))
def test_matches_reference(backend, dtype, prob):
    x, p, y, tau, tau_tensor, layout = prob
    dev = device_for(backend)
    xs, ps = _layout(x.to(dev, dtype, copy=True), layout), _layout(p.to(dev, dtype, copy=True), layout)
    xs.requires_grad_(True)
    t = torch.tensor(tau, dtype=dtype, device=dev, requires_grad=True) if tau_tensor else tau
    out = copa_fast.symmetric_ce(xs, ps, y.to(dev), t, backend=backend)
    x64 = x.clone().requires_grad_(True)
    t64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True) if tau_tensor else tau
    expect = ref.symmetric_ce(x64, p, y, t64)
    # the loss is O(1)-sized whatever the magnitudes: an absolute floor of the relative tolerance
    assert abs(out.item() - expect.item()) <= TOL[dtype]["loss"] * max(1.0, abs(expect.item())) * 10
    wrt = (xs, t) if tau_tensor else (xs,)
    wrt64 = (x64, t64) if tau_tensor else (x64,)
    got = [g.cpu() for g in torch.autograd.grad(out, wrt)]
    want = torch.autograd.grad(expect, wrt64)
    assert torch.isfinite(got[0]).all()
    # Row i's gradient has the natural scale exp(tau) / (N ||x_i||) (the normalisation divides by
    # the norm); a gradient that cancels to ~0 (D = 1, say) is judged against that scale.
    n = x.shape[0]
    scale = torch.exp(torch.tensor(tau, dtype=torch.float64)) / (n * x.norm(dim=1).clamp_min(1e-12))
    row_err = (got[0].double() - want[0]).norm(dim=1)
    row_ref = torch.maximum(want[0].norm(dim=1), scale)
    assert (row_err <= TOL[dtype]["grad"] * 10 * row_ref).all(), f"dembeddings: {(row_err / row_ref).max():.3e}"
    if tau_tensor:
        # dloss/dtau = sum G S with |S| <= exp(tau): judged against that scale, as the rows are (a
        # rounding of R or L at size exp(tau) moves it by ~exp(2 tau) eps, 5e-8 at tau = 10 in float64)
        t_ref = max(1.0, abs(want[1].item()), math.exp(tau))
        assert abs(got[1].item() - want[1].item()) <= TOL[dtype]["grad"] * 10 * t_ref, "dtau"


EPISODE_BACKENDS = [b for b in copa_fast.available_backends() if b in ("cpu", "triton", "cuda")]


@st.composite
def episode_batches(draw):
    """1 to 4 ragged episodes sharing D, each with its own N, C, tau and magnitude."""
    d = draw(st.integers(1, 24))
    eps = []
    for _ in range(draw(st.integers(1, 4))):
        c, n, g, y = _draw_episode_labels(draw, 8, 30)
        scale = 10.0 ** draw(st.integers(-10, 10))
        eps.append((scale * torch.randn(n, d, generator=g, dtype=torch.float64),
                    scale * torch.randn(c, d, generator=g, dtype=torch.float64), y, draw(st.floats(0.0, 10.0))))
    return eps


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eps=episode_batches())
def test_episodes_op_matches_reference(backend, eps):
    """The batched-episodes op equals the reference episode by episode (float64)."""
    from copa_fast.ops import symmetric_ce as ops

    dev = device_for(backend)
    ns, cs = [e[0].shape[0] for e in eps], [e[1].shape[0] for e in eps]
    starts = lambda sizes: torch.tensor([0] + sizes[:-1]).cumsum(0)  # noqa: E731
    rows = torch.stack([starts(ns), torch.tensor(ns)], 1)
    cls = torch.stack([starts(cs), torch.tensor(cs)], 1)
    sizes = [a * b for a, b in zip(ns, cs, strict=True)]
    z = torch.cat([e[0] for e in eps]).to(dev).requires_grad_(True)
    q = torch.cat([e[1] for e in eps]).to(dev).requires_grad_(True)
    tau = torch.tensor([e[3] for e in eps], dtype=torch.float64, device=dev)
    loss, *_ = ops.episodes_op(backend)(z, q, torch.cat([e[2] for e in eps]).to(dev), rows.to(dev), cls.to(dev),
                                        starts(sizes).to(dev), sum(sizes), tau, True)
    loss.sum().backward()
    loss, zgrad, qgrad = loss.cpu(), z.grad.cpu(), q.grad.cpu()
    for k, (x, p, y, t) in enumerate(eps):
        xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        want = ref.symmetric_ce(xr, pr, y, t)
        want.backward()
        assert abs(loss[k].item() - want.item()) <= 1e-9 * max(1.0, abs(want.item()))
        r0, c0 = int(rows[k, 0]), int(cls[k, 0])
        got_z, got_q = zgrad[r0:r0 + ns[k]], qgrad[c0:c0 + cs[k]]
        for got, exp in ((got_z, xr.grad), (got_q, pr.grad)):
            assert torch.isfinite(got).all()
            assert (got - exp).norm() <= 1e-8 * max(exp.norm().item(), math.exp(t) / (ns[k] * x.norm(dim=1).min()))


@st.composite
def copa_steps(draw):
    c = draw(st.integers(1, 10))
    n = draw(st.integers(c, 36))
    d = draw(st.integers(1, 24))
    e = draw(st.sampled_from([d, max(1, d - 3), d + 2]))   # square and non-square adapters
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = _every_class_labels(n, c, g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 10.0 ** draw(st.integers(-6, 6))
    pf = x + 0.5 * x.abs().mean() * torch.randn(n, d, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    wi = torch.eye(e, d, dtype=torch.float64) + 0.3 * torch.randn(e, d, generator=g, dtype=torch.float64)
    wp = torch.eye(e, d, dtype=torch.float64) + 0.3 * torch.randn(e, d, generator=g, dtype=torch.float64)
    tau = draw(st.floats(0.0, 10.0))
    frozen = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum"]))
    return x, pf, labels, wi, wp, tau, frozen, reduction


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prob=copa_steps())
def test_copa_loss_matches_reference(backend, prob):
    """The whole step (class means, both adapters, symmetric CE) and its gradients, float64, against
    the reference: frozen or trained features, separate prototype features, (E, D) adapters."""
    x, pf, y, wi, wp, tau, frozen, reduction = prob
    dev = device_for(backend)
    leaves = [t.to(dev, copy=True).requires_grad_(g) for t, g in ((x, not frozen), (wi, True), (wp, True))]
    pf_leaf = pf.to(dev, copy=True).requires_grad_(True) if pf is not None else None
    out = copa_fast.copa_loss(*leaves[:1], y.to(dev), *leaves[1:], tau, prototype_features=pf_leaf,
                              reduction=reduction, backend=backend)
    leaves64 = [t.detach().cpu().clone().requires_grad_(t.requires_grad) for t in leaves]
    pf64 = pf.clone().requires_grad_(True) if pf is not None else None
    expect = ref.copa_loss(*leaves64[:1], y, *leaves64[1:], tau, prototype_features=pf64, reduction=reduction)
    assert abs(out.item() - expect.item()) <= 1e-9 * max(1.0, abs(expect.item()))
    wrt = [t for t in leaves + [pf_leaf] if t is not None and t.requires_grad]
    wrt64 = [t for t in leaves64 + [pf64] if t is not None and t.requires_grad]
    # A gradient that cancels to ~0 (C = 1 or D = 1, say) is judged against the natural scale of
    # the loss's derivatives: exp(tau) times the largest (input norm + adapter norm) / adapted-row
    # norm (the normalisation divides by the adapted row's norm), times N for reduction="sum".
    p0 = copa_fast.class_means(pf if pf is not None else x, y, int(y.max()) + 1)
    ratio = max(((x.norm(dim=1) + wi.norm()) / (x @ wi.t()).norm(dim=1).clamp_min(1e-300)).max().item(),
                ((p0.norm(dim=1) + wp.norm()) / (p0 @ wp.t()).norm(dim=1).clamp_min(1e-300)).max().item())
    scale = math.exp(tau) * ratio * (x.shape[0] if reduction == "sum" else 1)
    for got, exp in zip(torch.autograd.grad(out, wrt), torch.autograd.grad(expect, wrt64), strict=True):
        got = got.cpu()
        assert torch.isfinite(got).all()
        assert (got - exp).norm() <= 1e-8 * max(exp.norm().item(), scale)


def _checked_one_by_one(items):
    """What adapt_many's checks answer when each episode is checked in turn: the classes, or the
    first error as (type, message)."""
    out = []
    for k, parts in enumerate(items):
        try:
            out.append(copa_fast.api._check_episode(*parts))
        except (TypeError, ValueError) as e:
            return type(e), f"episodes[{k}]: {e}"
    return out


@st.composite
def episode_lists(draw):
    """Lists of 1-5 small episodes, each with at most one defect of data (a negative label, an
    empty class, a label past the rows, NaN / +-Inf in support or query, a query label outside the
    support's classes) or of form (float labels, a wrong width, query labels without a query), int32
    or int64 labels on either side, float32 / float64 / float16 features, with or without a query set."""
    items = []
    for _ in range(draw(st.integers(1, 5))):
        c, n, g, y = _draw_episode_labels(draw, 6, 14)
        dt = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
        sup = torch.randn(n, 6, generator=g).to(dt)
        qry, qy = None, None
        if draw(st.booleans()):
            m = draw(st.integers(1, 5))
            qry, qy = torch.randn(m, 6, generator=g).to(dt), torch.randint(0, c, (m,), generator=g)
            qy = qy.int() if draw(st.booleans()) else qy
        if draw(st.booleans()):
            y = y.int()
        defect = draw(st.sampled_from(["none"] * 6 + ["negative", "empty class", "past the rows", "nan support",
                                                       "inf query", "query label", "float labels", "width",
                                                       "query labels alone"]))
        at = draw(st.integers(0, n - 1))
        if defect == "negative":
            y = y.clone()
            y[at] = -1
        elif defect == "empty class":
            y = y + 1
        elif defect == "past the rows":
            y = y.clone()
            y[at] = n + draw(st.integers(0, 3))
        elif defect == "nan support":
            sup = sup.clone()
            sup[at, 0] = float("nan")
        elif defect == "inf query" and qry is not None:
            qry = qry.clone()
            qry[0, -1] = draw(st.sampled_from([float("inf"), -float("inf")]))
        elif defect == "query label" and qy is not None:
            qy = qy.clone()
            qy[-1] = draw(st.sampled_from([-1, c, c + 5]))
        elif defect == "float labels":
            y = y.float()
        elif defect == "width" and qry is not None:
            qry = torch.randn(qry.shape[0], 7).to(dt)
        elif defect == "query labels alone":
            qry, qy = None, torch.zeros(2, dtype=torch.int64)
        items.append((sup, y, qry, qy))
    return items


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300, deadline=None)
@given(items=episode_lists())
def test_episodes_checked_at_once_answer_as_one_by_one(device, items):
    """adapt_many checks every episode with one read of their data (``_validate.episodes_values``)
    and falls back to checking them in turn only when something fails: the classes, or the first
    bad episode's error word for word, are those of the checks one episode at a time; and the
    one-read pass accepts exactly the lists those checks accept."""
    items = [tuple(None if t is None else t.to(device) for t in parts) for parts in items]
    want = _checked_one_by_one(items)
    if isinstance(want, list):
        assert copa_fast.api._check_episodes(enumerate(items)) == want
        assert copa_fast.api._episode_classes(items) == want
    else:
        with pytest.raises(want[0]) as got:
            copa_fast.api._check_episodes(enumerate(items))
        assert str(got.value) == want[1]
        assert copa_fast.api._episode_classes(items) is None
