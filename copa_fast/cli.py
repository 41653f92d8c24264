"""Command line: ``copa-fast eval | bench | demo`` (also ``python -m copa_fast ...``).

eval  CoPA vs its baselines (PA, nearest centroid) on Meta-Dataset-style episodes sampled from a
      feature file (.npz / .pt with ``features`` [M, D] and ``labels`` [M]) or, without one, from
      the embedded default: the UCI handwritten digits (1,797 8x8 images, 10 classes) embedded
      into D = 512 by a fixed, seeded random ReLU feature map. That default exercises the whole
      pipeline on real images offline; it is not Meta-Dataset and its accuracies are not
      comparable with published Meta-Dataset numbers.
bench time and peak memory of one CoPA step vs N for every implementation that runs here (the
      published formulation included): bench.md, bench.json and bench.png in --out.
demo  synthetic episodes shaped like Meta-Dataset's, adapted with the fastest backend and with
      the reference loop: accuracy, speed-up and the largest deviation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from . import backends as _backends
from . import reference as ref
from .api import adapt, adapt_many
from .episodes import sample_episodes, synthetic_features

METHODS = ("copa", "pa", "ncc")
BATCHED_BACKENDS = ("triton", "cuda")   # adapt_many stacks the episodes: one kernel launch per step


class CliError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


def embedded_digits(dim: int = 512, seed: int = 0):
    """(1797, dim) float32 random-ReLU features of the UCI digits and their (1797,) labels."""
    path = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
    with np.load(path) as data:
        images = torch.from_numpy(data["images"].astype(np.float32) / 16.0)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(images.shape[1], dim, generator=g) / math.sqrt(images.shape[1])
    b = 0.5 * torch.randn(dim, generator=g)
    return torch.relu(images @ w + b), labels


def load_features(path: str):
    """Reads ``features`` (M, D) and ``labels`` (M,) from a .npz or .pt file. Labels are integers (any
    values: they name classes) or strings (class names, numbered here in sorted order)."""
    if not os.path.isfile(path):
        raise CliError(f"--features: no such file: {path}")
    try:
        if path.endswith(".npz"):
            with np.load(path) as data:
                obj = {k: data[k] for k in data.files}
        elif path.endswith(".pt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CliError(f"--features: expected a .npz or .pt file, got {path}")
    except CliError:
        raise
    except Exception as exc:  # unreadable or corrupt file
        hint = ("; store labels as integers or as a string array (np.array(names, dtype=str)), not as "
                "Python objects") if "allow_pickle" in str(exc) else ""
        raise CliError(f"--features: cannot read {path}: {exc}{hint}") from None
    if not isinstance(obj, dict) or "features" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CliError(f"--features: expected keys 'features' and 'labels' in {path}, found {keys}")
    feats = torch.as_tensor(np.asarray(obj["features"]) if not torch.is_tensor(obj["features"]) else obj["features"])
    labels = obj["labels"]
    if not torch.is_tensor(labels):
        labels = np.asarray(labels)
        if labels.dtype.kind in "US":   # class names
            labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
        labels = torch.as_tensor(labels)
    if feats.dim() != 2 or not feats.is_floating_point():
        raise CliError(f"--features: 'features' must be a 2-D float array (M, D), got {tuple(feats.shape)} "
                       f"of {feats.dtype}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise CliError(f"--features: 'labels' must have shape ({feats.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise CliError(f"--features: 'labels' must be integers, got {labels.dtype}")
    if not bool(torch.isfinite(feats).all()):
        raise CliError("--features: 'features' contains NaN or Inf")
    return feats.float(), labels.long()


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:
        return iterable


def _ci95(values):
    v = np.asarray(values, dtype=np.float64)
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half)


def _backend_arg(name, device: torch.device) -> str:
    """--backend resolved for the device; the reason it cannot be, as the flag's one-line error."""
    try:
        return _backends.resolve(name, device)
    except ValueError as exc:
        raise CliError(f"--backend: {str(exc).removeprefix('backend: ')}") from None


def _device_arg(text: str) -> torch.device:
    """--device as a device this process can use; the reason it cannot, as the flag's one-line error."""
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device: cuda requested but no GPU is visible")
    return device


def run_eval(args) -> dict:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CliError(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    device = _device_arg(args.device)
    backend = _backend_arg(args.backend, device)
    if args.features:
        feats, labels = load_features(args.features)
        source = args.features
    else:
        feats, labels = embedded_digits()
        source = "embedded UCI digits (random ReLU features, D=512)"
    lr, wd = ref.DATASET_PRESETS[args.dataset]
    try:
        episodes = sample_episodes(feats, labels, args.episodes, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    dist_ctx = _init_distributed(device)
    if dist_ctx is None:
        return _eval_methods(args, methods, episodes, device, backend, source, lr, wd, 0, 1)
    import torch.distributed as dist

    rank, world, device, owned = dist_ctx
    try:
        res = _eval_methods(args, methods, episodes, device, backend, source, lr, wd, rank, world)
        if owned:
            dist.barrier()   # rank 0 holds every rank's results before any rank leaves
    finally:
        if owned:
            dist.destroy_process_group()
            args.end_without_teardown = True   # see _end_worker
    return res


def _eval_methods(args, methods, episodes, device, backend, source, lr, wd, rank, world):
    """Every method on this rank's share of the episodes (all of them in a single process);
    the results dict on rank 0, None on the other ranks."""
    episodes = [e.to(device) for e in episodes]
    mine = list(range(rank, len(episodes), world))   # round-robin split over torchrun ranks
    show = not args.json and sys.stderr.isatty() and rank == 0
    results = {"source": source, "episodes": len(episodes), "steps": args.steps, "backend": backend,
               "device": str(device), "world_size": world, "lr": lr, "weight_decay": wd, "seed": args.seed,
               "methods": {}}
    for method in methods:
        accs, devs, runs, t0 = [], [], {}, time.perf_counter()
        # runs: the adapters kept for the float64 check only (2 MiB an episode at D = 512)
        if method == "copa" and backend in BATCHED_BACKENDS:   # all of this rank's episodes together
            batch = adapt_many([episodes[k] for k in mine], steps=args.steps, lr=lr, weight_decay=wd, backend=backend)
            accs = [(k, r.query_accuracy) for k, r in zip(mine, batch, strict=True)]
            runs = {k: r for k, r in zip(mine, batch, strict=True) if k < args.check_episodes}
            del batch
        else:
            for k in _progress(mine, len(mine), method, show):
                ep = episodes[k]
                if method == "copa":
                    r = adapt(ep.support, ep.support_labels, ep.query, ep.query_labels, steps=args.steps,
                              lr=lr, weight_decay=wd, backend=backend)
                    accs.append((k, r.query_accuracy))
                    if k < args.check_episodes:
                        runs[k] = r
                elif method == "pa":
                    accs.append((k, ref.adapt_pa(ep.support, ep.support_labels, ep.query,
                                                 ep.query_labels).query_accuracy))
                else:
                    accs.append((k, ref.ncc_accuracy(ep.support, ep.support_labels, ep.query, ep.query_labels)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        # outside the timed region: the float64 reference loop on the first episodes
        devs = [(k, _deviation(r, episodes[k], args.steps, lr, wd)) for k, r in runs.items()]
        if world > 1:
            from .distributed import _gather_ordered

            gathered = _gather_ordered([(rank, (accs, devs, secs))], world, None, 0)
            if rank != 0:
                continue
            accs = [a for part in gathered for a in part[0]]
            devs = [d for part in gathered for d in part[1]]
            secs = max(part[2] for part in gathered)   # the slowest rank's wall time
        values = [a for _, a in sorted(accs)]
        mean, half = _ci95(values)
        results["methods"][method] = {"accuracy": mean, "ci95": half, "seconds": secs,
                                      "episodes_per_second": len(episodes) / secs}
        if devs:
            results["methods"][method]["max_abs_dev_vs_float64_reference"] = {
                "episodes_checked": len(devs), "adapter_entries": max(d[0] for _, d in devs),
                "query_accuracy": max(d[1] for _, d in devs)}
    return results if rank == 0 else None


def _deviation(r, ep, steps, lr, wd):
    """Largest |entry| difference of both adapters and the accuracy difference vs the float64 loop."""
    want = ref.adapt(ep.support.double(), ep.support_labels, ep.query.double(), ep.query_labels,
                     steps=steps, lr=lr, weight_decay=wd)
    dev_w = max((r.w_img.double() - want.w_img).abs().max().item(),
                (r.w_proto.double() - want.w_proto).abs().max().item())
    return dev_w, abs(r.query_accuracy - want.query_accuracy)


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): joins the process group (gloo on CPU, NCCL on CUDA).
    Returns (rank, world, device, owned) or None for a single process; ``owned``: the group was
    created here (and is destroyed by run_eval)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, owned


def print_eval(res: dict) -> None:
    print(f"copa-fast eval: {res['episodes']} episodes from {res['source']}")
    print(f"backend {res['backend']} on {res['device']}, {res['steps']} steps, lr {res['lr']}, "
          f"weight decay {res['weight_decay']}, seed {res['seed']}"
          + (f", {res['world_size']} ranks" if res.get("world_size", 1) > 1 else ""))
    print(f"{'method':<8}{'accuracy (95% CI)':>22}{'episodes/s':>13}{'seconds':>10}")
    names = {"copa": "CoPA", "pa": "PA", "ncc": "NCC"}
    for m, r in res["methods"].items():
        acc = f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} %"
        print(f"{names[m]:<8}{acc:>22}{r['episodes_per_second']:>13.2f}{r['seconds']:>10.1f}")
    dev = res["methods"].get("copa", {}).get("max_abs_dev_vs_float64_reference")
    if dev:
        print(f"CoPA vs the float64 reference loop on {dev['episodes_checked']} episodes: largest adapter "
              f"deviation {dev['adapter_entries']:.2e}, largest accuracy difference {dev['query_accuracy']:.4f}")


def run_demo(args) -> None:
    device = _device_arg(args.device)
    backend = _backend_arg(args.backend, device)
    feats, labels = synthetic_features(seed=args.seed)
    episodes = [e.to(device) for e in sample_episodes(feats, labels, args.episodes, seed=args.seed)]
    print(f"copa-fast demo: {len(episodes)} synthetic Meta-Dataset-shaped episodes (D=512) on {device}, "
          f"backend {backend!r} vs the published loop (reference, float32)")
    print(f"{'ep':>3}{'ways':>6}{'support':>9}{'acc ours':>10}{'acc ref':>9}{'ms ours':>9}{'ms ref':>9}"
          f"{'speed-up':>10}{'max |dW|':>11}")
    t_ours = t_ref = 0.0
    worst = 0.0
    accs = []
    for i, ep in enumerate(episodes):
        t0 = time.perf_counter()
        ours = adapt(ep.support, ep.support_labels, ep.query, ep.query_labels, backend=backend)
        t1 = time.perf_counter()
        want = ref.adapt(ep.support, ep.support_labels, ep.query, ep.query_labels)
        t2 = time.perf_counter()
        dev = max((ours.w_img - want.w_img).abs().max().item(), (ours.w_proto - want.w_proto).abs().max().item())
        worst = max(worst, dev)
        t_ours += t1 - t0
        t_ref += t2 - t1
        acc_ours, acc_ref = float(ours.query_accuracy or 0.0), float(want.query_accuracy or 0.0)  # a query was given
        accs.append((acc_ours, acc_ref))
        print(f"{i:>3}{ep.ways:>6}{len(ep.support_labels):>9}{100 * acc_ours:>9.1f}%"
              f"{100 * acc_ref:>8.1f}%{1e3 * (t1 - t0):>9.0f}{1e3 * (t2 - t1):>9.0f}"
              f"{(t2 - t1) / (t1 - t0):>9.1f}x{dev:>11.1e}")
    a = np.array(accs)
    print(f"mean accuracy: ours {100 * a[:, 0].mean():.2f}%, reference {100 * a[:, 1].mean():.2f}%; "
          f"total {t_ours:.2f} s vs {t_ref:.2f} s ({t_ref / t_ours:.1f}x); largest adapter deviation {worst:.1e}")


def run_bench(args) -> None:
    from . import bench

    device = _device_arg(args.device)
    table = bench.GPU_SIZES if device.type == "cuda" else bench.CPU_SIZES
    sizes = [(n, c) for n, c in table if n <= args.max_n]
    if not sizes:
        raise CliError(f"--max-n: expected at least {table[0][0]} (the smallest size), got {args.max_n}")
    impls = None
    if args.impls:
        impls = [s.strip() for s in args.impls.split(",") if s.strip()]
        unknown = [s for s in impls if s not in bench.IMPL_ORDER]
        if unknown:
            raise CliError(f"--impls: unknown {unknown}; expected a subset of {','.join(bench.IMPL_ORDER)}")
    try:   # before any timing: a folder that cannot be written fails at once
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out: cannot create the folder {args.out!r} ({exc.strerror})") from None
    print(f"copa-fast bench: {device}, D={args.d}, sizes {sizes}", file=sys.stderr)
    res = bench.run(args.out, device, sizes, args.d, impls=impls, budget_s=args.budget,
                    log=lambda line: print(line, file=sys.stderr))
    with open(res["paths"]["markdown"]) as f:
        print(f.read(), end="")
    print(f"wrote {res['paths']['markdown']}, {res['paths']['json']}"
          + (f", {res['paths']['png']}" if res["paths"]["png"] else
             " (no PNG: matplotlib is not installed; pip install matplotlib)"))


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:K (argparse turns the ValueError into a one-line usage error)."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:K, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copa-fast", description=__doc__.split("\n\n")[0])
    # every command runs where the user's tensors would: the GPU when one is visible
    gpu_or_cpu = "cuda" if torch.cuda.is_available() else "cpu"
    device_help = f"cpu, cuda or cuda:K (default: cuda where a GPU is visible, else cpu; here {gpu_or_cpu})"
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="CoPA vs PA vs nearest centroid on sampled episodes")
    e.add_argument("--features", help=".npz or .pt with 'features' [M, D] and 'labels' [M] (default: embedded digits)")
    e.add_argument("--episodes", type=int, default=600, help="episodes sampled (default: 600)")
    e.add_argument("--steps", type=int, default=50, help="CoPA's Adam steps per episode (default: 50)")
    e.add_argument("--backend", default=None, help=f"one of {', '.join(_backends.BACKENDS)} (default: fastest)")
    e.add_argument("--device", type=_device, default=gpu_or_cpu, help=device_help)
    e.add_argument("--methods", default="copa,pa,ncc", help="comma-separated subset of copa,pa,ncc (default: all)")
    e.add_argument("--dataset", default="default", choices=sorted(ref.DATASET_PRESETS),
                   help="published lr / weight-decay preset")
    e.add_argument("--seed", type=int, default=0, help="episode sampling seed (default: 0)")
    e.add_argument("--check-episodes", type=int, default=2,
                   help="episodes re-adapted with the float64 reference to report the deviation (default: 2)")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    b = sub.add_parser("bench", help="time and memory of one CoPA step vs N: markdown, JSON and PNG")
    b.add_argument("--out", default="copa-fast-bench", help="output folder (default: ./copa-fast-bench)")
    b.add_argument("--device", type=_device, default=gpu_or_cpu, help=device_help)
    b.add_argument("--max-n", type=int, default=1 << 30, help="largest N of the sweep")
    b.add_argument("--d", type=int, default=512, help="feature dimension D")
    b.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    b.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per case (at least 3)")
    d = sub.add_parser("demo", help="synthetic episodes: fastest backend vs the reference loop")
    d.add_argument("--episodes", type=int, default=8, help="episodes sampled (default: 8)")
    d.add_argument("--backend", default=None, help=f"one of {', '.join(_backends.BACKENDS)} (default: fastest)")
    d.add_argument("--device", type=_device, default=gpu_or_cpu, help=device_help)
    d.add_argument("--seed", type=int, default=0, help="episode sampling seed (default: 0)")
    return p


def _at_least(*checks) -> None:
    for flag, value, least in checks:
        if value < least:
            raise CliError(f"{flag}: expected an int >= {least}, got {value}")


def _end_worker(code: int):
    """Ends a torchrun worker whose process group this CLI made, skipping the interpreter's
    teardown. destroy_process_group leaves gloo's worker threads running, and one of them may still
    be releasing the last collective's work — tensors whose Python objects it must decref under the
    GIL — when the interpreter finalises: that thread is then ended from inside a noexcept frame and
    the process aborts ("terminate called without an active exception"; seen in about one launch in
    30 under load, on either rank, after the results were printed). Nothing is left to do here but
    flush what was printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code = _run(args)
    if getattr(args, "end_without_teardown", False):
        _end_worker(code)
    return code


def _run(args) -> int:
    try:
        if args.command == "eval":
            _at_least(("--episodes", args.episodes, 1), ("--steps", args.steps, 0),
                      ("--check-episodes", args.check_episodes, 0), ("--seed", args.seed, 0))
            res = run_eval(args)
            if res is None:   # a torchrun rank other than 0: rank 0 prints
                return 0
            if args.json:
                print(json.dumps(res, indent=2))
            else:
                print_eval(res)
        elif args.command == "bench":
            if args.d < 1:
                raise CliError(f"--d: expected an int >= 1, got {args.d}")
            if not args.budget >= 0:
                raise CliError(f"--budget: expected seconds >= 0, got {args.budget}")
            run_bench(args)
        else:
            _at_least(("--episodes", args.episodes, 1), ("--seed", args.seed, 0))
            run_demo(args)
    except CliError as exc:
        print(f"copa-fast: error: {exc}", file=sys.stderr)
        return 2
    return 0
