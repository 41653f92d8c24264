"""The batched-episodes op (E ragged episodes in one launch) of every backend that has one —
Triton (under TRITON_INTERPRET=1 on CPU in CI), the C++ op on CPU (episode after episode) and on
CUDA (one block per episode) — the batched adapt_many engine built on it, and the opt-in TF32 mode."""

import math

import pytest
import torch

import copa_fast
from copa_fast import reference as ref
from conftest import (TOL, assert_rel, count_tolist_reads, device_for, finiteness_check_form, make_episode,
                      rel_err)

AVAILABLE = copa_fast.available_backends()
HAS_TRITON = "triton" in AVAILABLE
BACKEND_DEVICE = {b: device_for(b).type for b in ("cpu", "triton", "cuda")}
DEVICE = BACKEND_DEVICE["triton"]
EPISODE_BACKENDS = [pytest.param(b, id=b, marks=[pytest.mark.cuda] if BACKEND_DEVICE[b] == "cuda" else [])
                    for b in ("cpu", "triton", "cuda") if b in AVAILABLE]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")

# (N, C) per episode: ragged, a 1-class episode, C = N, a 1-shot class, tails of every tile size
SIZES = [(7, 3), (5, 1), (6, 6), (70, 9), (33, 32)]


def _episodes(dtype, d, seed=0):
    eps = []
    for k, (n, c) in enumerate(SIZES):
        x, y = make_episode(n, c, d, seed=seed + k, dtype=torch.float64, one_shot=1 if c > 1 and n > c else 0)
        q = torch.randn(c, d, generator=torch.Generator().manual_seed(seed + 100 + k), dtype=torch.float64)
        eps.append((x, q, y))
    return eps


def _stack(eps, pad_rows=0, pad_cls=0, dtype=torch.float32, device=DEVICE):
    """Stacks the episodes with gaps of garbage rows between them (pad_* > 0) to check that the
    kernel reads and writes only the rows each episode owns."""
    d = eps[0][0].shape[1]
    zs, qs, ys, rows, cls, s_off = [], [], [], [], [], []
    r = c = s = 0
    for x, q, y in eps:
        rows.append([r, x.shape[0]])
        cls.append([c, q.shape[0]])
        s_off.append(s)
        s += x.shape[0] * q.shape[0]
        zs += [x, torch.full((pad_rows, d), 1e30, dtype=torch.float64)]
        qs += [q, torch.full((pad_cls, d), -1e30, dtype=torch.float64)]
        ys += [y, torch.full((pad_rows,), 10**6)]
        r += x.shape[0] + pad_rows
        c += q.shape[0] + pad_cls
    t = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return (torch.cat(zs).to(device, dtype), torch.cat(qs).to(device, dtype), torch.cat(ys).to(device),
            t(rows), t(cls), t(s_off), s)


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("pad", [0, 3], ids=["packed", "padded"])
def test_episodes_kernel_matches_reference_per_episode(backend, dtype, pad):
    from copa_fast.ops import symmetric_ce as ops

    d = 19
    dev = BACKEND_DEVICE[backend]
    eps = _episodes(dtype, d)
    z, q, y, rows, cls, s_off, s_total = _stack(eps, pad, pad, dtype, dev)
    taus = torch.tensor([2.0, 0.0, 5.0, 1.0, 10.0], dtype=dtype, device=dev, requires_grad=True)
    z.requires_grad_(True)
    q.requires_grad_(True)
    loss, losses, pred, _, _, _ = ops.episodes_op(backend)(z, q, y, rows, cls, s_off, s_total, taus, True)
    weights = torch.rand(len(eps), dtype=dtype, device=dev) + 0.5
    (loss * weights).sum().backward()
    tol = TOL[dtype]
    for k, ((x, p, lab), (r0, n), (c0, c)) in enumerate(zip(eps, rows.tolist(), cls.tolist(), strict=True)):
        xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        tr = torch.tensor(taus[k].item(), dtype=torch.float64, requires_grad=True)
        want = ref.symmetric_ce(xr, pr, lab, tr)
        (want * weights[k].double().cpu()).backward()
        assert_rel(loss[k], want, tol["loss"], f"episode {k} loss")
        per_sample = ref.symmetric_ce(x, p, lab, tr.detach(), reduction="none")
        assert_rel(losses[r0:r0 + n], per_sample, tol["loss"], f"episode {k} per-sample losses")
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(p, dim=1).t()
        assert pred[r0:r0 + n].cpu().eq(cos.argmax(1)).float().mean() >= 0.95
        assert_rel(z.grad[r0:r0 + n], xr.grad, tol["grad"], f"episode {k} dz")
        assert_rel(q.grad[c0:c0 + c], pr.grad, tol["grad"], f"episode {k} dq")
        assert_rel(taus.grad[k], tr.grad, tol["grad"], f"episode {k} dtau")
    owned = torch.zeros(z.shape[0], dtype=torch.bool)
    for r0, n in rows.tolist():
        owned[r0:r0 + n] = True
    assert torch.all(z.grad[~owned.to(dev)] == 0)   # gap rows: untouched gradients


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
def test_episodes_kernel_bad_label_poisons_only_its_episode(backend):
    from copa_fast.ops import symmetric_ce as ops

    dev = BACKEND_DEVICE[backend]
    eps = _episodes(torch.float32, 16, seed=3)
    z, q, y, rows, cls, s_off, s_total = _stack(eps, 0, 0, device=dev)
    y = y.clone()
    r0, n = rows[2].tolist()
    y[r0 + 1] = 999   # out of range for episode 2, never an out-of-bounds access
    loss, *_ = ops.episodes_op(backend)(z, q, y, rows, cls, s_off, s_total,
                                        torch.full((len(eps),), 2.0, device=dev), True)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()


# (row, class, score-block) layout of episode 2 that does not lie inside the stacked buffers
_BAD_LAYOUTS = {
    "rows past the end": lambda r, c, s, st: ([r[0], 10**4], c, s),
    "negative row start": lambda r, c, s, st: ([-3, r[1]], c, s),
    "negative row count": lambda r, c, s, st: ([r[0], -r[1]], c, s),
    "classes past the end": lambda r, c, s, st: (r, [c[0], 10**4], s),
    "score block past s_total": lambda r, c, s, st: (r, c, st - 1),
    "negative s_off": lambda r, c, s, st: (r, c, -1),
    "huge counts": lambda r, c, s, st: ([r[0], 2**40], [c[0], 2**40], s),
}


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
@pytest.mark.parametrize("bad", list(_BAD_LAYOUTS))
def test_episodes_op_refuses_a_layout_outside_its_buffers(backend, bad):
    """The layout is the caller's and each backend checks its episodes' own (no host read on a GPU):
    an episode whose rows, classes or score block do not lie inside the stacked buffers gets a NaN
    loss and dtau and touches nothing; every other episode comes out bit for bit as without it."""
    from copa_fast.ops import symmetric_ce as ops

    dev = BACKEND_DEVICE[backend]
    eps = _episodes(torch.float32, 16, seed=7)
    z, q, y, rows, cls, s_off, s_total = _stack(eps, 0, 0, device=dev)
    tau = torch.full((len(eps),), 2.0, device=dev)
    good = ops.episodes_op(backend)(z, q, y, rows, cls, s_off, s_total, tau, True)
    (r0, n), (c0, cc) = rows[2].tolist(), cls[2].tolist()   # episode 2's own rows and classes
    r, c, so = _BAD_LAYOUTS[bad]([r0, n], [c0, cc], int(s_off[2]), s_total)
    rows, cls, s_off = rows.clone(), cls.clone(), s_off.clone()
    rows[2], cls[2], s_off[2] = torch.tensor(r), torch.tensor(c), so
    loss, losses, pred, dz, dq, dtau = ops.episodes_op(backend)(z, q, y, rows, cls, s_off, s_total, tau, True)
    assert torch.isnan(loss[2]) and torch.isnan(dtau[2])
    others = [0, 1, 3, 4]
    assert torch.equal(loss[others], good[0][others]) and torch.equal(dtau[others], good[5][others])
    mine = torch.zeros(z.shape[0], dtype=torch.bool, device=dev)
    mine[r0:r0 + n] = True
    assert torch.equal(dz[~mine], good[3][~mine]) and torch.equal(losses[~mine], good[1][~mine])
    assert torch.equal(pred[~mine], good[2][~mine])
    assert not dz[mine].any() and not losses[mine].any()   # episode 2 wrote nothing
    cmine = torch.zeros(q.shape[0], dtype=torch.bool, device=dev)
    cmine[c0:c0 + cc] = True
    assert torch.equal(dq[~cmine], good[4][~cmine]) and not dq[cmine].any()


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
def test_episodes_kernel_is_deterministic_and_forward_only_mode(backend):
    from copa_fast.ops import symmetric_ce as ops

    dev = BACKEND_DEVICE[backend]
    eps = _episodes(torch.float32, 24, seed=5)
    args = _stack(eps, 0, 0, device=dev)
    tau = torch.full((len(eps),), 2.0, device=dev)
    a = ops.episodes_op(backend)(*args, tau, True)
    b = ops.episodes_op(backend)(*args, tau, True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    f = ops.episodes_op(backend)(*args, tau, False)
    assert torch.equal(f[0], a[0]) and f[3].numel() == 0


@pytest.mark.parametrize("backend", EPISODE_BACKENDS)
def test_episodes_op_opcheck(backend):
    from copa_fast.ops import symmetric_ce as ops

    dev = BACKEND_DEVICE[backend]
    eps = _episodes(torch.float32, 12, seed=7)[:3]
    z, q, y, rows, cls, s_off, s_total = _stack(eps, 0, 0, device=dev)
    tau = torch.full((3,), 2.0, device=dev)
    torch.library.opcheck(ops.episodes_op(backend), (z.requires_grad_(True), q.requires_grad_(True), y, rows, cls,
                                                     s_off, s_total, tau, True))


@needs_triton
def test_adapt_many_batched_equals_adapt_per_episode():
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=30, dim=20, seed=1)
    eps = [e.to(DEVICE) for e in sample_episodes(feats, labels, 5, seed=1, max_ways=8, max_support=60)]
    steps = 4
    got = copa_fast.adapt_many(eps, steps=steps, backend="triton", group_size=2)   # three groups
    for g, e in zip(got, eps, strict=True):
        want = copa_fast.adapt(e.support, e.support_labels, e.query, e.query_labels, steps=steps, backend="triton")
        assert rel_err(g.w_img, want.w_img) < 1e-5 and rel_err(g.w_proto, want.w_proto) < 1e-5
        assert g.losses == pytest.approx(want.losses, rel=1e-5)
        assert g.query_accuracy == want.query_accuracy
        assert g.losses[-1] < g.losses[0]
        # each episode's own adapted prototypes (C of its own, not the group's padded count)
        assert g.prototypes.shape == want.prototypes.shape == (int(e.support_labels.max()) + 1, 20)
        assert rel_err(g.prototypes, want.prototypes) < 1e-5
        assert ref.fraction_correct(g.predict(e.query), e.query_labels) == g.query_accuracy


@needs_triton
def test_adapt_many_batched_query_sets_of_every_kind():
    """One batched group holding an episode without a query set (accuracy None) and ragged ones with
    query sets of different lengths: each accuracy as adapt gives it (the group's predictions are
    formed in batched ops, classes past an episode's own masked off)."""
    x0, y0 = make_episode(30, 5, 12, seed=40)
    x1, y1 = make_episode(18, 3, 12, seed=41)
    x2, y2 = make_episode(24, 6, 12, seed=42)
    g = torch.Generator().manual_seed(43)
    q2 = x2[:7] + 0.3 * torch.randn(7, 12, generator=g)
    q0 = x0 + 0.3 * torch.randn(30, 12, generator=g)
    eps = [(x0, y0, q0, y0), (x1, y1, None, None), (x2, y2, q2, y2[:7])]
    eps = [tuple(None if t is None else t.to(DEVICE) for t in e) for e in eps]
    got = copa_fast.adapt_many(eps, steps=3, backend="triton")
    assert got[1].query_accuracy is None
    assert got[1].prototypes.shape == (3, 12)   # classes its query-less rows can still be given
    assert got[1].predict(x1).shape == (18,)
    for k in (0, 2):
        want = copa_fast.adapt(*eps[k], steps=3, backend="triton")
        assert got[k].query_accuracy == want.query_accuracy and 0 < want.query_accuracy <= 1
        assert ref.fraction_correct(got[k].predict(eps[k][2]), eps[k][3]) == got[k].query_accuracy


@needs_triton
def test_adapt_many_batched_reads_once_and_launches_per_group(monkeypatch):
    """The batched engine queues every group before reading anything: one read-back for the checks
    and ONE for the results (losses and query counts of every group), no item / nonzero; its
    computing operators do not grow with the number of episodes in a group (only views and the
    results' allocations do: the padding, the finiteness check and the results' copies are one
    multi-tensor call each — the finiteness check in its CUDA form, which a CPU trades for one
    aminmax a tensor); each result owns its storage (not a view of the group's stack)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    finiteness_check_form(monkeypatch, multi_tensor=True)

    def episodes(count):
        eps = []
        for k in range(count):
            x, y = make_episode(20, 4, 12, seed=60 + k)
            q = (None, None) if k == 1 else (x[:9] + 0.1, y[:9].int())
            eps.append(tuple(None if t is None else t.to(DEVICE) for t in (x, y, *q)))
        return eps

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    free = {"view", "select", "slice", "detach", "unbind", "transpose", "t", "unsqueeze", "expand", "alias",
            "as_strided", "split", "split_with_sizes", "reshape", "_unsafe_view", "empty", "empty_like", "lift_fresh"}
    counts = {}
    for count in (3, 6):
        eps = episodes(count)
        copa_fast.adapt_many(eps, steps=2, backend="triton")   # compiled / warmed
        with Count() as mode:
            copa_fast.adapt_many(eps, steps=2, backend="triton")
        counts[count] = sorted(op for op in mode.ops if op not in free)
        assert not {"item", "_local_scalar_dense", "nonzero"} & set(mode.ops)
    assert counts[3] == counts[6]
    reads = count_tolist_reads(monkeypatch)
    eps = episodes(7)
    got = copa_fast.adapt_many(eps, steps=3, backend="triton", group_size=2)   # four groups
    assert len(reads) == 2, reads
    for r, e in zip(got, eps, strict=True):
        for t in (r.w_img, r.w_proto, r.prototypes):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous()
        assert (r.query_accuracy is None) == (e[2] is None) and len(r.losses) == 3
    assert got[1].query_accuracy is None and 0 <= got[0].query_accuracy <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in AVAILABLE])
def test_adapt_many_on_a_gpu_synchronises_twice(backend):
    """On CUDA tensors adapt_many (and adapt) waits for the device twice in all: the checks' one
    read and the results' one read (torch's sync debug mode counts every blocking copy, item and
    nonzero; the episodes' sizes and offsets go to the device from pinned memory, queued)."""
    from conftest import CudaSyncs
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=16, per_class=30, dim=32, seed=4)
    eps = [e.to("cuda") for e in sample_episodes(feats, labels, 7, seed=4, max_ways=10, max_support=80)]
    eps[3] = type(eps[3])(eps[3].support, eps[3].support_labels, None, None)
    copa_fast.adapt_many(eps, steps=2, backend=backend, group_size=3)   # compiled / warmed
    with CudaSyncs() as syncs:
        got = copa_fast.adapt_many(eps, steps=3, backend=backend, group_size=3)   # three groups
    assert syncs.count == 2, syncs.messages
    assert got[3].query_accuracy is None and all(len(r.losses) == 3 for r in got)
    with CudaSyncs() as syncs:   # one episode by adapt: its checks, then its results
        one = copa_fast.adapt(eps[0].support, eps[0].support_labels, eps[0].query, eps[0].query_labels, steps=3,
                              backend=backend)
    assert syncs.count == 2 and one.query_accuracy is not None, syncs.messages


@needs_triton
def test_adapt_many_batched_float64_follows_reference():
    eps = []
    for k, (n, c) in enumerate([(30, 5), (12, 3), (25, 25)]):
        x, y = make_episode(n, c, 16, seed=20 + k, dtype=torch.float64)
        xq = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        eps.append((x.to(DEVICE), y.to(DEVICE), xq.to(DEVICE), y.to(DEVICE)))
    got = copa_fast.adapt_many(eps, steps=3, backend="triton")
    for g, (xs, ys, xq, yq) in zip(got, eps, strict=True):
        want = ref.adapt(xs.cpu(), ys.cpu(), xq.cpu(), yq.cpu(), steps=3)
        assert rel_err(g.w_img, want.w_img) < 1e-9 and rel_err(g.w_proto, want.w_proto) < 1e-9
        assert g.query_accuracy == want.query_accuracy
        assert rel_err(g.prototypes, want.prototypes) < 1e-9
        assert rel_err(g.scores(xq), want.scores(xq.cpu())) < 1e-9


def test_adapt_many_group_size_validated():
    with pytest.raises(ValueError, match="group_size"):
        copa_fast.adapt_many([], group_size=0)


# --- TF32 -------------------------------------------------------------------------------------------
# Documented bound (README): relative error against float64 <= 1e-3 (loss) and <= 5e-3 (gradients)
# for tau <= 5; <= 3e-2 for the gradients up to tau = 10.
TF32_TOL = {"loss": 1e-3, "grad": 5e-3}


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Rounds float32 to TF32 (10 mantissa bits, nearest, ties away), as tensor cores read operands."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _mm_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _tf32(a) @ _tf32(b)


def _mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three TF32 products: operands split into TF32 high and low parts, low x low dropped."""
    ah, bh = _tf32(a), _tf32(b)
    return ah @ bh + (ah @ _tf32(b - bh) + _tf32(a - ah) @ bh)


def _tf32_model(z, q, y, tau, mm=_mm_tf32):
    """The N x C form in float32 with the three products the kernel runs on tensor cores (S = zn qn^T,
    G qn, G^T zn) formed by ``mm``: the numerical model of precision='tf32' (or 'tf32x3')."""
    zn, qn = torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(q, dim=1)
    n, c, s = z.shape[0], q.shape[0], math.exp(tau)
    scores = s * mm(zn, qn.t())
    cnt = torch.bincount(y, minlength=c).float()
    r, l_ = torch.logsumexp(scores + cnt.log(), 1), torch.logsumexp(scores, 0)
    loss = (r + l_[y] - 2 * scores[torch.arange(n), y]).sum() / (2 * n)
    g = (cnt * torch.exp(scores - r[:, None]) + cnt * torch.exp(scores - l_)) / (2 * n)
    g[torch.arange(n), y] -= 1.0 / n
    dzn, dqn = s * mm(g, qn), s * mm(g.t(), zn)
    dz = (dzn - zn * (zn * dzn).sum(1, keepdim=True)) / z.norm(dim=1, keepdim=True)
    dq = (dqn - qn * (qn * dqn).sum(1, keepdim=True)) / q.norm(dim=1, keepdim=True)
    return loss, dz, dq


@pytest.mark.parametrize("tau", [2.0, 5.0])
def test_tf32_error_model_within_documented_bound(tau):
    x, y = make_episode(500, 50, 512, seed=30, dtype=torch.float64)
    p = ref.class_prototypes(x, y, 50)
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = ref.symmetric_ce(xr, pr, y, tau)
    want.backward()
    loss, dz, dq = _tf32_model(x.float(), p.float(), y, tau)
    assert_rel(loss, want, TF32_TOL["loss"], "tf32 loss")
    assert_rel(dz, xr.grad, TF32_TOL["grad"], "tf32 dz")
    assert_rel(dq, pr.grad, TF32_TOL["grad"], "tf32 dq")


@pytest.mark.parametrize("tau", [2.0, 5.0, 10.0])
def test_tf32x3_error_model_meets_the_float32_tolerances(tau):
    """precision='tf32x3' is documented with the float32 tolerances (loss 1e-5, gradients 1e-4): its
    model stays within them at every tau, and within 2x of plain float32 products' own error, give or
    take a few float32 roundings (the loss at tau = 10 differs by ~2 ulps between CPUs whose GEMM
    kernels round differently: 2.3e-7 against 2 x 4.1e-8 on a Xeon's MKL)."""
    x, y = make_episode(500, 50, 512, seed=30, dtype=torch.float64)
    p = ref.class_prototypes(x, y, 50)
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = ref.symmetric_ce(xr, pr, y, tau)
    want.backward()
    got = _tf32_model(x.float(), p.float(), y, tau, _mm_tf32x3)
    fp32 = _tf32_model(x.float(), p.float(), y, tau, torch.mm)
    for k, (name, expect) in enumerate((("loss", want), ("dz", xr.grad), ("dq", pr.grad))):
        tol = TOL[torch.float32]["loss" if k == 0 else "grad"]
        assert_rel(got[k], expect, tol, f"tf32x3 {name}")
        assert rel_err(got[k], expect) <= 2 * rel_err(fp32[k], expect) + 4 * torch.finfo(torch.float32).eps, name


@needs_triton
def test_tf32x3_kernel_meets_the_float32_tolerances():
    """On a GPU the kernels' real three-product path; under the interpreter the same call checks the
    plumbing. Weights and per-sample losses too."""
    x, y = make_episode(300, 30, 256, seed=34, dtype=torch.float64)
    p = ref.class_prototypes(x, y, 30)
    w = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(35))
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = (ref.symmetric_ce(xr, pr, y, 4.0, reduction="none") * w).sum()
    want.backward()
    a = x.float().to(DEVICE).requires_grad_(True)
    b = p.float().to(DEVICE).requires_grad_(True)
    per = copa_fast.symmetric_ce(a, b, y.to(DEVICE), 4.0, backend="triton", precision="tf32x3", reduction="none")
    loss = (per * w.float().to(DEVICE)).sum()
    loss.backward()
    assert_rel(loss, want, TOL[torch.float32]["loss"], "tf32x3 loss")
    assert_rel(a.grad, xr.grad, TOL[torch.float32]["grad"], "tf32x3 dz")
    assert_rel(b.grad, pr.grad, TOL[torch.float32]["grad"], "tf32x3 dq")


@needs_triton
def test_tf32_kernel_within_documented_bound():
    """On a GPU the kernel's real TF32 path; under the interpreter (which computes the products in
    float32) the same call checks the plumbing."""
    x, y = make_episode(300, 30, 256, seed=31, dtype=torch.float64)
    p = ref.class_prototypes(x, y, 30)
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = ref.symmetric_ce(xr, pr, y)
    want.backward()
    a = x.float().to(DEVICE).requires_grad_(True)
    b = p.float().to(DEVICE).requires_grad_(True)
    loss = copa_fast.symmetric_ce(a, b, y.to(DEVICE), backend="triton", precision="tf32")
    loss.backward()
    assert_rel(loss, want, TF32_TOL["loss"], "tf32 loss")
    assert_rel(a.grad, xr.grad, TF32_TOL["grad"], "tf32 dz")
    assert_rel(b.grad, pr.grad, TF32_TOL["grad"], "tf32 dq")


def test_precision_argument_validated():
    x, y = make_episode(20, 4, 8)
    with pytest.raises(ValueError, match="precision: expected one of"):
        copa_fast.symmetric_ce(x, x[:4], y, precision="fp16")
    with pytest.raises(ValueError, match="precision: 'tf32' is a tensor-core mode"):
        copa_fast.symmetric_ce(x, x[:4], y, backend="reference", precision="tf32")
    with pytest.raises(ValueError, match="precision: 'tf32x3' is a tensor-core mode of the triton backend"):
        copa_fast.symmetric_ce(x, x[:4], y, backend="reference", precision="tf32x3")
    if "cpu" in copa_fast.available_backends():
        w = torch.eye(8)
        with pytest.raises(ValueError, match="precision"):
            copa_fast.copa_loss(x, y, w, w, backend="cpu", precision="tf32")


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="needs the C++ extension")
def test_cpp_ops_take_a_precision_argument():
    """The C++ ops' `precision` (default "ieee"): checked by name; on the CPU kernels "tf32" is
    accepted (an allowance, not a demand) and gives the IEEE bits."""
    x, y = make_episode(30, 4, 12, seed=3)
    w, tau = torch.eye(12) + 0.1, torch.tensor(2.0)
    for op, args in ((torch.ops.copa_fast.symmetric_ce, (x, x[:4], y, tau, None, True)),
                     (torch.ops.copa_fast.copa_loss, (x, y, w, w, x, 4, tau, None, True))):
        ieee, tf32, default = op(*args, "ieee"), op(*args, "tf32"), op(*args)
        for a, b, c in zip(ieee, tf32, default, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
        with pytest.raises(ValueError, match="precision: expected 'ieee' or 'tf32', got 'fp16'"):
            op(*args, "fp16")


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in AVAILABLE, reason="no CUDA kernels here")
def test_cuda_tf32_within_documented_bound_and_switch_restored():
    """cuda with precision="tf32": the large-problem path's cuBLAS products may run on TF32 tensor
    cores (within the documented bound); torch's own TF32 switch is left as it was, either way."""
    n, c, d = 4500, 950, 48   # 4.27 M scores: the cuBLAS path
    x, y = make_episode(n, c, d, seed=32, dtype=torch.float64)
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = ref.symmetric_ce_nxc(xr, pr, y)
    want.backward()
    for switch in (False, True):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = switch
        try:
            a = x.float().cuda().requires_grad_(True)
            b = p.float().cuda().requires_grad_(True)
            loss = copa_fast.symmetric_ce(a, b, y.cuda(), backend="cuda", precision="tf32")
            loss.backward()
            assert torch.backends.cuda.matmul.allow_tf32 == switch
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        assert_rel(loss, want, TF32_TOL["loss"], "tf32 loss")
        assert_rel(a.grad, xr.grad, TF32_TOL["grad"], "tf32 dz")
        assert_rel(b.grad, pr.grad, TF32_TOL["grad"], "tf32 dq")




@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in AVAILABLE, reason="no CUDA kernels here")
def test_adapt_many_on_the_cuda_backend_equals_adapt():
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=30, dim=32, seed=2)
    eps = [e.to("cuda") for e in sample_episodes(feats, labels, 4, seed=2, max_ways=8, max_support=60)]
    got = copa_fast.adapt_many(eps, steps=5, backend="cuda")
    for g, e in zip(got, eps, strict=True):
        want = copa_fast.adapt(e.support, e.support_labels, e.query, e.query_labels, steps=5, backend="cuda")
        assert rel_err(g.w_img, want.w_img) < 1e-5 and g.query_accuracy == want.query_accuracy
        assert rel_err(g.prototypes, want.prototypes) < 1e-5
        assert ref.fraction_correct(g.predict(e.query), e.query_labels) == g.query_accuracy


@pytest.mark.skipif(not (HAS_TRITON and copa_fast.backends.triton_interpreted()),
                    reason="on a GPU every Triton test already runs the GPU tiles")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("odd_d", [False, True], ids=["D%16=0", "D%16!=0"])
def test_triton_gpu_tiles_under_the_interpreter(monkeypatch, dtype, odd_d):
    """The interpreter runs its own (larger) tiles; here the kernels run with the tiles a GPU launch
    uses for ``dtype`` and D (a D that is not a multiple of 16 takes narrower ones), at shapes with a
    ragged tail in every tile dimension (rows, classes, D)."""
    from copa_fast.ops import symmetric_ce as ops
    from copa_fast.triton import symmetric_ce as kernels

    real = kernels._launch_config
    monkeypatch.setattr(kernels, "_launch_config", lambda interpreted, *a, **kw: real(False, *a, **kw))
    d = real(False, dtype)[2] + (6 if odd_d else 16)
    gpu = real(False, dtype, d=d)
    n, c = max(gpu[0], gpu[1]) + 13, gpu[1] + 5   # every class present: N >= C
    x, y = make_episode(n, c, d, seed=41, dtype=torch.float64, one_shot=1)
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    xs, ps = x.to(dtype, copy=True).requires_grad_(True), p.to(dtype, copy=True).requires_grad_(True)
    loss = copa_fast.symmetric_ce(xs, ps, y, 3.0, backend="triton")
    loss.backward()
    xr, pr = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    want = ref.symmetric_ce(xr, pr, y, 3.0)
    want.backward()
    assert_rel(loss, want, TOL[dtype]["loss"], "loss")
    assert_rel(xs.grad, xr.grad, TOL[dtype]["grad"], "dembeddings")
    assert_rel(ps.grad, pr.grad, TOL[dtype]["grad"], "dprototypes")

    eps = _episodes(dtype, d)
    z, q, yy, rows, cls, s_off, s_total = _stack(eps, 2, 2, dtype, "cpu")
    taus = torch.full((len(eps),), 2.0, dtype=dtype)
    got, *_ = ops.episodes_op("triton")(z, q, yy, rows, cls, s_off, s_total, taus, False)
    for k, (xe, pe, ye) in enumerate(eps):
        assert_rel(got[k], ref.symmetric_ce(xe, pe, ye, 2.0), TOL[dtype]["loss"], f"episode {k} loss")
