"""The adaptation loop and the head module against the reference loop (trajectory checks)."""

import contextlib
import math

import pytest
import torch

import copa_fast
from copa_fast import reference as ref
from conftest import KERNEL_BACKENDS, count_tolist_reads, device_for, make_episode, rel_err

CPU_KERNELS = [b for b in KERNEL_BACKENDS if b in ("cpu", "triton")]


def _split(n_support, n_query, c, d, seed):
    x, y = make_episode(n_support + n_query, c, d, seed=seed, dtype=torch.float64)
    # keep every class in the support
    order = torch.argsort(torch.rand(len(y), generator=torch.Generator().manual_seed(seed)))
    x, y = x[order], y[order]
    first = torch.zeros(len(y), dtype=torch.bool)
    for k in range(c):
        first[(y == k).nonzero()[0]] = True
    sup = first.clone()
    rest = (~first).nonzero().flatten()
    sup[rest[: n_support - c]] = True
    return x[sup], y[sup], x[~sup], y[~sup]


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_adapt_float64_follows_reference_trajectory(backend):
    dev = device_for(backend)
    if backend == "triton" and dev.type == "cpu":
        steps = 5  # the interpreter is slow; a few steps still exercise the whole loop
    else:
        steps = 50
    xs, ys, xq, yq = _split(60, 40, 6, 24, seed=1)
    got = copa_fast.adapt(*(t.to(dev) for t in (xs, ys, xq, yq)), steps=steps, backend=backend)
    want = ref.adapt(xs, ys, xq, yq, steps=steps)
    assert len(got.losses) == steps
    assert rel_err(got.w_img, want.w_img) < 1e-9
    assert rel_err(got.w_proto, want.w_proto) < 1e-9
    assert got.losses == pytest.approx(want.losses, rel=1e-9)
    assert got.query_accuracy == want.query_accuracy
    assert got.losses[-1] < got.losses[0]  # it adapts
    # the adapted prototypes and the query classification they give, as the reference loop's
    assert got.prototypes.shape == (6, 24) and rel_err(got.prototypes, want.prototypes) < 1e-9
    assert rel_err(got.scores(xq.to(dev)), want.scores(xq)) < 1e-9
    assert ref.fraction_correct(got.predict(xq.to(dev)), yq.to(dev)) == got.query_accuracy


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_adapt_runs_each_step_as_the_backends_step_op(backend, monkeypatch):
    # one op call a step (class means, both adapters, the loss and its gradients), the same op
    # copa_loss calls; not the adapters and the symmetric-CE op as separate calls
    from copa_fast.ops import symmetric_ce as ops

    want = ops.triton_step_op() if backend == "triton" else ops.copa_op()
    if want is None:
        pytest.skip("the Triton step op needs the C++ extension")
    dev = device_for(backend)
    calls = []

    def spy(*args):
        calls.append(args)
        return want(*args)

    monkeypatch.setattr(ops, "triton_step_op" if backend == "triton" else "copa_op", lambda: spy)
    for name in ("triton_call", "cpp_op"):   # the symmetric-CE op alone is not what a step runs
        monkeypatch.setattr(ops, name, lambda: pytest.fail("adapt called the symmetric-CE op"))
    xs, ys, xq, yq = _split(20, 10, 3, 8, seed=4)
    got = copa_fast.adapt(*(t.to(dev) for t in (xs, ys, xq, yq)), steps=2, backend=backend)
    want_ref = ref.adapt(xs, ys, xq, yq, steps=2)
    assert len(calls) == 2
    assert rel_err(got.w_img, want_ref.w_img) < 1e-9


@pytest.mark.skipif("triton" not in copa_fast.available_backends(), reason="triton not available")
def test_adapt_without_the_step_op_follows_the_reference(monkeypatch):
    """Without the C++ extension the Triton step op is absent: adapt then runs the adapters and the
    symmetric-CE op as separate calls through autograd, with the same trajectory."""
    from copa_fast.ops import symmetric_ce as ops

    monkeypatch.setattr(ops, "triton_step_op", lambda: None)
    xs, ys, xq, yq = _split(24, 10, 4, 8, seed=6)
    dev = device_for("triton")
    x64 = [t.double().to(dev) if t.is_floating_point() else t.to(dev) for t in (xs, ys, xq, yq)]
    got = copa_fast.adapt(*x64, steps=4, backend="triton")
    want = ref.adapt(xs.double(), ys, xq.double(), yq, steps=4)
    assert rel_err(got.w_img, want.w_img) < 1e-9 and rel_err(got.w_proto, want.w_proto) < 1e-9
    assert got.losses == pytest.approx(want.losses, rel=1e-9)
    assert got.query_accuracy == want.query_accuracy


ADAM_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", ADAM_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_direct_fused_adam_is_torch_optim_adam_bit_for_bit(device, dtype):
    """adapt's optimizer (api._FusedAdam, torch's fused Adam kernel called directly) against
    torch.optim.Adam(fused=True) on the same parameters and gradients: the same bits after every
    step, for square and non-square maps, with gradients of mixed scales."""
    from copa_fast.api import _adam, _FusedAdam

    g = torch.Generator().manual_seed(3)
    init = [torch.eye(7, 5, dtype=dtype) + 0.1 * torch.randn(7, 5, generator=g, dtype=dtype),
            torch.randn(6, 6, generator=g, dtype=dtype)]
    ours = [p.to(device, copy=True).requires_grad_(True) for p in init]
    theirs = [p.to(device, copy=True).requires_grad_(True) for p in init]
    mine = _adam(ours, 3e-3, 0.1)
    assert isinstance(mine, _FusedAdam)
    ref_opt = torch.optim.Adam(theirs, lr=3e-3, weight_decay=0.1, fused=True)
    for step in range(12):
        grads = [10.0 ** (step % 5 - 3) * torch.randn(p.shape, generator=g, dtype=dtype) for p in init]
        mine.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)
        for p, q, gr in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = gr.to(device), gr.to(device)
        mine.step()
        ref_opt.step()
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q), f"step {step}: {(p - q).abs().max().item():.3e}"
    assert not torch.equal(ours[0].detach().cpu(), init[0])   # the maps moved


def test_adam_falls_back_to_torch_optim_where_no_fused_kernel():
    from copa_fast.api import _adam

    assert isinstance(_adam([torch.zeros(2, 2, device="meta", requires_grad=True)], 1e-3, 0.1), torch.optim.Adam)
    assert isinstance(_adam([torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)], 1e-3, 0.1),
                      torch.optim.Adam)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "attached"])
def test_episode_loops_run_whatever_the_callers_autograd_state(mode):
    """Evaluation code often runs its episodes under torch.no_grad() or torch.inference_mode()
    (features of a frozen backbone made there are inference tensors), or passes features still
    attached to the backbone's graph: every episode loop — adapt on each backend, adapt_many
    (batched on triton), the reference loop and the PA baseline — gives the same bits as with
    plain tensors outside any mode, takes no gradient into the caller's graph, and leaves the
    caller's mode as it was."""
    xs, ys, xq, yq = (t.float() if t.is_floating_point() else t for t in _split(24, 16, 4, 12, seed=5))
    kw = dict(steps=4)
    loops = {f"adapt[{b}]": (lambda *e, b=b: copa_fast.adapt(*e, backend=b, **kw)) for b in ["reference", *CPU_KERNELS]}
    loops.update({f"adapt_many[{b}]": (lambda *e, b=b: copa_fast.adapt_many([e, e], backend=b, **kw)[1])
                  for b in CPU_KERNELS})
    loops["reference.adapt"] = lambda *e: ref.adapt(*e, **kw)
    loops["reference.adapt_pa"] = lambda *e: ref.adapt_pa(*e, **kw)
    want = {name: loop(xs, ys, xq, yq) for name, loop in loops.items()}
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "attached": contextlib.nullcontext}[mode]
    for name, loop in loops.items():
        backbone = torch.ones((), requires_grad=True)   # stands for the backbone's parameters
        with ctx():
            support, query = (xs * backbone, xq * backbone) if mode == "attached" else (xs.clone(), xq.clone())
            episode = [support, ys.clone(), query, yq.clone()]
            assert episode[0].is_inference() == (mode == "inference_mode")
            assert episode[0].requires_grad == (mode == "attached")
            got = loop(*episode)
            assert torch.is_grad_enabled() == (mode == "attached"), name
            assert torch.is_inference_mode_enabled() == (mode == "inference_mode"), name
        assert backbone.grad is None, name
        assert torch.equal(got.w_img, want[name].w_img) and torch.equal(got.w_proto, want[name].w_proto), name
        assert got.losses == want[name].losses and got.query_accuracy == want[name].query_accuracy, name
        assert not torch.equal(got.w_img, torch.eye(12)), name   # the loop did adapt


def test_episode_loops_leave_a_parameter_passed_as_features_untouched():
    """Features that are themselves a leaf requiring grad (an nn.Parameter, say) are constants of
    the loop too: no gradient accumulates in them over the steps."""
    xs, ys, _, _ = (t.float() if t.is_floating_point() else t for t in _split(24, 16, 4, 12, seed=6))
    for name, loop in {"adapt": lambda x: copa_fast.adapt(x, ys, steps=3),
                       "adapt[reference]": lambda x: copa_fast.adapt(x, ys, steps=3, backend="reference"),
                       "adapt_many": lambda x: copa_fast.adapt_many([(x, ys, None, None)], steps=3)[0],
                       "reference.adapt": lambda x: ref.adapt(x, ys, steps=3)}.items():
        param = torch.nn.Parameter(xs.clone())
        got = loop(param)
        assert param.grad is None, name
        assert torch.equal(param.detach(), xs), name
        assert got.losses == loop(xs).losses, name


def test_adapt_float32_stays_close_to_float64_reference():
    xs, ys, xq, yq = _split(120, 60, 8, 64, seed=2)
    got = copa_fast.adapt(xs.float(), ys, xq.float(), yq, steps=50, backend="cpu")
    want = ref.adapt(xs, ys, xq, yq, steps=50)
    # Adam normalises each update, so float32 rounding moves entries with near-zero gradients by up
    # to lr per step; the matrices as a whole stay close and the accuracy agrees.
    assert rel_err(got.w_img, want.w_img) < 2e-3
    assert rel_err(got.w_proto, want.w_proto) < 2e-3
    assert got.losses == pytest.approx(want.losses, rel=1e-4)
    assert abs(got.query_accuracy - want.query_accuracy) <= 1.0 / len(yq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapt_half_features_adapt_in_float32_on_every_backend(dtype):
    # the published loop run in float16 itself diverges to NaN (Adam's eps underflows): every backend,
    # the reference included, adapts in float32 and agrees with the float64 loop on the rounded inputs
    xs, ys, xq, yq = _split(60, 40, 6, 24, seed=3)
    xs, xq = xs.to(dtype), xq.to(dtype)
    want = ref.adapt(xs.double(), ys, xq.double(), yq, steps=10)
    for backend in copa_fast.available_backends():
        dev = device_for(backend)
        got = copa_fast.adapt(xs.to(dev), ys.to(dev), xq.to(dev), yq.to(dev), steps=10, backend=backend)
        assert got.w_img.dtype == torch.float32 and all(math.isfinite(v) for v in got.losses), backend
        assert rel_err(got.w_img.cpu(), want.w_img) < 1e-4 and rel_err(got.w_proto.cpu(), want.w_proto) < 1e-4
        assert got.query_accuracy == want.query_accuracy


def test_adapt_without_query_and_presets():
    xs, ys, _, _ = _split(30, 10, 5, 16, seed=3)
    lr, wd = ref.DATASET_PRESETS["traffic_sign"]
    out = copa_fast.adapt(xs, ys, steps=3, lr=lr, weight_decay=wd)
    assert out.query_accuracy is None and len(out.losses) == 3
    want = ref.adapt(xs, ys, steps=3, lr=lr, weight_decay=wd)
    assert rel_err(out.w_img, want.w_img) < 1e-9


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_adapt_result_classifies_new_query_rows(backend):
    """An episode adapted without its query set classifies the query afterwards: the same
    predictions that an adaptation given the query counted, the scores as the float64 formula
    gives them (the adapted rows' cosines to the adapted class means), for rows of any dtype."""
    dev = device_for(backend)
    xs, ys, xq, yq = (t.to(dev) for t in _split(50, 30, 5, 16, seed=9))
    xs, xq = xs.float(), xq.float()
    steps = 3 if backend == "triton" else 10
    blind = copa_fast.adapt(xs, ys, steps=steps, backend=backend)
    seen = copa_fast.adapt(xs, ys, xq, yq, steps=steps, backend=backend)
    assert blind.query_accuracy is None and torch.equal(blind.prototypes, seen.prototypes)
    pred = blind.predict(xq)
    assert pred.shape == yq.shape and pred.dtype == torch.int64
    assert ref.fraction_correct(pred, yq) == seen.query_accuracy
    w_img, protos = blind.w_img.double(), blind.prototypes.double()
    want = torch.nn.functional.normalize(xq.double() @ w_img.t(), dim=1) @ \
        torch.nn.functional.normalize(protos, dim=1).t()
    got = blind.scores(xq)
    assert got.shape == (30, 5) and got.dtype == torch.float32 and rel_err(got, want) < 1e-6
    assert rel_err(ref.class_prototypes(xs.double(), ys) @ blind.w_proto.double().t(), protos) < 1e-6
    assert torch.equal(blind.predict(xq.half()), blind.scores(xq.half()).argmax(1))
    assert not got.requires_grad


def test_adapt_result_prediction_checks_its_query():
    xs, ys, xq, _ = _split(30, 10, 5, 16, seed=10)
    res = copa_fast.adapt(xs, ys, steps=2)
    cases = [(TypeError, "query: expected a torch.Tensor", xq.numpy()),
             (TypeError, "query: expected a floating tensor", xq.long()),
             (ValueError, "query: expected a 2-D tensor", xq[0]),
             (ValueError, "query: expected 16 columns \\(as w_img\\)", xq[:, :8]),
             (ValueError, "query: expected at least one row", xq[:0]),
             (ValueError, "query: expected finite values", xq.masked_fill(xq > 1.5, math.inf))]
    for err, match, bad in cases:
        for method in (res.scores, res.predict):
            with pytest.raises(err, match=match):
                method(bad)
    with pytest.raises(ValueError, match="prototypes: this AdaptResult holds no prototypes"):
        ref.AdaptResult(res.w_img, res.w_proto).predict(xq)


def test_adapt_results_compare_and_hash_by_identity():
    """A list of results supports `in`, index and sets (a field-wise == raised: a tensor comparison
    asked for one truth value); two results of the same episode are equal in their fields only."""
    xs, ys, _, _ = _split(30, 10, 5, 16, seed=13)
    a, b = copa_fast.adapt_many([(xs, ys, None, None), (xs, ys, None, None)], steps=2)
    assert torch.equal(a.w_img, b.w_img) and a != b and a == a
    assert b in [a, b] and a not in [b] and [a, b].index(b) == 1
    assert len({a, b, a}) == 2 and {a: 1}[a] == 1


def test_adapt_result_prints_on_one_line():
    xs, ys, xq, yq = _split(30, 10, 5, 16, seed=11)
    res = copa_fast.adapt(xs, ys, xq, yq, steps=3)
    text = repr(res)
    assert "\n" not in text and "tensor(" not in text
    assert text.startswith("AdaptResult(w_img=<(16, 16) float64>, w_proto=<(16, 16) float64>, losses=[3 steps: ")
    assert text.endswith(f"query_accuracy={res.query_accuracy!r}, prototypes=<(5, 16) float64>)")
    assert repr(ref.AdaptResult(res.w_img, res.w_proto)).endswith("losses=[], query_accuracy=None, prototypes=None)")


def test_saved_results_load_with_weights_only(tmp_path):
    """Results saved with torch.save (a list from adapt_many, one with no query set, the PA
    baseline's) and sampled episodes load in a fresh process with torch.load(weights_only=True), the
    default since torch 2.6, once copa_fast is imported; the results classify there as here."""
    import subprocess
    import sys

    from copa_fast.episodes import sample_episodes

    xs, ys, xq, yq = _split(40, 20, 4, 16, seed=12)
    results = copa_fast.adapt_many([(xs, ys, xq, yq), (xs, ys, None, None)], steps=3)
    results.append(ref.adapt_pa(xs, ys, xq, yq, steps=2))
    episodes = sample_episodes(torch.cat([xs, xq]).float(), torch.cat([ys, yq]), 2, min_ways=3, max_ways=4,
                               query_per_class=2)
    torch.save({"results": results, "query": xq, "episodes": episodes}, tmp_path / "results.pt")
    expect = [r.predict(xq).tolist() for r in results]
    code = ("import sys, torch, copa_fast\n"
            "saved = torch.load(sys.argv[1], weights_only=True)\n"
            "print([r.predict(saved['query']).tolist() for r in saved['results']])\n"
            "print([r.query_accuracy for r in saved['results']], [len(r.losses) for r in saved['results']])\n"
            "print([[t.sum().item() for t in (e.support, e.support_labels, e.query, e.query_labels)]\n"
            "       for e in saved['episodes']])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "results.pt")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(expect)
    assert lines[1] == f"{[r.query_accuracy for r in results]} {[len(r.losses) for r in results]}"
    assert lines[2] == str([[t.sum().item() for t in (e.support, e.support_labels, e.query, e.query_labels)]
                            for e in episodes])


def test_pa_baseline_result_classifies_as_its_accuracy():
    xs, ys, xq, yq = _split(60, 50, 5, 16, seed=5)
    pa = ref.adapt_pa(xs, ys, xq, yq, steps=5)
    assert pa.prototypes.shape == (5, 16)
    assert ref.fraction_correct(pa.predict(xq), yq) == pa.query_accuracy


def test_head_predict_and_training_step():
    xs, ys, xq, yq = _split(80, 40, 5, 32, seed=4)
    head = copa_fast.CoPAHead(32, learn_tau=True).double()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=0.1)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = head(xs, ys)
        loss.backward()
        assert head.tau.grad is not None and torch.isfinite(head.tau.grad)
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    pred = head.predict(xq, xs, ys)
    assert pred.shape == yq.shape and pred.dtype == torch.int64
    protos = copa_fast.class_means(xs, ys, 5) @ head.w_proto.detach().t()
    expect = torch.nn.functional.normalize(xq @ head.w_img.detach().t(), dim=1) @ \
        torch.nn.functional.normalize(protos, dim=1).t()
    assert torch.equal(pred, expect.argmax(1))
    assert repr(head).startswith("CoPAHead(dim=32, tau=learned, backend=None)")
    assert "dim=16, tau=3.0, backend='cpu'" in repr(copa_fast.CoPAHead(16, tau=3.0, backend="cpu"))
    # another head's learned tau as the initial value: copied, without a warning, the caller's own
    import warnings

    learned = copa_fast.CoPAHead(8, tau=2.25, learn_tau=True).tau
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = copa_fast.CoPAHead(32, tau=learned, learn_tau=True)
        frozen = copa_fast.CoPAHead(32, tau=learned)
    assert second.tau.item() == frozen.tau == 2.25 and second.tau is not learned
    second.tau.data += 1.0
    assert learned.item() == 2.25


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_adapt_reads_the_device_twice(monkeypatch, backend):
    """adapt reads its results back at once, whatever the number of steps: its checks' one read,
    and the losses with the query's correct predictions in one more (on a GPU two synchronisations
    in all: test_episodes counts them there; on CPU tensors the C++ op's tau and the fused CPU Adam's
    step counts are read as scalars, host memory either way); the accuracy is the reference's ratio
    of counts."""
    device = device_for(backend)
    xs, ys, xq, yq = (t.to(device) for t in _split(60, 20, 4, 16, seed=8))
    reads = count_tolist_reads(monkeypatch)
    got = copa_fast.adapt(xs, ys, xq, yq, steps=3, backend=backend)
    assert reads == [2, 3 + 1], reads
    pred = ref.adapted_scores(xq, got.w_img, got.prototypes).argmax(1)
    assert got.query_accuracy == ref.fraction_correct(pred, yq) and len(got.losses) == 3
    reads.clear()
    assert copa_fast.adapt(xs, ys, steps=2, backend=backend).query_accuracy is None and len(reads) == 2


def test_head_predict_reads_its_inputs_once(monkeypatch):
    """CoPAHead.predict checks its data as copa_loss does (``V.values``: one read for the labels and
    both feature tensors) and gives what the one-by-one checks give; those run only to name a fault."""
    from copa_fast import _validate as V

    xs, ys, xq, _ = _split(60, 20, 4, 16, seed=6)
    head = copa_fast.CoPAHead(16)
    head.w_img.data += 0.05 * torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
    detailed = []
    for name in ("labels", "finite"):
        real = getattr(V, name)
        monkeypatch.setattr(V, name, lambda *a, real=real, **k: detailed.append(a[0]) or real(*a, **k))
    fast = head.predict(xq, xs, ys)
    assert detailed == []
    monkeypatch.setattr(V, "_values_pass", lambda *a: None)
    assert torch.equal(head.predict(xq, xs, ys), fast) and detailed == ["support_labels", "support", "query"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_class_means_against_the_reference(dtype):
    """The public class means: the reference's (float64) on unequal classes, C read or given, a
    gradient into the features; unchecked, a label out of range turns the result NaN."""
    x, y = make_episode(37, 6, 11, seed=31, dtype=torch.float64)
    want = ref.class_prototypes(x, y)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    xs = x.to(dtype).requires_grad_(True)
    got = copa_fast.class_means(xs, y)
    assert got.dtype == dtype and got.shape == (6, 11)
    assert rel_err(got, want) <= tol
    assert torch.equal(copa_fast.class_means(xs, y.int(), 6), got)
    assert torch.equal(copa_fast.class_means(xs, y, 6, check_inputs=False), got)
    weights = torch.randn(6, 11, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    (g,) = torch.autograd.grad((got * weights.to(dtype)).sum(), [xs])
    (g_ref,) = torch.autograd.grad((ref.class_prototypes(x.requires_grad_(True), y) * weights).sum(), [x])
    assert rel_err(g, g_ref) <= tol
    for bad in (y.masked_fill(y == 2, 6), y.masked_fill(y == 0, -1)):
        out = copa_fast.class_means(xs, bad, 6, check_inputs=False)
        assert out.shape == (6, 11) and torch.isnan(out).all()


def test_pa_baseline_and_ncc_run():
    xs, ys, xq, yq = _split(60, 50, 5, 16, seed=5)
    pa = ref.adapt_pa(xs, ys, xq, yq)
    assert len(pa.losses) == 40 and pa.losses[-1] < pa.losses[0]
    assert 0.0 <= pa.query_accuracy <= 1.0
    assert 0.0 <= ref.ncc_accuracy(xs, ys, xq, yq) <= 1.0


def test_adapt_many_equals_adapt_per_episode():
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=25, dim=32, seed=1)
    eps = sample_episodes(feats, labels, 3, seed=2, max_ways=8, max_support=60)
    # one after another on cpu, a float64 episode among float32 ones: each the bits of its own adapt
    e64 = type(eps[1])(eps[1].support.double(), eps[1].support_labels, eps[1].query.double(), eps[1].query_labels)
    eps = [eps[0], e64, eps[2], eps[0]]
    many = copa_fast.adapt_many(eps, steps=4)
    assert len(many) == 4
    for ep, r in zip(eps, many, strict=True):
        one = copa_fast.adapt(ep.support, ep.support_labels, ep.query, ep.query_labels, steps=4)
        assert r.w_img.dtype == ep.support.dtype
        assert torch.equal(r.w_img, one.w_img) and torch.equal(r.w_proto, one.w_proto)
        assert r.losses == one.losses and r.query_accuracy == one.query_accuracy
        assert torch.equal(r.prototypes, one.prototypes)
    with pytest.raises(ValueError, match="episodes\\[0\\]"):
        copa_fast.adapt_many([(eps[0].support, eps[0].support_labels)])


def test_adapt_many_checks_every_episode_before_adapting_any(monkeypatch):
    """A bad episode late in the list fails at once, named by its index (not after the others ran)."""
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=25, dim=32, seed=1)
    eps = [(e.support, e.support_labels, e.query, e.query_labels)
           for e in sample_episodes(feats, labels, 3, seed=2, max_ways=8, max_support=60)]
    sup, lab, qry, qlab = eps[2]
    calls = []
    monkeypatch.setattr(copa_fast.api, "_adapt_one", lambda *a, **k: calls.append(a))
    bad_cases = [
        (ValueError, "episodes\\[2\\]: support_labels", (sup, lab + 1, qry, qlab)),   # class 0 empty
        (ValueError, "episodes\\[2\\]: query_labels", (sup, lab, qry, qlab + 100)),
        (ValueError, "episodes\\[2\\]: support", (sup.clone().fill_(float("nan")), lab, qry, qlab)),
        (TypeError, "episodes\\[2\\]: support_labels", (sup, lab.float(), qry, qlab)),
    ]
    for exc, match, bad in bad_cases:
        with pytest.raises(exc, match=match):
            copa_fast.adapt_many(eps[:2] + [bad], steps=2, backend="cpu")
    assert calls == []
    with pytest.raises(TypeError, match="episodes: expected a list"):
        copa_fast.adapt_many(eps[0], steps=2)
    # the good list: its data read once for all the episodes (here), then each adapted as adapt
    # adapts it, unchecked there
    checked, one_by_one = [], []
    real_values = copa_fast.api.V.episodes_values
    monkeypatch.setattr(copa_fast.api.V, "episodes_values", lambda items: checked.append(items) or real_values(items))
    monkeypatch.setattr(copa_fast.api, "_check_episode", lambda *a: one_by_one.append(a))
    copa_fast.adapt_many(eps, steps=2, backend="cpu")
    assert len(calls) == 3 and [c[4] for c in calls] == [int(e[1].max()) + 1 for e in eps]
    assert len(checked) == 1 and [id(p[0]) for p in checked[0]] == [id(e[0]) for e in eps] and not one_by_one
    with pytest.raises(TypeError, match="episodes\\[1\\]: expected a .* tuple, got a Tensor"):
        copa_fast.adapt_many([eps[0], sup], steps=2)


def test_episode_sampler_is_seeded_and_shaped_like_meta_dataset():
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=60, per_class=40, dim=16, seed=0)
    a = sample_episodes(feats, labels, 20, seed=5)
    b = sample_episodes(feats, labels, 20, seed=5)
    for e, f in zip(a, b, strict=True):
        assert torch.equal(e.support, f.support) and torch.equal(e.query_labels, f.query_labels)
    for e in a:
        ways = e.ways
        assert 5 <= ways <= 50 and len(e.support_labels) <= 500
        assert torch.bincount(e.support_labels, minlength=ways).min() >= 1
        assert torch.equal(torch.bincount(e.query_labels), torch.full((ways,), 10))
    with pytest.raises(ValueError, match="labels"):
        sample_episodes(feats[:30], labels[:30], 1)
    for e in sample_episodes(feats, labels, 20, seed=6, max_ways=40, max_support=12):   # ways capped by the support
        assert 5 <= e.ways <= 12 and len(e.support_labels) <= 12


def test_episodes_print_on_one_line_and_compare_by_identity():
    from copa_fast.episodes import Episode, sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=20, dim=8, seed=0)
    a, b = sample_episodes(feats, labels, 2, seed=1, max_ways=6)
    text = repr(a)
    assert "\n" not in text and "tensor(" not in text
    assert text == (f"Episode(support=<({len(a.support_labels)}, 8) float32>, support_labels=<"
                    f"({len(a.support_labels)},) int64>, query=<({len(a.query_labels)}, 8) float32>, "
                    f"query_labels=<({len(a.query_labels)},) int64>, ways={a.ways})")
    assert b in [a, b] and a not in [b] and len({a, b, a}) == 2 and a != b
    empty = Episode(a.support[:0], a.support_labels[:0], a.query[:0], a.query_labels[:0])
    assert repr(empty).endswith("query_labels=<(0,) int64>, ways=0)")


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_ways=0), "min_ways"), (dict(min_ways=5.5), "min_ways"), (dict(min_ways=10, max_ways=5), "max_ways"),
    (dict(query_per_class=0), "query_per_class"), (dict(max_support=0), "max_support"),
    (dict(max_shots=-1), "max_shots"), (dict(n_episodes=True), "n_episodes"), (dict(max_support=4), "max_support"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
])
def test_episode_sampler_arguments_validated(kwargs, name):
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=20, dim=8, seed=0)
    kwargs = {"n_episodes": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: "):
        sample_episodes(feats, labels, **kwargs)
    one_way = sample_episodes(feats, labels, 2, min_ways=1, max_ways=1, query_per_class=1, max_support=1)
    assert all(e.ways == 1 and len(e.support_labels) == 1 and len(e.query_labels) == 1 for e in one_way)


def test_labels_that_are_not_class_indices_get_an_error_that_says_how_to_remap():
    """Dataset class ids (3, 7, 9) are not 0..C-1 class indices: the error names the argument and
    the remapping, which then works."""
    x, y = torch.randn(12, 8), torch.tensor([3, 7, 9] * 4)
    with pytest.raises(ValueError, match=r"support_labels: every class in 0\.\.9 needs at least one sample.*"
                                         r"torch\.unique\(labels, return_inverse=True\)\[1\]"):
        copa_fast.adapt(x, y, steps=1)
    assert len(copa_fast.adapt(x, torch.unique(y, return_inverse=True)[1], steps=1).losses) == 1
