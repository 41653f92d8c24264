"""Forward + backward of one CoPA step (both adapters, symmetric CE), side by side in one run:
the published formulation in eager PyTorch (and under torch.compile where enabled), the exact
N x C rewrite in eager PyTorch, and every copa_fast backend available for the device.

Run: ``pytest benchmarks/bench_copa_loss.py --benchmark-group-by=param:shape``.
COPA_BENCH_SHAPES=small keeps to the two smallest shapes (the CPU dry run of gpu_check.sh);
COPA_BENCH_COMPILE=1 adds the torch.compile row (minutes of compilation on a CPU).
"""

import os

import pytest
import torch

import copa_fast
from copa_fast import reference as ref

D = 512
SHAPES = {"25x5": (25, 5, D), "100x10": (100, 10, D), "500x50": (500, 50, D), "4096x100": (4096, 100, D)}
if torch.cuda.is_available():
    SHAPES.update({"16384x1000": (16384, 1000, D), "32768x1000x1024": (32768, 1000, 1024)})
if os.environ.get("COPA_BENCH_SHAPES") == "small":
    SHAPES = {k: SHAPES[k] for k in ("25x5", "500x50")}


def _published(x, y, wi, wp, num_classes):
    return ref.copa_loss(x, y, wi, wp)


def _nxc_eager(x, y, wi, wp, num_classes):
    protos = ref.class_prototypes(x, y, num_classes)
    return ref.symmetric_ce_nxc(x @ wi.t(), protos @ wp.t(), y)


def _ours(backend):
    def run(x, y, wi, wp, num_classes):
        return copa_fast.copa_loss(x, y, wi, wp, num_classes=num_classes, backend=backend, check_inputs=False)
    return run


def implementations(device):
    impls = {"published-eager": _published, "nxc-eager": _nxc_eager}
    if device.type == "cuda" or os.environ.get("COPA_BENCH_COMPILE") == "1":
        impls["published-compile"] = torch.compile(_published)
    avail = copa_fast.available_backends()
    for b in ("cpu", "triton", "cuda"):
        if b in avail and (b == "cpu") == (device.type == "cpu"):
            impls[f"copa_fast-{b}"] = _ours(b)
    return impls


IMPL_NAMES = ["published-eager", "published-compile", "nxc-eager", "copa_fast-cpu", "copa_fast-triton",
              "copa_fast-cuda"]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_step(benchmark, device, shape, impl):
    impls = implementations(device)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device.type} here")
    n, c, d = SHAPES[shape]
    if device.type == "cpu" and impl == "published-eager" and n > 4096:
        pytest.skip("too slow on a CPU")
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)]).to(device)
    x = torch.randn(n, d, generator=g).to(device)
    wi = torch.eye(d, device=device).requires_grad_(True)
    wp = torch.eye(d, device=device).requires_grad_(True)
    fn = impls[impl]

    def step():
        wi.grad = wp.grad = None
        fn(x, y, wi, wp, c).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (compilation, autotuning)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        benchmark.extra_info["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info.update({"N": n, "C": c, "D": d, "impl": impl, "device": str(device)})
    rounds = 3 if n >= 4096 and device.type == "cpu" else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
