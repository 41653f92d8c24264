"""symmetric_ce and copa_loss on every backend against the float64 reference (DESIGN §4)."""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import copa_fast
from copa_fast import reference as ref
from conftest import TOL, assert_rel, backend_device_pairs, make_episode, rel_err

# (N, C, D, one_shot): unequal counts, 1-shot classes, C = 1, C = N, N and D off any block size.
SHAPES = [
    (1, 1, 8, 0),
    (25, 5, 64, 0),
    (37, 37, 33, 0),
    (130, 1, 64, 0),
    (203, 17, 511, 3),
    (70, 12, 96, 5),
    (75, 40, 130, 2),
]
# The Triton interpreter runs every tile op through numpy: under it, the 511-wide shape is left to
# the compiled backends (75 x 40 x 130 still covers several ragged tiles on every axis).
INTERPRETER_SKIP = {(203, 17, 511, 3)}
PAIRS = backend_device_pairs()


def _shape_id(s):
    return "N{}-C{}-D{}-1shot{}".format(*s)


@pytest.mark.parametrize("shape", [(25, 5, 64, 0), (203, 17, 511, 3), (37, 37, 33, 0), (130, 1, 64, 0)],
                         ids=_shape_id)
def test_nxc_form_equals_published_nxn_form(shape):
    n, c, d, one = shape
    x, y = make_episode(n, c, d, seed=1, dtype=torch.float64, one_shot=one)
    p = torch.randn(c, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for tau in (0.0, 2.0, 4.5):
        for red in ("mean", "none"):
            a = ref.symmetric_ce(x, p, y, tau, reduction=red)
            b = ref.symmetric_ce_nxc(x, p, y, tau, reduction=red)
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _skip_slow_interpreted(backend, device, shape):
    if backend == "triton" and device == "cpu" and shape in INTERPRETER_SKIP:
        pytest.skip("511-wide shape left to compiled backends under the interpreter")


def _inputs(shape, dtype, device, seed):
    n, c, d, one = shape
    x, y = make_episode(n, c, d, seed=seed, dtype=torch.float64, one_shot=one)
    p = torch.randn(c, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    return x.to(dtype=dtype, device=device), p.to(dtype=dtype, device=device), y.to(device)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_symmetric_ce_matches_reference(backend, device, shape, dtype, reduction):
    _skip_slow_interpreted(backend, device, shape)
    x, p, y = _inputs(shape, dtype, device, seed=hash((shape, reduction)) % 1000)
    tau = torch.tensor(2.3, dtype=dtype, device=device, requires_grad=True)
    x.requires_grad_(True)
    p.requires_grad_(True)
    out = copa_fast.symmetric_ce(x, p, y, tau, reduction=reduction, backend=backend)
    x64, p64, t64 = (t.detach().double().requires_grad_(True) for t in (x, p, tau))
    expect = ref.symmetric_ce(x64, p64, y, t64, reduction=reduction)
    assert out.dtype == dtype and out.shape == expect.shape
    assert_rel(out, expect, TOL[dtype]["loss"], "loss")
    g = torch.rand(expect.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device) + 0.5
    got = torch.autograd.grad(out, (x, p, tau), g.to(dtype=dtype))
    want = torch.autograd.grad(expect, (x64, p64, t64), g)
    for name, a, b in zip(("embeddings", "prototypes", "tau"), got, want, strict=True):
        assert_rel(a, b, TOL[dtype]["grad"], f"d{name}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("tau", [0.0, 5.0, 10.0])
def test_large_tau_stays_accurate(backend, device, tau):
    # exp(10) ~ 22026: a fixed shift by the scale would underflow; maxima must be exact.
    x, p, y = _inputs((90, 9, 40, 1), torch.float32, device, seed=3)
    x.requires_grad_(True)
    out = copa_fast.symmetric_ce(x, p, y, tau, backend=backend)
    x64 = x.detach().double().requires_grad_(True)
    expect = ref.symmetric_ce(x64, p.double(), y, tau)
    assert torch.isfinite(out)
    assert_rel(out, expect, TOL[torch.float32]["loss"], "loss")
    (gx,) = torch.autograd.grad(out, x)
    (ex,) = torch.autograd.grad(expect, x64)
    assert_rel(gx, ex, TOL[torch.float32]["grad"], "dembeddings")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype,taus", [(torch.float32, (3.6, 3.75, 4.0)), (torch.float64, (5.8, 5.9, 7.0))],
                         ids=["float32", "float64"])
def test_scores_at_minus_scale_around_the_shift_switch(backend, device, dtype, taus):
    """Rows pointing away from every prototype (cosine ~ -1, so each of their scores sits at -s) beside
    aligned rows, at scales on both sides of where a kernel may switch from one fixed shift (exp(S - s),
    which reaches e^-2s) to exact maxima, and above it where e^-2s is no longer a normal number
    (float32 e^-109 at tau = 4, float64 e^-2194 at tau = 7): every loss and gradient finite and exact."""
    g = torch.Generator().manual_seed(11)
    n, c, d = 48, 6, 24
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=g), dim=0)
    p = u + 0.05 * torch.randn(c, d, dtype=torch.float64, generator=g)
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
    x = p[y] + 0.02 * torch.randn(n, d, dtype=torch.float64, generator=g)
    x[::2] = -u + 0.01 * torch.randn(n // 2, d, dtype=torch.float64, generator=g)
    x, p, y = x.to(dtype=dtype, device=device), p.to(dtype=dtype, device=device), y.to(device)
    for tau in taus:
        xs, ps = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        losses = copa_fast.symmetric_ce(xs, ps, y, tau, reduction="none", backend=backend)
        x64, p64 = (t.detach().double().requires_grad_(True) for t in (x, p))
        expect = ref.symmetric_ce(x64, p64, y, tau, reduction="none")
        assert torch.isfinite(losses).all(), f"tau={tau}: non-finite losses"
        assert_rel(losses, expect, TOL[dtype]["loss"], f"losses at tau={tau}")
        got = torch.autograd.grad(losses.mean(), (xs, ps))
        want = torch.autograd.grad(expect.mean(), (x64, p64))
        for name, a, b in zip(("dembeddings", "dprototypes"), got, want, strict=True):
            assert torch.isfinite(a).all(), f"tau={tau}: non-finite {name}"
            assert_rel(a, b, TOL[dtype]["grad"], f"{name} at tau={tau}")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_row_norms_across_magnitudes(backend, device, dtype):
    """Each row scaled by its own 2^k, from denormal rows to rows whose squares overflow: the norm's
    plain sum of squares where it is exact, the rescaled one where it would underflow or overflow
    (the cpu kernel switches at a sum of 2^-60 in float32, 2^-400 in float64), and rows whose norm
    falls under eps = 1e-12, which F.normalize does not bring to unit length. The top stays where
    the gradient (~ 1/|x|) is still a normal number; in float64 the range stays where the float64
    reference's own squares neither underflow nor overflow."""
    x, p, y = _inputs((48, 6, 40, 0), torch.float64, "cpu", seed=9)
    bottom, top = (-140, 90) if dtype == torch.float32 else (-500, 500)
    ks = torch.linspace(bottom, top, x.shape[0], dtype=torch.float64).round()
    x = x * torch.pow(2.0, ks).unsqueeze(1)
    x, p = x.to(dtype), p.to(dtype)
    assert torch.isfinite(x).all()
    xd = x.detach().to(device).requires_grad_(True)
    out = copa_fast.symmetric_ce(xd, p.to(device), y.to(device), reduction="none", backend=backend)
    x64 = x.double().requires_grad_(True)
    expect = ref.symmetric_ce(x64, p.double(), y, reduction="none")
    assert_rel(out, expect, TOL[dtype]["loss"], "per-sample losses")
    (gx,) = torch.autograd.grad(out.sum(), xd)
    (ex,) = torch.autograd.grad(expect.sum(), x64)
    # row by row: the gradient of a row scales as 1/|x_i|, so one relative error over all would
    # see only the smallest rows
    for i in range(x.shape[0]):
        assert_rel(gx[i], ex[i], TOL[dtype]["grad"], f"dembeddings row {i} (2^{int(ks[i])})")


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x, p, y = _inputs((64, 8, 48, 0), dtype, device, seed=4)
    x.requires_grad_(True)
    out = copa_fast.symmetric_ce(x, p, y, backend=backend)
    assert out.dtype == dtype
    x64 = x.detach().double().requires_grad_(True)
    expect = ref.symmetric_ce(x64, p.double(), y)
    # at most twice the error of PyTorch's own computation of the reference in the same precision
    # (or one unit in the last place of the result's dtype: the rounding of the output itself),
    # and inside the table's bound
    same = ref.symmetric_ce(x.detach(), p, y)
    assert same.dtype == dtype
    err = abs(out.double().item() - expect.item()) / abs(expect.item())
    torch_err = abs(same.double().item() - expect.item()) / abs(expect.item())
    assert err <= max(2 * torch_err, torch.finfo(dtype).eps), (err, torch_err)
    assert err <= TOL[dtype]["loss"]
    (gx,) = torch.autograd.grad(out, x)
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all()
    (ex,) = torch.autograd.grad(expect, x64)
    assert_rel(gx, ex, TOL[dtype]["grad"], "dembeddings")
    xl = x.detach().clone().requires_grad_(True)
    (sx,) = torch.autograd.grad(ref.symmetric_ce(xl, p, y), xl)
    grad_err, torch_grad_err = rel_err(gx, ex), rel_err(sx, ex)
    assert grad_err <= max(2 * torch_grad_err, torch.finfo(dtype).eps), (grad_err, torch_grad_err)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_stats_match_published_return_shape(backend, device):
    x, p, y = _inputs((80, 10, 32, 0), torch.float32, device, seed=5)
    loss, stats = copa_fast.symmetric_ce_with_stats(x, p, y, backend=backend)
    rloss, rstats = ref.symmetric_ce_with_stats(x.double(), p.double(), y)
    assert set(stats) == {"loss", "acc"}
    assert stats["loss"] == pytest.approx(rstats["loss"], rel=1e-5)
    assert stats["acc"] == pytest.approx(rstats["acc"], abs=1e-9)
    assert 0.0 < stats["acc"] < 1.0  # the random episode is neither trivial nor hopeless


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("shape", [(25, 5, 64, 0), (203, 17, 130, 3), (40, 40, 24, 0), (30, 1, 16, 0)],
                         ids=_shape_id)
@pytest.mark.parametrize("separate_protos", [False, True])
def test_copa_loss_matches_reference(backend, device, shape, separate_protos):
    n, c, d, one = shape
    x, y = make_episode(n, c, d, seed=6, dtype=torch.float64, one_shot=one)
    gen = torch.Generator().manual_seed(8)
    wi = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, dtype=torch.float64, generator=gen)
    wp = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, dtype=torch.float64, generator=gen)
    pf = x + torch.randn(n, d, dtype=torch.float64, generator=gen) if separate_protos else None
    tau = torch.tensor(1.7, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_(True) for t in (x, wi, wp, tau)]
    pf64 = pf.clone().requires_grad_(True) if pf is not None else None
    expect = ref.copa_loss(leaves64[0], y, leaves64[1], leaves64[2], leaves64[3], prototype_features=pf64)
    leaves = [t.float().to(device).requires_grad_(True) for t in (x, wi, wp, tau)]
    pf32 = pf.float().to(device).requires_grad_(True) if pf is not None else None
    out = copa_fast.copa_loss(leaves[0], y.to(device), leaves[1], leaves[2], leaves[3],
                              prototype_features=pf32, backend=backend)
    assert_rel(out, expect, TOL[torch.float32]["loss"], "loss")
    wrt = leaves + ([pf32] if pf32 is not None else [])
    wrt64 = leaves64 + ([pf64] if pf64 is not None else [])
    got = torch.autograd.grad(out, wrt)
    want = torch.autograd.grad(expect, wrt64)
    names = ("features", "w_img", "w_proto", "tau", "prototype_features")[:len(got)]
    for name, a, b in zip(names, got, want, strict=True):
        assert_rel(a, b, TOL[torch.float32]["grad"], f"d{name}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gradcheck_float64(backend, device):
    x, p, y = _inputs((13, 4, 9, 1), torch.float64, device, seed=9)
    tau = torch.tensor(1.3, dtype=torch.float64, device=device)
    args = [t.requires_grad_(True) for t in (x, p, tau)]
    # fast mode (random projections) under the interpreter, where each evaluation is slow
    fast = backend == "triton" and device == "cpu"
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, t: copa_fast.symmetric_ce(a, b, y, t, reduction=red, backend=backend), args,
            fast_mode=fast)
    wi = (torch.eye(9, dtype=torch.float64, device=device) + 0.1).requires_grad_(True)
    wp = (torch.eye(9, dtype=torch.float64, device=device) - 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, u, v, t: copa_fast.copa_loss(a, y, u, v, t, backend=backend), [args[0], wi, wp, args[2]],
        fast_mode=fast)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_opcheck(backend, device):
    from copa_fast.ops import symmetric_ce as ops

    op = ops.triton_op() if backend == "triton" else ops.cpp_op()
    x, p, y = _inputs((21, 6, 10, 0), torch.float32, device, seed=10)
    tau = torch.tensor(2.0, device=device)
    for fused in (True, False):
        for w in (None, torch.rand(21, device=device)):
            args = (x.clone().requires_grad_(True), p.clone().requires_grad_(True), y, tau, w, fused)
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_deterministic(backend, device):
    x, p, y = _inputs((150, 12, 70, 2), torch.float32, device, seed=11)
    outs = []
    for _ in range(2):
        a, b = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = copa_fast.symmetric_ce(a, b, y, backend=backend)
        loss.backward()
        outs.append((loss.detach(), a.grad, b.grad))
    for u, v in zip(*outs, strict=True):
        assert torch.equal(u, v)


# the outputs of copa_fast::copa_loss, in order
_STEP_OUTPUTS = ("loss", "losses", "pred", "dz", "dq", "p0", "dtau")

_ISA_SCRIPT = """
import sys, torch
import copa_fast  # noqa: F401  (registers the ops)
out = []
for n, c, d, tau, dtype in 2 * [(203, 17, 511, 2.0, torch.float32), (60, 60, 33, 6.0, torch.float32),
                                (75, 9, 130, 2.0, torch.float64)]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1] *= 2.0 ** -140
    x[2] *= 2.0 ** 70
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
    wi = torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)
    x, wi = x.to(dtype), wi.to(dtype)
    out.append(torch.ops.copa_fast.copa_loss(x, y, wi, wi.t().contiguous(), x.flip(0), c,
                                             torch.tensor(tau, dtype=dtype), None, True))
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif("cpu" not in copa_fast.available_backends(), reason="needs the C++ extension")
def test_cpu_row_kernel_copies_give_the_same_bits(tmp_path):
    """The cpu kernels' row loops are compiled once per instruction set (baseline, AVX2, AVX-512;
    csrc/cpu/row_kernels.inc) and the widest the CPU runs is picked at load: every copy must give
    the same bits (fixed lane order, no contracted multiply-adds), so the machine moves only time.
    COPA_FAST_CPU_ISA lowers the choice; each copy runs in a fresh process, which runs the problems
    twice: a process's first step must give the bits of its later ones (ATen's float exp, which
    the kernel no longer calls, did not always: see csrc/cpu/symmetric_ce.cpp)."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_ISA_SCRIPT)
    outs = {}
    for isa in ("baseline", "avx2", "native"):
        env = dict(os.environ, COPA_FAST_CPU_ISA=isa)
        r = subprocess.run([sys.executable, str(script), str(tmp_path / f"{isa}.pt")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[isa] = torch.load(tmp_path / f"{isa}.pt")
        half = len(outs[isa]) // 2
        for k, (a, b) in enumerate(zip(outs[isa][:half], outs[isa][half:], strict=True)):
            for name, u, v in zip(_STEP_OUTPUTS, a, b, strict=True):
                assert torch.equal(u, v), f"problem {k}, {name}: the {isa} copy's first call differs from its second"
    for isa in ("avx2", "native"):
        for k, (a, b) in enumerate(zip(outs["baseline"], outs[isa], strict=True)):
            for name, u, v in zip(_STEP_OUTPUTS, a, b, strict=True):
                assert torch.equal(u, v), f"problem {k}, {name}: {isa} copy differs from the baseline copy"


@pytest.mark.skipif("cpu" not in copa_fast.available_backends(), reason="needs the C++ extension")
def test_cpu_kernel_passes_do_not_depend_on_the_thread_count():
    """The cpu kernel's own reductions (class means by rows in order, the N x C sums per 32-row block
    combined in block order, dtau) give the same bits on one thread and on two: a float reduction
    with per-thread partial sums (at::parallel_reduce) fails here. dq is left out: its product
    G^T zn reduces over N inside MKL, which splits that sum by thread from N ~ 1000."""
    outs = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = []
            for n, c, d, tau in [(1000, 100, 96, 2.0), (700, 37, 130, 5.0)]:
                g = torch.Generator().manual_seed(n)
                x = torch.randn(n, d, generator=g)
                y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
                wi = torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)
                runs.append(torch.ops.copa_fast.copa_loss(x, y, wi, wi.t().contiguous(), x.flip(0), c,
                                                          torch.tensor(tau), None, True))
            outs[threads] = runs
    finally:
        torch.set_num_threads(before)
    for k, (a, b) in enumerate(zip(outs[1], outs[2], strict=True)):
        for name, u, v in zip(_STEP_OUTPUTS, a, b, strict=True):
            if name != "dq":
                assert torch.equal(u, v), f"problem {k}, {name}: one thread and two differ"


@pytest.mark.parametrize("backend,device", PAIRS)
def test_copa_loss_deterministic(backend, device):
    x, y = make_episode(150, 12, 70, seed=13, device=device)
    outs = []
    for _ in range(2):
        head = copa_fast.CoPAHead(70, backend=backend).to(device)
        with torch.no_grad():
            head.w_img.add_(0.01 * torch.randn(70, 70, generator=torch.Generator().manual_seed(3)).to(device))
        feats = x.clone().requires_grad_(True)
        loss = head(feats, y)
        loss.backward()
        outs.append((loss.detach(), feats.grad, head.w_img.grad, head.w_proto.grad))
    for u, v in zip(*outs, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + PAIRS)
def test_calls_from_several_threads_give_the_same_bits(backend, device):
    """Steps called from four Python threads at once (a data-loading or serving process) give each
    call the bits it gives alone: no state shared between calls (tau cache, scratch, dispatch). Under
    Triton's interpreter, whose launches keep state in globals, the launchers serialise them."""
    import threading

    def problem(k):
        g = torch.Generator().manual_seed(100 + k)
        n, c, d = 20 + 3 * k, 2 + k % 5, 17 + k
        x, y = make_episode(n, c, d, seed=200 + k, device=device)
        wi = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)).to(device).requires_grad_(True)
        wp = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)).to(device).requires_grad_(True)
        return x, y, wi, wp, 0.5 + 0.4 * k

    def run(k):
        x, y, wi, wp, tau = problem(k)
        loss = copa_fast.copa_loss(x, y, wi, wp, tau, backend=backend)
        loss.backward()
        return loss.detach(), wi.grad, wp.grad

    alone = {k: run(k) for k in range(8)}
    failures = []

    def worker(ks):
        try:
            for _ in range(5):
                for k in ks:
                    for u, v in zip(run(k), alone[k], strict=True):
                        if not torch.equal(u, v):
                            failures.append(f"problem {k}: bits differ from the call alone")
        except Exception as e:   # noqa: BLE001 — reported below with the problem
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(list(range(i, 8, 4)),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


@pytest.mark.parametrize("backend,device", PAIRS)
def test_torch_compile_fullgraph(backend, device):
    x, y = make_episode(40, 5, 16, seed=12, device=device)
    head = copa_fast.CoPAHead(16, backend=backend).to(device)

    def step(feats, labels):
        return head(feats, labels, num_classes=5)

    eager = step(x, y)
    eager.backward()
    g_eager = head.w_img.grad.clone()
    head.zero_grad()
    # the forward (with the op's autograd) is traced as one graph; backward runs through AOT autograd
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(head.w_img.grad, g_eager)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + PAIRS)
def test_torch_compile_without_num_classes(backend, device):
    """A compiled model that leaves num_classes out, as eager code may, runs: C is read from the
    labels outside the graph (a graph break), with the value checks, so a bad label still raises
    ValueError naming it; with fullgraph=True the error says to pass num_classes."""
    x, y = make_episode(30, 4, 12, seed=21, device=device)
    head = copa_fast.CoPAHead(12, backend=backend, learn_tau=True).to(device)
    with torch.no_grad():
        head.w_img.add_(0.1 * torch.randn(12, 12, generator=torch.Generator().manual_seed(22)).to(device))
    eager = head(x, y)
    want = torch.autograd.grad(eager, [head.w_img, head.w_proto, head.tau])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head, backend=counter)
    out = compiled(x, y)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for u, v in zip(torch.autograd.grad(out, [head.w_img, head.w_proto, head.tau]), want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    assert counter.frame_count >= 1   # the step after the break was compiled, not run in eager
    bad = y.clone()
    bad[bad == 2] = 3   # class 2 left empty
    with pytest.raises(ValueError, match="labels: every class"):
        compiled(x, bad)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="num_classes=C"):
        torch.compile(head, fullgraph=True, backend="aot_eager")(x, y)
    torch._dynamo.reset()
    if backend == "reference":   # the public class means take the same road
        means = torch.compile(copa_fast.class_means, backend="aot_eager")
        torch.testing.assert_close(means(x, y), copa_fast.class_means(x, y), rtol=0, atol=0)
        with pytest.raises(ValueError, match="labels: every class"):
            means(x, bad)
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match="num_classes=C"):
            torch.compile(copa_fast.class_means, fullgraph=True, backend="aot_eager")(x, y)
        torch._dynamo.reset()


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + PAIRS)
@pytest.mark.parametrize("learn_tau", [False, True], ids=["tau-float", "tau-tensor"])
def test_torch_compile_dynamic_shapes(backend, device, learn_tau):
    """Episodes change N and C every step: one graph compiled with dynamic=True serves them all
    (the value checks of a float tau once broke Dynamo there), with eager's loss and gradients."""
    d = 12

    def step(feats, labels, w_img, w_proto, tau, c):
        a = copa_fast.copa_loss(feats, labels, w_img, w_proto, tau, num_classes=c, backend=backend,
                                check_inputs=False)
        b = copa_fast.symmetric_ce(feats @ w_img.t(), feats[:c] @ w_proto.t(), labels, tau,
                                   backend=backend, check_inputs=False)
        return a + b

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    g = torch.Generator().manual_seed(15)
    w_img = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)).to(device).requires_grad_(True)
    w_proto = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)).to(device).requires_grad_(True)
    for i, (n, c) in enumerate([(20, 4), (33, 7), (9, 9)]):
        x, y = make_episode(n, c, d, seed=n, device=device)
        x.requires_grad_(True)
        tau = torch.tensor(1.5, device=device, requires_grad=True) if learn_tau else 1.5
        wanted = [x, w_img, w_proto] + ([tau] if learn_tau else [])
        out = compiled(x, y, w_img, w_proto, tau, c)
        if i == 0:
            first = counter.frame_count   # the graphs the first call made
        grads = torch.autograd.grad(out, wanted)
        eager = step(x, y, w_img, w_proto, tau, c)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
        for u, v in zip(grads, torch.autograd.grad(eager, wanted), strict=True):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)
    assert counter.frame_count == first, "a new episode shape recompiled the step"
    if backend != "reference":   # the kernels' policy for a label out of range, in the compiled graph too
        x, y = make_episode(20, 4, d, seed=16, device=device)
        y[3] = 4
        x.requires_grad_(True)
        out = compiled(x, y, w_img, w_proto, tau, 4)
        (gx,) = torch.autograd.grad(out, [x])
        assert torch.isnan(out) and torch.isnan(gx[3]).all()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_gradient_reaches_backbone_features(backend, device):
    x, y = make_episode(48, 6, 20, seed=13, device=device)
    backbone = torch.nn.Linear(20, 20).to(device)
    head = copa_fast.CoPAHead(20, backend=backend).to(device)
    head(backbone(x), y).backward()
    assert backbone.weight.grad is not None and backbone.weight.grad.abs().sum() > 0
    assert head.w_img.grad.abs().sum() > 0 and head.w_proto.grad.abs().sum() > 0


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + PAIRS)
def test_copa_loss_adapters_of_another_dtype(backend, device):
    """float64 adapters (a user's double parameters) with float32 features: computed in the features'
    dtype on every backend, the reference included; each gradient in its own tensor's dtype."""
    x, y = make_episode(30, 5, 16, seed=17, device=device)
    g = torch.Generator().manual_seed(17)
    w_img = (torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, generator=g, dtype=torch.float64))
    w_proto = (torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, generator=g, dtype=torch.float64))
    w_img, w_proto = (w.to(device).requires_grad_(True) for w in (w_img, w_proto))
    loss = copa_fast.copa_loss(x, y, w_img, w_proto, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert w_img.grad.dtype == torch.float64 and w_proto.grad.dtype == torch.float64
    # the float64 reference of the same problem with the adapters rounded to float32, as computed
    wi, wp = (w.detach().float().double().requires_grad_(True) for w in (w_img, w_proto))
    expected = ref.copa_loss(x.double(), y, wi, wp)
    expected.backward()
    assert_rel(loss, expected, TOL[torch.float32]["loss"], "loss")
    assert_rel(w_img.grad, wi.grad, TOL[torch.float32]["grad"], "w_img grad")
    assert_rel(w_proto.grad, wp.grad, TOL[torch.float32]["grad"], "w_proto grad")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_autocast_bfloat16_region(backend, device):
    """copa_loss inside torch.autocast(bf16): the adapter GEMMs run in bf16 (autocast's choice), the
    loss in float32; values stay within bf16 rounding of the float64 reference, gradients flow."""
    x, y = make_episode(60, 6, 32, seed=14, device=device)
    g = torch.Generator().manual_seed(14)
    w_img = (torch.eye(32) + 0.05 * torch.randn(32, 32, generator=g)).to(device).requires_grad_(True)
    w_proto = (torch.eye(32) + 0.05 * torch.randn(32, 32, generator=g)).to(device).requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = copa_fast.copa_loss(x, y, w_img, w_proto, backend=backend)
    loss.backward()
    want = ref.copa_loss(x.double(), y, w_img.detach().double().requires_grad_(True),
                         w_proto.detach().double())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_rel(loss, want, TOL[torch.bfloat16]["loss"], "loss under autocast(bf16)")
    assert w_img.grad.dtype == torch.float32 and torch.isfinite(w_img.grad).all() and w_img.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in copa_fast.available_backends(), reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_large_problem_path_matches_reference(dtype):
    """From 2^22 scores (N x C) the cuda backend runs one phase a launch with cuBLAS products
    (csrc/cuda/binding.cpp); CI checks that path's kernels on the host (test_cuda_kernels_host.py),
    this the whole of it on the GPU, TF32 switched on globally included (it must stay IEEE)."""
    n, c, d = 4500, 950, 48   # 4.27 M scores
    x, y = make_episode(n, c, d, seed=31, dtype=dtype, device="cuda")
    p = torch.randn(c, d, generator=torch.Generator().manual_seed(32), dtype=dtype).cuda()
    tau = torch.tensor(3.0, dtype=dtype, device="cuda", requires_grad=True)
    xs, ps = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        loss = copa_fast.symmetric_ce(xs, ps, y, tau, backend="cuda")
        grads = torch.autograd.grad(loss, (xs, ps, tau))
        again = copa_fast.symmetric_ce(xs, ps, y, tau, backend="cuda")
        assert torch.equal(loss, again)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.backends.cuda.matmul.allow_tf32 == old
    x64, p64, t64 = (t.detach().double().requires_grad_(True) for t in (x, p, tau))
    want = ref.symmetric_ce_nxc(x64, p64, y, t64)
    want_grads = torch.autograd.grad(want, (x64, p64, t64))
    assert_rel(loss, want, TOL[dtype]["loss"], "loss")
    for name, a, b in zip(("dembeddings", "dprototypes", "dtau"), grads, want_grads, strict=True):
        assert_rel(a, b, TOL[dtype]["grad"], name)


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in copa_fast.available_backends(), reason="needs the CUDA kernels and a GPU")
def test_cuda_large_copa_step_matches_reference_within_its_memory_budget():
    """copa_loss on cuda at a large-path size: its rows normalised over its own z (csrc/cuda/binding.cpp),
    so one step's extra memory is the scores S, two N x D buffers (z/zn and dz) and C x D ones — the
    C x N one-hot of the class means freed before they exist. Gradients against float64."""
    n, c, d = 8192, 600, 256   # 4.9 M scores: the phased path
    x, y = make_episode(n, c, d, seed=33, device="cuda")
    g = torch.Generator().manual_seed(34)
    wi, wp = (torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)).cuda(), torch.eye(d).cuda()
    wi.requires_grad_(True), wp.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = copa_fast.copa_loss(x, y, wi, wp, 2.0, num_classes=c, backend="cuda", check_inputs=False)
    gi, gp = torch.autograd.grad(loss, (wi, wp))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = 4 * (n * c + 2 * n * d + 8 * c * d + 4 * d * d) + 2**20
    assert extra <= budget, f"{extra / 2**20:.1f} MiB > {budget / 2**20:.1f} MiB"
    w64 = [t.detach().double().requires_grad_(True) for t in (wi, wp)]
    x64 = x.double()
    want = ref.symmetric_ce_nxc(x64 @ w64[0].t(), ref.class_prototypes(x64, y, c) @ w64[1].t(), y, 2.0)
    want_grads = torch.autograd.grad(want, w64)
    assert_rel(loss, want, TOL[torch.float32]["loss"], "loss")
    for name, a, b in zip(("dw_img", "dw_proto"), (gi, gp), want_grads, strict=True):
        assert_rel(a, b, TOL[torch.float32]["grad"], name)


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in copa_fast.available_backends(), reason="needs the CUDA kernels and a GPU")
def test_cuda_ops_take_tau_from_the_cpu():
    """The C++ ops called directly (as torch.compile's graphs do) with CUDA rows and a CPU tau: the
    kernel reads tau through a device pointer, so the binding must move it (a host pointer there
    would be an illegal access)."""
    x, y = make_episode(60, 6, 32, seed=21, device="cuda")
    w = torch.eye(32, device="cuda") + 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    p = torch.randn(6, 32, device="cuda")
    for tau in (torch.tensor(2.5), torch.tensor([2.5], dtype=torch.float64)):
        got = torch.ops.copa_fast.symmetric_ce(x, p, y, tau, None, True)
        want = torch.ops.copa_fast.symmetric_ce(x, p, y, tau.cuda().float().reshape(()), None, True)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        got = torch.ops.copa_fast.copa_loss(x, y, w, w, x, 6, tau, None, True)
        want = torch.ops.copa_fast.copa_loss(x, y, w, w, x, 6, tau.cuda().float().reshape(()), None, True)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    expect = ref.copa_loss(x.double(), y, w.double(), w.double(), 2.5)
    assert_rel(got[0], expect, TOL[torch.float32]["loss"], "loss")


@pytest.mark.cuda
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[1] == "cuda"])
def test_cuda_graph_capture_replays_a_training_step(backend, device):
    """A copa_loss step captured in a CUDA graph (check_inputs=False: no host sync) replays to the
    same loss and gradients as eager, with new data copied into the static inputs."""
    x, y = make_episode(120, 12, 64, seed=15, device=device)
    x2, _ = make_episode(120, 12, 64, seed=16, device=device)
    w_img = torch.eye(64, device=device, requires_grad=True)
    w_proto = torch.eye(64, device=device, requires_grad=True)
    static_x = x.clone()

    def step():
        loss = copa_fast.copa_loss(static_x, y, w_img, w_proto, num_classes=12, backend=backend,
                                   check_inputs=False)
        loss.backward()
        return loss

    w_img.grad = torch.zeros_like(w_img)
    w_proto.grad = torch.zeros_like(w_proto)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for data in (x, x2):
        static_x.copy_(data)
        w_img.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        a = data.clone()
        wi = w_img.detach().clone().requires_grad_(True)
        want = copa_fast.copa_loss(a, y, wi, w_proto.detach(), backend=backend)
        want.backward()
        torch.testing.assert_close(static_loss, want)
        torch.testing.assert_close(w_img.grad, wi.grad)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p.values[1] == "cuda"])
def test_a_gpu_step_synchronises_only_for_its_checks(backend, device):
    """A training step (copa_loss forward and backward) on CUDA tensors never waits for the device
    with check_inputs=False, and once with the checks on (their one read)."""
    from conftest import CudaSyncs

    x, y = make_episode(120, 12, 64, seed=17, device=device)
    w_img = torch.eye(64, device=device, requires_grad=True)
    w_proto = torch.eye(64, device=device, requires_grad=True)
    for check, want in ((False, 0), (True, 1)):
        copa_fast.copa_loss(x, y, w_img, w_proto, num_classes=12, backend=backend, check_inputs=check).backward()
        with CudaSyncs() as syncs:
            loss = copa_fast.copa_loss(x, y, w_img, w_proto, num_classes=12, backend=backend, check_inputs=check)
            loss.backward()
        assert syncs.count == want, (check, syncs.messages)


# --- the fused CoPA step ops: copa_fast::copa_loss (cpu, cuda) and copa_loss_triton -------------------
def _step_op(backend):
    from copa_fast.ops import symmetric_ce as ops

    return ops.triton_step_op() if backend == "triton" else ops.copa_op()


# every (backend, device) whose step op exists here (both need the extension: schema and autograd)
STEP_PAIRS = [p for p in PAIRS if copa_fast._extension.loaded() and _step_op(p.values[0]) is not None]
TRITON_STEP_CPU = any(p.values == ("triton", "cpu") for p in STEP_PAIRS)


def _step_inputs(n, c, d, e, seed, device="cpu", dtype=torch.float64):
    x, y = make_episode(n, c, d, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    wi = torch.eye(e, d, dtype=torch.float64) + 0.05 * torch.randn(e, d, dtype=torch.float64, generator=gen)
    wp = torch.eye(e, d, dtype=torch.float64) + 0.05 * torch.randn(e, d, dtype=torch.float64, generator=gen)
    return x.to(device, dtype), y.to(device), wi.to(device, dtype), wp.to(device, dtype)


@pytest.mark.skipif("cpu" not in copa_fast.available_backends(), reason="needs the C++ extension")
def test_cpp_autograd_nodes_print_by_name():
    """A loss's repr names its backward (torch prints the C++ node type's name after its last "::")."""
    from copa_fast.ops import symmetric_ce as ops

    x, y = make_episode(12, 3, 8, seed=4, dtype=torch.float32)
    z = x.clone().requires_grad_(True)
    q = torch.randn(3, 8)
    assert "grad_fn=<SymmetricCEBackward>" in repr(copa_fast.symmetric_ce(z, q, y, backend="cpu"))
    loss = ops.episodes_op("cpu")(z, q, y, torch.tensor([[0, 12]]), torch.tensor([[0, 3]]), torch.tensor([0]), 36,
                                  torch.tensor([2.0]), True)[0]
    assert "grad_fn=<EpisodesSCEBackward>" in repr(loss)


@pytest.mark.parametrize("backend,device", STEP_PAIRS)
@pytest.mark.parametrize("e", [23, 17], ids=lambda e: f"E{e}")   # square and non-square adapters
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("frozen_features", [True, False])
def test_fused_step_matches_reference(backend, device, e, reduction, frozen_features):
    """The adapter-training case (features frozen: no input gradients formed) and the backbone
    case, against the float64 reference; non-square (E, D) adapters included."""
    x, y, wi, wp = _step_inputs(61, 7, 23, e, seed=30, device=device)
    leaves64 = [x.clone().requires_grad_(not frozen_features), wi.clone().requires_grad_(True),
                wp.clone().requires_grad_(True)]
    expect = ref.copa_loss(*leaves64[:1], y, *leaves64[1:], 2.5, reduction=reduction)
    leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves64]
    inputs = [t.detach().clone() for t in leaves]
    out = copa_fast.copa_loss(leaves[0], y, leaves[1], leaves[2], 2.5, reduction=reduction, backend=backend)
    assert type(out.grad_fn).__name__ == "CppFunction"   # the step op with its C++ autograd, not a composite
    # its node prints by name: grad_fn=<CopaLossBackward>> (torch keeps the C++ type name's last part)
    node = "CopaLossTritonBackward" if backend == "triton" else "CopaLossBackward"
    assert f"grad_fn=<{node}>" in repr(out), repr(out)
    assert_rel(out, expect, TOL[torch.float32]["loss"], "loss")
    wrt = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(out, wrt)
    want = torch.autograd.grad(expect, [t for t in leaves64 if t.requires_grad])
    for a, b in zip(got, want, strict=True):
        assert_rel(a, b, TOL[torch.float32]["grad"], "grad")
    for a, b in zip(leaves, inputs, strict=True):   # the step normalises its own adapted rows in place, never an input
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("backend,device", [p for p in STEP_PAIRS if p.values[0] == "triton"])
def test_triton_step_normalises_its_own_rows_in_place(monkeypatch, backend, device):
    """copa_loss_triton hands the kernels its own z = x w_img^T and q = p0 w_proto^T, whose rows the
    first launch normalises in place (one N x E buffer fewer at the peak); symmetric_ce's z and q
    are the caller's and get buffers of their own."""
    from copa_fast.triton import symmetric_ce as kernels

    seen = []
    real = kernels._Setup.carve

    def spy(self, extra):
        out = real(self, extra)
        seen.append((self.zn.data_ptr() == self.z.data_ptr(), self.qn.data_ptr() == self.q.data_ptr()))
        return out

    monkeypatch.setattr(kernels._Setup, "carve", spy)
    x, y, wi, wp = _step_inputs(30, 4, 12, 12, seed=35, device=device, dtype=torch.float32)
    copa_fast.copa_loss(x, y, wi.requires_grad_(True), wp, backend=backend).backward()
    z, q = x @ wi.detach().t(), x[:4] @ wp.t()
    copa_fast.symmetric_ce(z, q, y, backend=backend)
    assert seen == [(True, True), (False, False)]


@pytest.mark.parametrize("backend,device", [p for p in STEP_PAIRS if p.values[0] == "triton"])
def test_triton_step_takes_the_precision(backend, device):
    """copa_loss's precision reaches the Triton step's kernels: "tf32x3" within the float32
    tolerances (on a GPU three TF32 products a product; under the interpreter the plumbing), an
    unknown one refused by the op, naming the argument."""
    x, y, wi, wp = _step_inputs(40, 5, 24, 24, seed=37, device=device)
    leaves64 = [t.clone().requires_grad_(True) for t in (wi, wp)]
    expect = ref.copa_loss(x, y, *leaves64, 3.0)
    want = torch.autograd.grad(expect, leaves64)
    leaves = [t.detach().float().requires_grad_(True) for t in leaves64]
    out = copa_fast.copa_loss(x.float(), y, *leaves, 3.0, backend=backend, precision="tf32x3")
    assert_rel(out, expect, TOL[torch.float32]["loss"], "loss")
    for a, b in zip(torch.autograd.grad(out, leaves), want, strict=True):
        assert_rel(a, b, TOL[torch.float32]["grad"], "grad")
    with pytest.raises(ValueError, match="precision: expected one of"):
        _step_op(backend)(x.float(), y, *leaves, x.float(), 5, torch.tensor(3.0, device=device), None, True, "fp8")


@pytest.mark.skipif(not TRITON_STEP_CPU, reason="needs the Triton step op and its interpreter")
def test_triton_ops_refuse_cpu_tensors_when_compiled(monkeypatch):
    """Called directly with CPU tensors while the kernels are compiled for a GPU, the Triton ops say
    so, naming the argument, instead of failing inside Triton's launcher."""
    from copa_fast.ops import symmetric_ce as ops
    from copa_fast.triton import symmetric_ce as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    x, y, wi, wp = _step_inputs(12, 3, 6, 6, seed=36, dtype=torch.float32)
    tau = torch.tensor(2.0)
    with pytest.raises(ValueError, match="x: the Triton kernels take CUDA tensors"):
        ops.triton_step_op()(x, y, wi, wp, x, 3, tau, None, True)
    with pytest.raises(ValueError, match="z: the Triton kernels take CUDA tensors"):
        ops.triton_op()(x, x[:3], y, tau, None, True)


@pytest.mark.parametrize("backend,device", STEP_PAIRS)
def test_fused_step_opcheck(backend, device):
    x, y, wi, wp = _step_inputs(21, 6, 10, 8, seed=31, device=device, dtype=torch.float32)
    pf = x + 0.3 * torch.randn_like(x)
    tau = torch.tensor(2.0, device=device)
    cases = ((True, True), (True, False), (False, False))
    weights = (None, torch.rand(21, device=device))
    if backend == "triton" and device == "cpu":   # each case runs the interpreter ~10 times
        cases, weights = cases[:2], weights[1:]
    for fused, inputs in cases:
        for w in weights:
            grad = [fused and inputs, fused, fused, fused and inputs]
            args = (x.clone().requires_grad_(grad[0]), y, wi.clone().requires_grad_(grad[1]),
                    wp.clone().requires_grad_(grad[2]), pf.clone().requires_grad_(grad[3]), 6, tau, w, fused)
            torch.library.opcheck(_step_op(backend), args)


@pytest.mark.parametrize("backend,device", STEP_PAIRS)
def test_fused_step_refuses_gradients_it_did_not_form(backend, device):
    x, y, wi, wp = _step_inputs(12, 3, 6, 6, seed=32, device=device, dtype=torch.float32)
    wi.requires_grad_(True)
    loss = _step_op(backend)(x, y, wi, wp, x, 3, torch.tensor(2.0, device=device), None, False)[0]
    with pytest.raises(RuntimeError, match="fused_grad=True"):
        loss.backward()


@pytest.mark.parametrize("backend,device", STEP_PAIRS)
@pytest.mark.parametrize("g", [1.0, -2.5])
def test_fused_step_scales_by_grad_output(backend, device, g):
    """The backward folds grad_output into its GEMMs (no pass when it is 1): both cases exact."""
    x, y, wi, wp = _step_inputs(40, 5, 12, 12, seed=34, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, wi, wp)]
    tau = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    out = copa_fast.copa_loss(leaves[0], y, leaves[1], leaves[2], tau, backend=backend)
    got = torch.autograd.grad(out * g, leaves + [tau])
    leaves64 = [t.clone().requires_grad_(True) for t in (x, wi, wp)]
    tau64 = tau.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(ref.copa_loss(leaves64[0], y, leaves64[1], leaves64[2], tau64) * g,
                               leaves64 + [tau64])
    for a, b in zip(got, want, strict=True):
        assert_rel(a, b, 1e-10, "grad")


@pytest.mark.parametrize("backend,device", STEP_PAIRS)
@pytest.mark.parametrize("case,match", [
    ("w_proto_shape", "w_proto: expected shape"),
    ("pf_shape", "pf: expected shape"),
    ("dtype", "expected dtype"),
    ("labels_len", "labels: expected 12 entries"),
])
def test_fused_step_op_errors_name_the_argument(backend, device, case, match):
    x, y, wi, wp = _step_inputs(12, 3, 6, 6, seed=33, device=device, dtype=torch.float32)
    pf = x
    if case == "w_proto_shape":
        wp = wp[:5]
    elif case == "pf_shape":
        pf = pf[:, :4]
    elif case == "dtype":
        wi = wi.double()
    elif case == "labels_len":
        y = y[:-1]
    with pytest.raises((ValueError, TypeError), match=match):
        _step_op(backend)(x, y, wi, wp, pf, 3, torch.tensor(2.0, device=device), None, False)


TRITON_DEVICES = [p.values[1] for p in PAIRS if p.values[0] == "triton"]


@pytest.mark.skipif(not TRITON_DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,c,d", [(61, 7, 23), (130, 33, 70), (17, 1, 5), (40, 40, 64), (9, 12, 3)],
                         ids=lambda v: str(v))
def test_triton_class_means_kernel(dtype, n, c, d):
    """The Triton step's one-launch class means against float64: ragged tails of every tile (rows,
    classes, columns), C = 1, C = N, classes without a row (C > N: their means are 0), strided
    features (a transposed view) and strided int32 labels, labels outside 0..C-1 clamped as the
    composite clamps them; the same bits on a second call."""
    from copa_fast.ops.composite import class_means as composite_means
    from copa_fast.triton import symmetric_ce as kernels

    device = TRITON_DEVICES[0]
    g = torch.Generator().manual_seed(n * 131 + c)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[: min(n, c)] = torch.arange(min(n, c))
    y_bad = y.clone()
    y_bad[0], y_bad[-1] = -3, c + 4
    x_t = x.t().contiguous().t()                             # strides (1, n)
    y32 = torch.stack([y, y]).t().reshape(-1).int()[::2]     # int32, stride 2
    for feats, labels in ((x, y), (x_t, y32), (x, y_bad)):
        got = kernels.class_means(feats.to(device, dtype), labels.to(device), c)
        want = composite_means(feats, labels.long(), c)
        assert got.shape == (c, d) and got.dtype == dtype
        # a mean of k rows summed in some order, then divided: within (k + 1) roundings of the exact one
        per_class = int(torch.bincount(labels.long().clamp(0, c - 1), minlength=c).max())
        assert_rel(got, want, (per_class + 1) * torch.finfo(dtype).eps, "class means")
        empty = torch.ones(c, dtype=torch.bool)
        empty[labels.long().clamp(0, c - 1)] = False
        if c > n:
            assert empty.any()
        assert torch.equal(got[empty].cpu(), torch.zeros(int(empty.sum()), d, dtype=dtype))
        assert torch.equal(kernels.class_means(feats.to(device, dtype), labels.to(device), c), got)


@pytest.mark.skipif(not TRITON_DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_class_means_above_the_kernel_bound_take_the_composite(monkeypatch):
    """Past MEANS_KERNEL_MAX products the step's class means are the composite's (vendor one-hot
    GEMM), without a launch of the one-launch kernel; below it, the kernel."""
    from copa_fast.triton import symmetric_ce as kernels

    device = TRITON_DEVICES[0]
    launches = []
    real = kernels._class_means

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_class_means", Spy())
    x, y = make_episode(50, 5, 16, seed=8, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    small = kernels.class_means(x, y, 5)
    assert len(launches) == 1
    monkeypatch.setattr(kernels, "MEANS_KERNEL_MAX", 50 * 5 * 16 - 1)
    large = kernels.class_means(x, y, 5)
    assert len(launches) == 1
    per_class = int(torch.bincount(y.cpu()).max())   # two summation orders: each within k + 1 roundings
    assert_rel(large, small, 2 * (per_class + 1) * torch.finfo(torch.float32).eps, "class means")


@pytest.mark.skipif(not TRITON_DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_class_gradient_split_over_row_ranges(monkeypatch, splits, dtype):
    """The triton backend splits each class block's dq = s G^T zn over row ranges (a last-finisher
    sums the partials in split order). Every split count against float64, with weights and a tail
    row range shorter than the others; bitwise equal across calls; a bad label still gives NaN."""
    from copa_fast.triton import symmetric_ce as kernels

    device = TRITON_DEVICES[0]
    bn = kernels._launch_config(kernels.INTERPRETED, dtype)[0]
    n, c, d = 11 * bn + 7, 6, 40   # 12 row tiles: 1, 2, 3 and 4 equal ranges of whole tiles
    real = kernels._dq_splits
    seen = []

    def forced(n_, c_, bn_, bc_, dtype_, most=4):
        got = real(n_, 1, bn_, bc_, torch.float32, most=splits)   # as many splits as allowed, float64 too
        seen.append(got[0])
        return got

    monkeypatch.setattr(kernels, "_dq_splits", forced)
    x, p, y = _inputs((n, c, d, 2), dtype, device, seed=splits)
    w = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(5)).to(device)
    x.requires_grad_(True), p.requires_grad_(True)
    out = copa_fast.symmetric_ce(x, p, y, 2.5, backend="triton", reduction="none")
    loss = (out * w).sum()
    gx, gp = torch.autograd.grad(loss, (x, p))
    assert seen and seen[0] == splits
    x64, p64 = (t.detach().double().requires_grad_(True) for t in (x, p))
    want = (ref.symmetric_ce(x64, p64, y, 2.5, reduction="none") * w.double()).sum()
    wx, wp = torch.autograd.grad(want, (x64, p64))
    assert_rel(gx, wx, TOL[dtype]["grad"], "dembeddings")
    assert_rel(gp, wp, TOL[dtype]["grad"], "dprototypes")
    again = torch.autograd.grad((copa_fast.symmetric_ce(x, p, y, 2.5, backend="triton", reduction="none") * w).sum(),
                                (x, p))
    assert torch.equal(again[0], gx) and torch.equal(again[1], gp)
    bad = y.clone()
    bad[n - 1] = c + 3
    lb = copa_fast.symmetric_ce(x, p, bad, 2.5, backend="triton", check_inputs=False)
    assert torch.isnan(lb) and torch.isnan(torch.autograd.grad(lb, p)[0]).all()


@pytest.mark.skipif(not TRITON_DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits,rg,cg,sg,cs,dtype", [(1, 2, 1, 2, 3, torch.float32), (2, 3, 2, 3, 8, torch.float32),
                                                       (4, 2, 3, 5, 2, torch.float32), (1, 4, 4, 4, 5, torch.float32),
                                                       (2, 2, 2, 3, 4, torch.float64)], ids=str)
def test_triton_over_column_groups(monkeypatch, splits, rg, cg, sg, cs, dtype):
    """The triton launches share their loops out: the D chunks over column groups of the score
    programs (the last group of a row block sums the partial products in order, then forms the
    row statistics), of the row programs (the last sums the groups' <zn, dz> shares in order) and
    of the class programs (sharing their split's partial slot); the column statistics' rows over
    ranges (the last merges the (max, sum) pairs in order). Forced plans — uneven groups, a ragged
    last chunk, an empty group of each kind (4 groups of 2 chunks over 5) — against float64, with
    weights; bitwise repeatable; a bad label still gives NaN and nothing else."""
    from copa_fast.triton import symmetric_ce as kernels

    device = TRITON_DEVICES[0]
    bn, _, bd, _ = kernels._launch_config(kernels.INTERPRETED, dtype)
    n, c, d = 7 * bn + 3, 7, 4 * bd + 17   # 8 row tiles, 5 D chunks (the last one ragged)
    real = kernels._dq_splits
    seen = []

    def forced(n_, c_, d_, bn_, bc_, bd_, dtype_, slots):
        got = real(n_, 1, bn_, bc_, torch.float32, most=splits) + (rg, cg)
        seen.append(got)
        return got

    monkeypatch.setattr(kernels, "_grads_plan", forced)
    monkeypatch.setattr(kernels, "_scores_groups", lambda *a: sg)
    real_cs = kernels._colstats_splits
    monkeypatch.setattr(kernels, "_colstats_splits", lambda n_, c_, bn_, bc_, slots: real_cs(n_, 1, bn_, 1, cs))
    x, p, y = _inputs((n, c, d, 2), dtype, device, seed=10 * rg + cg)
    w = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(6)).to(device)
    x.requires_grad_(True), p.requires_grad_(True)
    losses = copa_fast.symmetric_ce(x, p, y, 3.0, backend="triton", reduction="none")
    gx, gp = torch.autograd.grad((losses * w).sum(), (x, p))
    assert seen and seen[0][0] == splits and seen[0][2:] == (rg, cg)
    x64, p64 = (t.detach().double().requires_grad_(True) for t in (x, p))
    want_losses = ref.symmetric_ce(x64, p64, y, 3.0, reduction="none")
    wx, wp = torch.autograd.grad((want_losses * w.double()).sum(), (x64, p64))
    assert_rel(losses, want_losses, TOL[dtype]["loss"], "losses")
    assert_rel(gx, wx, TOL[dtype]["grad"], "dembeddings")
    assert_rel(gp, wp, TOL[dtype]["grad"], "dprototypes")
    mean, pred = copa_fast.api._sce_core(x.detach(), p.detach(), y, 3.0, "mean", "triton")   # the loss total
    assert_rel(mean, want_losses.mean(), TOL[dtype]["loss"], "loss")
    assert torch.equal(pred, copa_fast.api._cosine_predict(x64.detach(), p64.detach()))
    again = torch.autograd.grad((copa_fast.symmetric_ce(x, p, y, 3.0, backend="triton", reduction="none") * w).sum(),
                                (x, p))
    assert torch.equal(again[0], gx) and torch.equal(again[1], gp)
    bad = y.clone()
    bad[2] = -1
    lb = copa_fast.symmetric_ce(x, p, bad, 3.0, backend="triton", check_inputs=False, reduction="none")
    assert torch.isnan(lb[2]) and torch.isfinite(torch.cat([lb[:2], lb[3:]])).all()
    gxb, gpb = torch.autograd.grad(copa_fast.symmetric_ce(x, p, bad, 3.0, backend="triton", check_inputs=False),
                                   (x, p))
    assert torch.isnan(gxb[2]).all() and torch.isfinite(torch.cat([gxb[:2], gxb[3:]])).all()
    assert torch.isnan(gpb).all()


def test_triton_scratch_layout():
    """A Triton launch's scratch is views of ONE allocation (``_carve``): each at least its size,
    starting at a multiple of ``_ALIGN`` entries (Triton's 16-byte pointer specialisation holds),
    disjoint and in order; int32 tickets fit the entries ``_int32_entries`` gives in either dtype."""
    from copa_fast.triton import symmetric_ce as kernels

    for dt in (torch.float32, torch.float64):
        sizes = [0, 1, 63, 64, 65, 1000, 3, 0, 129]
        views = kernels._carve(torch.device("cpu"), dt, sizes)
        base = views[0]._base
        assert base is not None and all(v._base is base for v in views)
        starts = [v.storage_offset() for v in views]
        assert all(s % kernels._ALIGN == 0 for s in starts)
        assert all(v.numel() >= k for v, k in zip(views, sizes, strict=True))
        ends = [s + v.numel() for s, v in zip(starts, views, strict=True)]
        assert starts[0] == 0 and ends[:-1] == starts[1:] and ends[-1] == base.numel()   # tiled, in order
        assert base.numel() < sum(sizes) + len(sizes) * kernels._ALIGN
        for k in (1, 2, 3, 17):
            t = kernels._carve(torch.device("cpu"), dt, [kernels._int32_entries(k, dt)])[0]
            assert t.view(torch.int32)[:k].numel() == k and kernels._int32_entries(k, dt) * dt.itemsize >= 4 * k


@pytest.mark.skipif(not TRITON_DEVICES, reason="triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_launches_write_their_scratch_before_reading_it(monkeypatch, dtype):
    """With each launch's one scratch allocation filled with NaN beforehand (uninitialised memory's
    worst case; the int32 tickets over it read as garbage counts), the outputs are the same bits as
    without: no kernel reads a scratch entry it did not write, and the tickets are zeroed in full.
    A plan with every optional buffer (the class ranges' partials, row and class column groups, score
    groups, column-statistics ranges), for symmetric_ce (its own zn, qn) and the copa_loss step (the
    rows normalised over its z and q)."""
    from copa_fast.triton import symmetric_ce as kernels

    device = TRITON_DEVICES[0]
    bn, _, bd, _ = kernels._launch_config(kernels.INTERPRETED, dtype)
    n, c, d = 5 * bn + 3, 7, 3 * bd + 5
    real_cs = kernels._colstats_splits
    monkeypatch.setattr(kernels, "_grads_plan", lambda n_, c_, d_, bn_, *a: (2, 3 * bn_, 2, 2))
    monkeypatch.setattr(kernels, "_scores_groups", lambda *a: 3)
    monkeypatch.setattr(kernels, "_colstats_splits", lambda n_, c_, bn_, bc_, slots: real_cs(n_, 1, bn_, 1, 3))
    x, p, y = _inputs((n, c, d, 2), dtype, device, seed=71)
    wi = torch.randn(d, d, dtype=dtype, generator=torch.Generator().manual_seed(72)).to(device) / d ** 0.5
    w = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(73)).to(device)

    def run():   # per-sample losses (a forward, then a weighted launch for the backward) and a step
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, p, wi)]
        losses = copa_fast.symmetric_ce(leaves[0], leaves[1], y, 2.5, backend="triton", reduction="none")
        step = copa_fast.copa_loss(x, y, leaves[2], leaves[2], 2.5, backend="triton")
        return [losses, step, *torch.autograd.grad((losses * w).sum() + step, leaves)]

    sizes = []
    real = kernels._carve

    def filled(dev, dt, sizes_):
        views = real(dev, dt, sizes_)
        for v in views:   # together the whole allocation (views made inside an op keep no _base)
            v.fill_(float("nan"))
        sizes.append(sizes_)
        return views

    clean = run()
    assert all(torch.isfinite(t).all() for t in clean)
    monkeypatch.setattr(kernels, "_carve", filled)
    dirty = run()
    # every optional buffer (the last four) in use by symmetric_ce's backward launch (zn and qn of
    # its own: 16 buffers) and by the step's (written over z and q: 14)
    assert len(sizes) == 3 and sorted(len(k) for k in sizes if min(k[-4:]) > 0) == [14, 16], sizes
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a, b)


def test_float_tau_tensor_is_made_once_and_never_where_it_must_be_fresh():
    from copa_fast import api

    x = torch.randn(3, 4)
    a, b = api._tau_tensor(2.0, x), api._tau_tensor(2, x)
    assert a is b and a.item() == 2.0 and a.dtype == x.dtype and not a.requires_grad
    assert api._tau_tensor(3.0, x) is not a and api._tau_tensor(2.0, x.double()).dtype == torch.float64
    # NaN (reachable with check_inputs=False) never matches its own key: the cache stays bounded
    for _ in range(3 * api._TAU_TENSORS_MAX):
        assert api._tau_tensor(float("nan"), x).isnan()
    assert len(api._TAU_TENSORS) <= api._TAU_TENSORS_MAX
    # made in inference mode it would be an inference tensor, which a later backward cannot save
    api._TAU_TENSORS.clear()
    with torch.inference_mode():
        t = api._tau_tensor(1.5, x)
        assert t.is_inference()
    assert not api._TAU_TENSORS
    # inside torch.func.grad a factory makes a tensor wrapped for that transform's level only
    torch.func.grad(lambda v: (v * api._tau_tensor(1.5, v)).sum())(x)
    assert not api._TAU_TENSORS
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = api._tau_tensor(1.5, mode.from_tensor(x))
    assert type(fake) is not torch.Tensor and not api._TAU_TENSORS


@pytest.mark.parametrize("backend,device", PAIRS)
def test_a_loss_in_inference_mode_then_a_training_step(backend, device):
    # the same float tau in both calls: the inference-mode one must not leave its tensor behind
    x, y = make_episode(30, 4, 8, seed=21)
    x = x.to(device)
    y = y.to(device)
    w = torch.eye(8, device=device)
    with torch.inference_mode():
        copa_fast.copa_loss(x, y, w, w, tau=1.25, backend=backend)
    wi, wp = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    copa_fast.copa_loss(x, y, wi, wp, tau=1.25, backend=backend).backward()
    want_i, want_p = (v.clone().double().requires_grad_(True) for v in (w.cpu(), w.cpu()))
    ref.copa_loss(x.cpu().double(), y.cpu(), want_i, want_p, 1.25).backward()
    assert rel_err(wi.grad.cpu(), want_i.grad) < TOL[torch.float32]["grad"]
    assert rel_err(wp.grad.cpu(), want_p.grad) < TOL[torch.float32]["grad"]
