"""One global CoPA training step (forward + backward, features requiring gradients) on K gloo ranks
on CPU: copa_fast.distributed.copa_loss beside the all-gather design (every rank gathers the N x D
features with gradient, as open_clip's gather_with_grad, and computes the whole loss).

    python benchmarks/bench_distributed.py [--ranks 2] [--n 4096] [--c 100] [--d 512] [--reps 10]

Prints the median time per step of each design, measured side by side in the same processes, and
the bytes each rank passed to collectives (CommLog), then the volume table of
``communication_volume`` for N = 32768, C = 1000, D = 1024 over 8 ranks.
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.multiprocessing as mp

import copa_fast
from copa_fast import distributed as cfd
from copa_fast.cli import _end_worker


def _allgather_loss(x, labels, wi, wp, c):
    warnings.filterwarnings("ignore", category=FutureWarning)   # the differentiable gather is deprecated
    xs = torch.cat(dnn.all_gather(x))
    ys = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(ys, labels)
    return copa_fast.copa_loss(xs, torch.cat(ys), wi, wp, num_classes=c, check_inputs=False)


def _worker(rank, world, init, args, out):
    torch.set_num_threads(max(1, os.cpu_count() // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.c, (args.n,), generator=g)
    labels[: args.c] = torch.arange(args.c)
    x_all = torch.randn(args.n, args.d, generator=g)
    lo, hi = rank * args.n // world, (rank + 1) * args.n // world
    x, y = x_all[lo:hi].clone().requires_grad_(), labels[lo:hi].clone()
    wi = torch.eye(args.d, requires_grad=True)
    wp = torch.eye(args.d, requires_grad=True)
    designs = {
        "copa_fast.distributed": lambda: cfd.copa_loss(x, y, wi, wp, num_classes=args.c, check_inputs=False),
        "all-gather features": lambda: _allgather_loss(x, y, wi, wp, args.c),
    }
    times = {k: [] for k in designs}
    volume = {}
    for rep in range(args.reps + 2):
        for name, fn in designs.items():   # interleaved: both see the same machine state
            dist.barrier()
            with cfd.CommLog() as log:
                t0 = time.perf_counter()
                fn().backward()
                dist.barrier()
                dt = time.perf_counter() - t0
            volume[name] = log.total_bytes
            x.grad = wi.grad = wp.grad = None
            if rep >= 2:
                times[name].append(dt)
    if rank == 0:
        # the all-gather design's collectives are outside CommLog: count them from their shapes
        volume["all-gather features"] = cfd.communication_volume(args.n, args.c, args.d, world)["all_gather"]
        torch.save({k: (statistics.median(v), volume[k]) for k, v in times.items()}, out)
    dist.destroy_process_group()
    _end_worker(0)   # no interpreter teardown beside gloo's live threads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--c", type=int, default=100)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        mp.start_processes(_worker, args=(args.ranks, os.path.join(tmp, "init"), args, out), nprocs=args.ranks,
                           start_method="spawn")
        res = torch.load(out)
    print(f"one global step, N={args.n} C={args.c} D={args.d} fp32, {args.ranks} gloo ranks on CPU "
          f"({os.cpu_count()} cores), median of {args.reps}")
    print("| design | ms per step | bytes per rank per step |\n|---|---|---|")
    for name, (sec, nbytes) in res.items():
        print(f"| {name} | {1e3 * sec:.1f} | {nbytes:,} |")
    print("\ncommunication per rank per step, N=32768 C=1000 D=1024 fp32, 8 ranks (communication_volume):")
    print("| design | bytes |\n|---|---|")
    for grads in (True, False):
        v = cfd.communication_volume(32768, 1000, 1024, 8, prototype_grads=grads)
        label = "backbone trained" if grads else "frozen backbone"
        print(f"| copa_fast.distributed ({label}) | {v['copa_fast']:,} |")
    print(f"| all-gather features | {v['all_gather']:,} |")


if __name__ == "__main__":
    main()
