"""Forward + backward of one CoPA step (both adapters, symmetric CE), side by side in one run:
the published formulation in eager PyTorch (and under torch.compile where enabled), the exact
N x C rewrite in eager PyTorch, and every copa_fast backend available for the device.

Run: ``pytest benchmarks/bench_copa_loss.py --benchmark-group-by=param:shape``.
COPA_BENCH_SHAPES=small keeps to the two smallest shapes (the CPU dry run of gpu_check.sh);
COPA_BENCH_COMPILE=1 adds the torch.compile row on a CPU (minutes of compilation there); =0 drops it
on a GPU, where it is on by default.
"""

import os

import pytest
import torch

from copa_fast import bench

D = 512
SHAPES = {"25x5": (25, 5, D), "100x10": (100, 10, D), "500x50": (500, 50, D), "4096x100": (4096, 100, D)}
if torch.cuda.is_available():
    SHAPES.update({"16384x1000": (16384, 1000, D), "32768x1000x1024": (32768, 1000, 1024)})
if os.environ.get("COPA_BENCH_SHAPES") == "small":
    SHAPES = {k: SHAPES[k] for k in ("25x5", "500x50")}


IMPL_NAMES = bench.IMPL_ORDER


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step(benchmark, device, shape, impl):
    impls = bench.implementations(device)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device.type} here")
    n, c, d = SHAPES[shape]
    if device.type == "cpu" and impl == "published-eager" and n > 4096:
        pytest.skip("too slow on a CPU")
    x, y, wi, wp = bench.problem(n, c, d, device)
    run = bench.step_fn(impls[impl], x, y, wi, wp, c)

    def step():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (compilation, autotuning)
    if device.type == "cuda":
        benchmark.extra_info["peak_extra_mib"] = bench.peak_extra_mib(step, device)
    benchmark.extra_info.update({"N": n, "C": c, "D": d, "impl": impl, "device": str(device)})
    # On a CPU, 60 rounds below N = 4096: step times there drift by 10-20 % from round to round,
    # too much for a median of 10.
    rounds = (3 if n >= 4096 else 60) if device.type == "cpu" else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
