"""copa_fast.distributed on 2 and 4 gloo processes (CPU): loss and gradients equal the float64
reference on the concatenated batch, the communication matches the documented volume, bad input
makes every rank raise, and adapt_many split over ranks equals the single-process run."""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import copa_fast
from copa_fast import distributed as cfd
from copa_fast import reference

from conftest import TOL, assert_rel

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

N, C, D = 37, 6, 24


def _cases(world):
    sizes4 = [10, 0, 15, 12]          # an empty shard
    cases = {}
    for dt in ("float64", "float32"):
        cases[f"sce_{dt}"] = dict(fn="symmetric_ce", dtype=dt, n=N, c=C, d=D, seed=1, tau_tensor=True, sorted=True)
        cases[f"copa_{dt}"] = dict(fn="copa", dtype=dt, n=N, c=C, d=D, seed=2, tau_tensor=True, sorted=True)
        cases[f"copa_pf_{dt}"] = dict(fn="copa", dtype=dt, n=N, c=C, d=D, seed=3, pf=True)
    cases["sce_sum_tau8"] = dict(fn="symmetric_ce", dtype="float64", n=N, c=C, d=D, seed=4, reduction="sum",
                                 tau=8.0, tau_tensor=True)
    cases["copa_frozen"] = dict(fn="copa", dtype="float64", n=N, c=C, d=D, seed=5, features_grad=False)
    cases["copa_unchecked"] = dict(fn="copa", dtype="float32", n=N, c=C, d=D, seed=6, check=False, num_classes=C)
    if world == 4:
        cases["copa_empty_shard"] = dict(fn="copa", dtype="float64", n=N, c=C, d=D, seed=7, sizes=sizes4,
                                         tau_tensor=True)
    cases["bad_label"] = dict(fn="copa", dtype="float32", n=N, c=C, d=D, seed=8, bad_label_rank=1, num_classes=C)
    cases["bad_label_unchecked"] = dict(fn="copa", dtype="float32", n=N, c=C, d=D, seed=8, bad_label_rank=1,
                                        num_classes=C, check=False)
    cases["bad_create_graph"] = dict(fn="copa", dtype="float64", n=N, c=C, d=D, seed=11, create_graph=True)
    cases["tau_differs"] = dict(fn="symmetric_ce", dtype="float32", n=N, c=C, d=D, seed=9, tau_per_rank=True)
    cases["adapt_many"] = dict(fn="adapt_many", d=16, seed=10, episodes=5, steps=3, backend="cpu")
    cases["adapt_many_bad"] = dict(fn="adapt_many", d=16, seed=10, episodes=5, steps=3, backend="cpu", nan_query=3)
    cases["adapt_many_wide"] = dict(fn="adapt_many", d=16, seed=10, episodes=5, steps=3, backend="cpu",
                                    wide_support=2)
    return cases


def _spawn(world, tmp_path, cases):
    init = tmp_path / "init"
    mp.start_processes(W.worker, args=(world, str(init), str(tmp_path), cases), nprocs=world,
                       start_method="spawn", join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _reference(case):
    b = W.global_batch(case)
    tau = torch.tensor(case.get("tau", 2.0), dtype=torch.float64, requires_grad=True)
    red = case.get("reduction", "mean")
    if case["fn"] == "symmetric_ce":
        z, q = b["x"].clone().requires_grad_(), b["protos"].clone().requires_grad_()
        loss = reference.symmetric_ce(z, q, b["labels"], tau, reduction=red)
        inputs = {"embeddings": z, "prototypes": q}
    else:
        x = b["x"].clone().requires_grad_()
        pf = b["pf"].clone().requires_grad_()
        wi, wp = b["w_img"].clone().requires_grad_(), b["w_proto"].clone().requires_grad_()
        loss = reference.copa_loss(x, b["labels"], wi, wp, tau, prototype_features=pf if case.get("pf") else None,
                                   reduction=red)
        inputs = {"features": x, "w_img": wi, "w_proto": wp, "prototype_features": pf}
    inputs["tau"] = tau
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in inputs.items()}


SHARDED = ("embeddings", "features", "prototype_features")


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def run(request, tmp_path_factory):
    world = request.param
    cases = _cases(world)
    return world, cases, _spawn(world, tmp_path_factory.mktemp(f"dist{world}"), cases)


def _ok(name, results):
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r}: {res[name].get('trace')}"


def test_loss_and_gradients_match_reference_on_concatenated_batch(run):
    world, cases, results = run
    checked = 0
    for name, case in cases.items():
        if case["fn"] == "adapt_many" or "bad" in name or "differs" in name:
            continue
        _ok(name, results)
        want_loss, want_grads = _reference(case)
        tol = TOL[getattr(torch, case["dtype"])]
        for r in range(world):   # every rank returns the global loss
            assert_rel(results[r][name]["loss"], want_loss, tol["loss"], f"{name} loss on rank {r}")
        for key, want in want_grads.items():
            got = [results[r][name]["grads"].get(key) for r in range(world)]
            if any(g is None for g in got):
                continue
            # DDP averages: replicated inputs get mean over ranks, sharded rows are W x their gradient
            merged = torch.cat(got) / world if key in SHARDED else torch.stack(got).sum(0) / world
            assert_rel(merged, want, tol["grad"], f"{name} d{key}")
            checked += 1
    assert checked >= 20


def test_frozen_features_need_no_backward_collective(run):
    world, _, results = run
    _ok("copa_frozen", results)
    ops = results[0]["copa_frozen"]["ops"]
    assert ops == ["all_gather", "all_reduce", "all_gather"]   # checks, class sums, column stats
    assert results[0]["copa_float64"]["ops"] == ["all_gather", "all_reduce", "all_gather", "all_reduce"]


def test_communication_matches_documented_volume(run):
    world, cases, results = run
    for name, grads in (("copa_float32", True), ("copa_frozen", False), ("copa_unchecked", True)):
        case = cases[name]
        item = 8 if case["dtype"] == "float64" else 4
        want = cfd.communication_volume(N, C, D, world, dtype_bytes=item, prototype_grads=grads,
                                        check_inputs=case.get("check", True))["copa_fast"]
        for r in range(world):
            assert results[r][name]["bytes"] == want, name


def test_bad_label_on_one_rank_raises_on_every_rank(run):
    world, _, results = run
    assert "labels: expected class indices in 0.." in results[1]["bad_label"]["error"]
    for r in range(world):
        if r != 1:
            assert "invalid input on rank(s) [1]" in results[r]["bad_label"]["error"]


def test_bad_label_unchecked_gives_nan_on_every_rank(run):
    world, _, results = run
    _ok("bad_label_unchecked", results)
    for r in range(world):
        assert torch.isnan(results[r]["bad_label_unchecked"]["loss"])


def test_create_graph_raises_on_every_rank(run):
    """No silent first-order answer where a second-order one was asked for."""
    world, _, results = run
    for r in range(world):
        assert "no second-order gradients" in results[r]["bad_create_graph"]["error"]


def test_tau_must_agree_across_ranks(run):
    world, _, results = run
    for r in range(world):
        assert "tau: expected the same value on every rank" in results[r]["tau_differs"]["error"]


def test_adapt_many_split_over_ranks_equals_single_process(run):
    world, cases, results = run
    _ok("adapt_many", results)
    got = results[0]["adapt_many"]["result"]
    assert all(results[r]["adapt_many"]["result"] is None for r in range(1, world))
    from copa_fast.episodes import sample_episodes, synthetic_features

    case = cases["adapt_many"]
    feats, labels = synthetic_features(n_classes=12, per_class=30, dim=case["d"], seed=case["seed"])
    eps = sample_episodes(feats, labels, case["episodes"], seed=case["seed"], max_ways=8, max_support=60)
    want = copa_fast.adapt_many(eps, steps=case["steps"], backend=case["backend"])
    assert len(got) == len(want)
    for (wi, wp, losses, acc, protos), w in zip(got, want, strict=True):
        assert torch.equal(wi, w.w_img) and torch.equal(wp, w.w_proto) and torch.equal(protos, w.prototypes)
        assert losses == w.losses and acc == w.query_accuracy


def test_bad_episode_on_one_rank_raises_on_every_rank(run):
    """Episode 3 (rank 3 % W's) has a NaN in its query: that rank names it, and every other rank
    raises too instead of waiting in the gather."""
    world, _, results = run
    owner = 3 % world
    assert "episodes[3]: query: expected finite values" in results[owner]["adapt_many_bad"]["error"]
    for r in range(world):
        if r != owner:
            assert f"invalid input on rank(s) [{owner}]" in results[r]["adapt_many_bad"]["error"]


def test_episodes_of_another_dimension_raise_on_every_rank(run):
    """Episode 2's support has D + 1 columns: every rank names it (D is read from every episode's
    shape on every rank, as adapt_many reads it in one process), none is left waiting."""
    world, _, results = run
    for r in range(world):
        assert "episodes[2]: expected support of shape (N, 16)" in results[r]["adapt_many_wide"]["error"]


def test_errors_without_process_group():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="not initialised"):
        cfd.symmetric_ce(x, x[:2], torch.tensor([0, 1, 0, 1]))


def test_volume_is_independent_of_batch_size():
    a = cfd.communication_volume(1024, 100, 512, 8)
    b = cfd.communication_volume(65536, 100, 512, 8)
    assert a["copa_fast"] == b["copa_fast"] and b["all_gather"] == 64 * a["all_gather"]
