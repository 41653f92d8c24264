"""Worker of the distributed tests: one process per rank over gloo (CPU).

Every rank builds the same global batch from a seed, takes its shard, runs the distributed loss and
saves the loss and gradients (W x share contract) for the parent process, which compares them with
the float64 reference on the concatenated batch. Errors are saved, not raised, so that the parent
can check that every rank raised.
"""

import os
import traceback

import torch
import torch.distributed as dist

from copa_fast import distributed as cfd
from copa_fast.cli import _end_worker


def global_batch(case):
    g = torch.Generator().manual_seed(case["seed"])
    n, c, d = case["n"], case["c"], case["d"]
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    if case.get("sorted"):  # sorted labels: most classes live on one rank only
        labels = labels.sort().values
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    x = centers[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)
    pf = centers[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)
    w_img = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    w_proto = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    protos = torch.randn(c, d, generator=g, dtype=torch.float64)
    return {"x": x, "pf": pf, "labels": labels, "w_img": w_img, "w_proto": w_proto, "protos": protos}


def shard_bounds(n, world, rank, sizes=None):
    if sizes is None:
        sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def run_case(case, rank, world):
    dtype = getattr(torch, case["dtype"])
    b = global_batch(case)
    lo, hi = shard_bounds(case["n"], world, rank, case.get("sizes"))
    labels = b["labels"][lo:hi].clone()
    if case.get("bad_label_rank") == rank:
        labels[0] = case["c"] + 3
    tau_val = case.get("tau", 2.0)
    if case.get("tau_per_rank"):
        tau_val = tau_val + rank
    tau = torch.tensor(tau_val, dtype=dtype, requires_grad=True) if case.get("tau_tensor") else tau_val
    kw = {"reduction": case.get("reduction", "mean"), "check_inputs": case.get("check", True)}
    with cfd.CommLog() as log:
        if case["fn"] == "symmetric_ce":
            z = b["x"][lo:hi].to(dtype).requires_grad_()
            q = b["protos"].to(dtype).requires_grad_()
            loss = cfd.symmetric_ce(z, q, labels, tau, **kw)
            inputs = {"embeddings": z, "prototypes": q}
        else:
            x = b["x"][lo:hi].to(dtype).requires_grad_(case.get("features_grad", True))
            pf = b["pf"][lo:hi].to(dtype).requires_grad_(case.get("features_grad", True))
            wi = b["w_img"].to(dtype).requires_grad_()
            wp = b["w_proto"].to(dtype).requires_grad_()
            loss = cfd.copa_loss(x, labels, wi, wp, tau, prototype_features=pf if case.get("pf") else None,
                                 num_classes=case.get("num_classes"), **kw)
            inputs = {"features": x, "w_img": wi, "w_proto": wp}
            if case.get("pf"):
                inputs["prototype_features"] = pf
        if isinstance(tau, torch.Tensor):
            inputs["tau"] = tau
        if case.get("create_graph"):
            torch.autograd.grad(loss, list(inputs.values()), create_graph=True)
        loss.backward()
    out = {"loss": loss.detach(), "bytes": log.total_bytes, "ops": [op for op, _ in log.records]}
    out["grads"] = {k: (v.grad.detach() if v.grad is not None else None) for k, v in inputs.items()}
    return out


def worker(rank, world, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, case in cases.items():
        try:
            if case["fn"] == "adapt_many":
                results[name] = {"result": run_adapt_many(case)}
            else:
                results[name] = run_case(case, rank, world)
        except Exception as exc:  # saved for the parent, which asserts on it
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    _end_worker(0)   # no interpreter teardown beside gloo's live threads (an abort at exit, now and then)


def run_adapt_many(case):
    from copa_fast.episodes import sample_episodes, synthetic_features

    feats, labels = synthetic_features(n_classes=12, per_class=30, dim=case["d"], seed=case["seed"])
    eps = sample_episodes(feats, labels, case["episodes"], seed=case["seed"], max_ways=8, max_support=60)
    if "nan_query" in case:
        eps[case["nan_query"]].query[0, 0] = float("nan")
    if "wide_support" in case:   # one episode whose support has a column more than the others'
        e = eps[case["wide_support"]]
        eps[case["wide_support"]] = (torch.cat([e.support, e.support[:, :1]], 1), e.support_labels, e.query,
                                     e.query_labels)
    res = cfd.adapt_many(eps, steps=case["steps"], backend=case.get("backend"))
    if res is None:
        return None
    return [(r.w_img, r.w_proto, r.losses, r.query_accuracy, r.prototypes) for r in res]
