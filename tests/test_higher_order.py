"""Second-order gradients and torch.func transforms on every backend, against the float64 reference.

The kernels' backward scales a gradient formed during the forward; a backward called with
create_graph=True and calls under torch.func go through the differentiable N x C composite
(copa_fast/ops/composite.py) instead. These tests fail if a second-order term is dropped.
"""

import pytest
import torch

import copa_fast
from copa_fast import reference as ref
from conftest import backend_device_pairs, make_episode

PAIRS = backend_device_pairs()
ALL = [pytest.param("reference", "cpu", id="reference-cpu")] + PAIRS


def _episode(device, n=14, c=4, d=6, seed=0):
    x, y = make_episode(n, c, d, seed=seed, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    wi = (torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)).to(device)
    wp = (torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)).to(device)
    return x, y, wi, wp


@pytest.mark.parametrize("backend,device", ALL)
def test_gradgradcheck(backend, device):
    x, y, wi, wp = _episode(device)
    tau = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    fast = backend == "triton" and device == "cpu"   # each evaluation is slow under the interpreter
    z = (x @ wi.t()).detach().requires_grad_(True)
    q = ref.class_prototypes(x, y).detach().requires_grad_(True)
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradgradcheck(
            lambda a, b, t: copa_fast.symmetric_ce(a, b, y, t, reduction=red, backend=backend), (z, q, tau),
            fast_mode=fast)
    # embeddings as their own prototypes (C = N, one class per row): one tensor in both slots
    e = z[:6].detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda a, t: copa_fast.symmetric_ce(a, a, torch.arange(6, device=device), t, backend=backend), (e, tau),
        fast_mode=fast)
    xs, ws, ps = (t.clone().requires_grad_(True) for t in (x, wi, wp))
    # features doubling as prototype features: each path's second-order share in its own slot
    assert torch.autograd.gradgradcheck(
        lambda a, u, v, t: copa_fast.copa_loss(a, y, u, v, t, backend=backend), (xs, ws, ps, tau), fast_mode=fast)
    pf = (x + 0.3).requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda a, p, u: copa_fast.copa_loss(a, y, u, wp, prototype_features=p, backend=backend), (xs, pf, ws),
        fast_mode=fast)


def _maml_outer_grad(loss_fn, x, y, xq, yq, wi, wp, lr, create_graph):
    """d/d(w_img, w_proto) of the query loss after one inner step on the support loss."""
    wi, wp = wi.clone().requires_grad_(True), wp.clone().requires_grad_(True)
    gi, gp = torch.autograd.grad(loss_fn(x, y, wi, wp), (wi, wp), create_graph=create_graph)
    outer = loss_fn(xq, yq, wi - lr * gi, wp - lr * gp)
    return torch.autograd.grad(outer, (wi, wp))


@pytest.mark.parametrize("backend,device", ALL)
def test_maml_second_order_step_matches_reference(backend, device):
    x, y, wi, wp = _episode(device, seed=3)
    xq, yq = make_episode(12, 4, 6, seed=4, dtype=torch.float64, device=device)

    def ours(a, b, u, v):
        return copa_fast.copa_loss(a, b, u, v, backend=backend)

    lr = 0.5
    got = _maml_outer_grad(ours, x, y, xq, yq, wi, wp, lr, True)
    want = _maml_outer_grad(ref.copa_loss, x, y, xq, yq, wi, wp, lr, True)
    first_order = _maml_outer_grad(ref.copa_loss, x, y, xq, yq, wi, wp, lr, False)
    for a, b, f in zip(got, want, first_order, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        # the second-order term is large enough here that dropping it could not pass
        assert (b - f).norm() > 1e-3 * b.norm()


@pytest.mark.parametrize("backend,device", ALL)
def test_gradient_penalty_matches_reference(backend, device):
    x, y, wi, wp = _episode(device, seed=5)
    xf = x.clone().requires_grad_(True)   # a backbone output: the penalty's gradient reaches it
    tau = torch.tensor(2.0, dtype=torch.float64, device=device, requires_grad=True)

    def total(fn):
        w = wi.clone().requires_grad_(True)
        loss = fn(xf, y, w, wp, tau)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad(loss + g.pow(2).sum(), (xf, w, tau))

    got = total(lambda *a: copa_fast.copa_loss(*a, backend=backend))
    want = total(ref.copa_loss)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend,device", ALL)
def test_torch_func_transforms(backend, device):
    x, y, wi, wp = _episode(device, seed=6)
    tau = torch.tensor(1.7, dtype=torch.float64, device=device)

    def ours(u, t):
        return copa_fast.copa_loss(x, y, u, wp, t, backend=backend)

    def theirs(u, t):
        return ref.copa_loss(x, y, u, wp, t)

    for transform in (torch.func.grad, lambda f: torch.func.grad(f, argnums=1)):
        torch.testing.assert_close(transform(ours)(wi, tau), transform(theirs)(wi, tau), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.func.hessian(ours, argnums=1)(wi, tau),
                               torch.func.hessian(theirs, argnums=1)(wi, tau), rtol=1e-9, atol=1e-12)
    v = torch.randn_like(wi)
    torch.testing.assert_close(torch.func.jvp(lambda u: ours(u, tau), (wi,), (v,)),
                               torch.func.jvp(lambda u: theirs(u, tau), (wi,), (v,)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL)
def test_vmap_over_episodes(backend, device):
    xs = torch.stack([_episode(device, seed=s)[0] for s in (7, 8, 9)])
    _, y, wi, wp = _episode(device, seed=7)

    def ours(a):
        return copa_fast.copa_loss(a, y, wi, wp, num_classes=4, backend=backend, check_inputs=False)

    want = torch.stack([ref.copa_loss(a, y, wi, wp) for a in xs])
    torch.testing.assert_close(torch.vmap(ours)(xs), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="check_inputs"):
        torch.vmap(lambda a: copa_fast.copa_loss(a, y, wi, wp, backend=backend))(xs)


@pytest.mark.parametrize("backend,device", ALL)
def test_batched_grad_outputs(backend, device):
    """torch.autograd.grad(..., is_grads_batched=True) runs the backward under vmap with a batch of
    grad_outputs (Jacobian rows at once): the kernels' backward then scales by a batched tensor,
    which an in-place scaling could not take. Each row must be that grad_output's gradient."""
    x, y, wi, wp = _episode(device, seed=10)
    wi, wp = wi.requires_grad_(True), wp.requires_grad_(True)
    tau = torch.tensor(1.4, dtype=torch.float64, device=device, requires_grad=True)
    scales = torch.tensor([1.0, -2.5, 0.3], dtype=torch.float64, device=device)
    loss = copa_fast.copa_loss(x, y, wi, wp, tau, backend=backend)
    got = torch.autograd.grad(loss, [wi, wp, tau], grad_outputs=scales, is_grads_batched=True)
    want = torch.autograd.grad(ref.copa_loss(x, y, wi, wp, tau), [wi, wp, tau])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, scales.reshape(-1, *[1] * w.dim()) * w, rtol=1e-9, atol=1e-12)
    # per-sample losses: the batch of one-hot grad_outputs is the Jacobian
    z, q = x @ wi.t(), x[:4] @ wp.t()
    losses = copa_fast.symmetric_ce(z, q, y, tau, reduction="none", backend=backend)
    jac = torch.autograd.grad(losses, [wi, wp], grad_outputs=torch.eye(len(y), dtype=torch.float64, device=device),
                              is_grads_batched=True)
    want = torch.autograd.functional.jacobian(
        lambda u, v: ref.symmetric_ce(x @ u.t(), x[:4] @ v.t(), y, tau.detach(), reduction="none"),
        (wi.detach(), wp.detach()))
    for g, w in zip(jac, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_compiled_backward_keeps_the_fused_gradient(backend, device):
    """Under torch.compile the backward is traced with grad mode off: the plain fused path, no
    recomputation (the composite's logsumexp would show in the backward graph)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = []

    def keep(gm, _):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm.forward)

    x, y = make_episode(30, 5, 12, seed=10, device=device)
    w = torch.eye(12, device=device, requires_grad=True)
    step = torch.compile(lambda a, u: copa_fast.copa_loss(a, y, u, u, num_classes=5, backend=backend,
                                                          check_inputs=False),
                         backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    step(x, w).backward()
    assert len(seen) == 2 and w.grad is not None
    assert not any("logsumexp" in t for t in seen[1]), sorted(seen[1])


@pytest.mark.parametrize("backend,device", PAIRS)
def test_episodes_op_refuses_create_graph(backend, device):
    from copa_fast.ops import symmetric_ce as ops

    x, y = make_episode(10, 3, 8, seed=11, device=device)
    z = x.clone().requires_grad_(True)
    q = ref.class_prototypes(x, y).clone()
    rows, classes, s_off, s_total = ops.episode_layout([10], [3], device)
    tau = torch.full((1,), 2.0, device=device)
    loss = ops.episodes_call(backend)(z, q, y, rows, classes, s_off, s_total, tau, True)[0]
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss.sum(), z, create_graph=True)


@pytest.mark.parametrize("backend,device", ALL)
def test_forward_mode_ad_matches_reference(backend, device):
    import torch.autograd.forward_ad as fwAD

    x, y, wi, wp = _episode(device, seed=12)
    v = torch.randn_like(wi)
    tangents = []
    for fn in (lambda u: copa_fast.copa_loss(x, y, u, wp, backend=backend), lambda u: ref.copa_loss(x, y, u, wp)):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(fn(fwAD.make_dual(wi, v))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", ALL)
def test_create_graph_backward_is_deterministic_and_safe_on_bad_labels(backend, device):
    x, y, wi, wp = _episode(device, seed=13)

    def second_order(labels):
        w = wi.clone().requires_grad_(True)
        loss = copa_fast.copa_loss(x, labels, w, wp, num_classes=4, backend=backend, check_inputs=False)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        return loss, g, torch.autograd.grad(g.pow(2).sum(), w)[0]

    first, again = second_order(y), second_order(y)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    if backend == "reference":
        return   # the oracle indexes with the labels: it is not the memory-safe path
    bad = y.clone()
    bad[3] = 4   # out of range with validation off: NaN, never an out-of-bounds access
    loss, g, h = second_order(bad)
    assert loss.isnan() and g.isnan().any() and h.isnan().any()


@pytest.mark.parametrize("backend,device", ALL)
def test_create_graph_gradient_equals_the_plain_one(backend, device):
    """The create_graph path's first derivative is the loss's, also where one tensor fills two
    argument slots (gradgradcheck alone would accept a consistently wrong first derivative); and
    both paths agree with the reference."""
    x, y, wi, wp = _episode(device, seed=14)
    tau = torch.tensor(1.1, dtype=torch.float64, device=device, requires_grad=True)
    e = (x[:6] @ wi.t()).detach().requires_grad_(True)
    cases = [
        (lambda a, t: copa_fast.symmetric_ce(a, a, torch.arange(6, device=device), t, backend=backend), (e, tau)),
        (lambda a, u, t: copa_fast.copa_loss(a, y, u, wp, t, backend=backend),
         (x.clone().requires_grad_(True), wi.clone().requires_grad_(True), tau)),
        # one map tied for both adapters
        (lambda u: copa_fast.copa_loss(x, y, u, u, backend=backend), (wi.clone().requires_grad_(True),)),
    ]
    for fn, args in cases:
        plain = torch.autograd.grad(fn(*args), args)
        graphed = torch.autograd.grad(fn(*args), args, create_graph=True)
        for a, b in zip(graphed, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    u = wi.clone().requires_grad_(True)
    want = torch.autograd.grad(ref.copa_loss(x, y, u, u), u)[0]
    torch.testing.assert_close(torch.autograd.grad(cases[2][0](*cases[2][1]), cases[2][1])[0], want,
                               rtol=1e-9, atol=1e-12)
