"""Benchmark of one CoPA training step (forward + backward to both adapters), side by side.

Used by ``copa-fast bench`` (a sweep over N: markdown table, JSON and a PNG plot) and by the
pytest-benchmark suite in ``benchmarks/``. Implementations: the published N x N formulation in
eager PyTorch (``published-eager``; ``published-compile`` under torch.compile on request), the exact
N x C rewrite in eager PyTorch (``nxc-eager``) and every copa_fast kernel backend that runs on the
device (the Triton interpreter on CPU is a test vehicle, not a benchmark, and is left out).

Times are medians over repetitions (CUDA events on GPU, perf_counter on CPU). Peak extra memory of
one step is torch's peak allocation on GPU; on CPU, the growth of the process's peak resident set
during one step, with glibc's mmap threshold pinned so that large buffers are returned on free.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from typing import Callable, Optional

import numpy as np
import torch

from . import reference as ref
from .api import copa_loss
from .backends import available_backends, triton_interpreted

D_DEFAULT = 512
CPU_SIZES = [(25, 5), (100, 10), (500, 50), (1000, 100), (2048, 100), (4096, 100)]
GPU_SIZES = CPU_SIZES + [(8192, 500), (16384, 1000), (32768, 1000)]
IMPL_ORDER = ["published-eager", "published-compile", "nxc-eager", "copa_fast-cpu", "copa_fast-triton",
              "copa_fast-cuda"]


def machine_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            info["driver"] = None
    return info


def _published(x, y, wi, wp, num_classes):
    return ref.copa_loss(x, y, wi, wp)


def _nxc_eager(x, y, wi, wp, num_classes):
    protos = ref.class_prototypes(x, y, num_classes)
    return ref.symmetric_ce_nxc(x @ wi.t(), protos @ wp.t(), y)


def _ours(backend: str) -> Callable:
    def run(x, y, wi, wp, num_classes):
        return copa_loss(x, y, wi, wp, num_classes=num_classes, backend=backend, check_inputs=False)
    return run


def implementations(device: torch.device, *, compile_published: Optional[bool] = None) -> dict:
    """name -> fn(x, y, w_img, w_proto, num_classes) returning the loss, for what runs on ``device``."""
    impls = {"published-eager": _published}
    if compile_published is None:   # COPA_BENCH_COMPILE=1 / =0 forces the row on / off
        env = os.environ.get("COPA_BENCH_COMPILE")
        compile_published = env == "1" if env in ("0", "1") else device.type == "cuda"
    if compile_published:
        impls["published-compile"] = torch.compile(_published)
    impls["nxc-eager"] = _nxc_eager
    avail = available_backends()
    interpreted = triton_interpreted()
    for b in ("cpu", "triton", "cuda"):
        if b not in avail or (b == "cpu") != (device.type == "cpu"):
            continue
        if b == "triton" and interpreted:
            continue
        impls[f"copa_fast-{b}"] = _ours(b)
    return impls


def problem(n: int, c: int, d: int, device, seed: int = 0):
    """Random features, labels with every class present, identity adapters requiring grad."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)]).to(device)
    x = torch.randn(n, d, generator=g).to(device)
    wi = torch.eye(d, device=device).requires_grad_(True)
    wp = torch.eye(d, device=device).requires_grad_(True)
    return x, y, wi, wp


def step_fn(fn: Callable, x, y, wi, wp, c: int) -> Callable[[], None]:
    def step():
        wi.grad = wp.grad = None
        fn(x, y, wi, wp, c).backward()
    return step


def _time_once(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def time_step(step: Callable[[], None], device: torch.device, *, min_reps: int = 3, max_reps: int = 50,
              budget_s: float = 1.0) -> np.ndarray:
    """Seconds per call of ``step`` (after one warm-up call), at least ``min_reps`` repetitions."""
    return time_interleaved({"step": step}, device, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s)["step"]


def time_interleaved(steps: dict, device: torch.device, *, min_reps: int = 3, max_reps: int = 50,
                     budget_s: float = 1.0) -> dict:
    """name -> seconds per call, the steps timed in turn (round after round) so that every one
    sees the same drift of a noisy machine; one warm-up call each, at least ``min_reps`` rounds,
    then rounds while the budget (``budget_s`` per step) lasts, at most ``max_reps``."""
    for step in steps.values():
        step()
    times: dict = {k: [] for k in steps}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - t_start < budget_s * len(steps)):
        for name, step in steps.items():
            times[name].append(_time_once(step, device))
        rounds += 1
    return {k: np.asarray(v) for k, v in times.items()}


_MALLOC_PINNED = False


def _pin_malloc() -> bool:
    """Pins glibc's mmap threshold (M_MMAP_THRESHOLD = -3) at 64 KiB: new large buffers are then
    mmapped and unmapped on free, so the resident set follows the live allocations (malloc_trim
    before each measurement returns the pages of chunks freed earlier)."""
    global _MALLOC_PINNED
    if not _MALLOC_PINNED and platform.system() == "Linux":
        try:
            _MALLOC_PINNED = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))
        except (OSError, AttributeError):
            _MALLOC_PINNED = False
    return _MALLOC_PINNED


def _rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def peak_extra_mib(step: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory one step allocates beyond what is live before it (MiB); None if not measurable."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _pin_malloc():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # free heap pages go back: reusing them shows in the RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets the peak resident set (VmHWM) to the current one
        base = _rss()["VmRSS"]
        step()
        return max(0.0, (_rss()["VmHWM"] - base) / 2**20)
    except (OSError, KeyError):
        return None


def sweep(device: torch.device, sizes, d: int = D_DEFAULT, *, impls: Optional[list] = None,
          budget_s: float = 1.0, log: Callable[[str], None] = lambda s: None) -> list:
    """One record per (size, implementation): N, C, D, impl, median/p20/p80 seconds, peak MiB."""
    available = implementations(device)
    names = [k for k in available if impls is None or k in impls]
    records, steps = [], []
    for n, c in sizes:
        x, y, wi, wp = problem(n, c, d, device)
        here = {name: step_fn(available[name], x, y, wi, wp, c) for name in names
                if not (device.type == "cpu" and name.startswith("published") and n > 8192)}  # minutes per step
        timed = time_interleaved(here, device, budget_s=budget_s)
        for name, t in timed.items():
            records.append({"N": n, "C": c, "D": d, "impl": name, "median_s": float(np.median(t)),
                            "p20_s": float(np.quantile(t, 0.2)), "p80_s": float(np.quantile(t, 0.8)),
                            "reps": len(t), "peak_extra_mib": None})
            steps.append(here[name])
            log(f"N={n:<6} C={c:<5} {name:<18} {_fmt(records[-1]['median_s']):>10}")
    # memory last: pinning malloc's mmap threshold (CPU) slows every later step down
    for rec, step in zip(records, steps, strict=True):
        rec["peak_extra_mib"] = peak_extra_mib(step, device)
    return records


def _fmt(sec: float) -> str:
    return f"{sec * 1e6:.0f} us" if sec < 1e-3 else f"{sec * 1e3:.2f} ms"


def markdown(records: list, machine: dict) -> str:
    where = machine.get("gpu") or machine.get("cpu", "cpu")
    head = (f"{machine.get('date', '')}, {where}" + (f", driver {machine['driver']}" if machine.get("driver") else "")
            + f", torch {machine.get('torch')}, triton {machine.get('triton')}, fp32, forward + backward of one step")
    lines = [head, "", "| N x C x D | implementation | median | p20 - p80 | vs published eager | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    base = {(r["N"], r["C"], r["D"]): r["median_s"] for r in records if r["impl"] == "published-eager"}
    for r in records:
        b = base.get((r["N"], r["C"], r["D"]))
        ratio = f"{b / r['median_s']:.1f}x" if b else "-"
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['N']} x {r['C']} x {r['D']} | {r['impl']} | {_fmt(r['median_s'])} | "
                     f"{_fmt(r['p20_s'])} - {_fmt(r['p80_s'])} | {ratio} | {mem} |")
    return "\n".join(lines) + "\n"


def plot(records: list, machine: dict, path: str) -> bool:
    """Two log-log panels: time per step vs N and peak extra memory vs N. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [k for k in IMPL_ORDER if any(r["impl"] == k for r in records)]
    for name in names:
        rows = sorted((r for r in records if r["impl"] == name), key=lambda r: r["N"])
        ns = [r["N"] for r in rows]
        style = "--" if name.startswith(("published", "nxc")) else "-"
        axes[0].plot(ns, [r["median_s"] * 1e3 for r in rows], style, marker="o", label=name)
        mem = [(r["N"], r["peak_extra_mib"]) for r in rows if r["peak_extra_mib"]]
        if mem:
            axes[1].plot(*zip(*mem, strict=True), style, marker="o", label=name)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, ylabel in zip(axes, ("ms per step (forward + backward)", "peak extra memory (MiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("N (support samples; C and D in the table)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    where = machine.get("gpu") or machine.get("cpu", "cpu")
    fig.suptitle(f"CoPA step, fp32, D={records[0]['D']} - {where}, torch {machine.get('torch')}, "
                 f"{machine.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(out_dir: str, device: torch.device, sizes, d: int = D_DEFAULT, *, impls=None, budget_s: float = 1.0,
        log=print) -> dict:
    """The ``copa-fast bench`` job: sweep, then ``bench.json``, ``bench.md`` and ``bench.png``."""
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    records = sweep(device, sizes, d, impls=impls, budget_s=budget_s, log=log)
    paths: dict = {"json": os.path.join(out_dir, "bench.json"), "markdown": os.path.join(out_dir, "bench.md"),
             "png": os.path.join(out_dir, "bench.png")}
    with open(paths["json"], "w") as f:
        json.dump({"machine": machine, "records": records}, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(records, machine))
    if not plot(records, machine, paths["png"]):
        paths["png"] = None
    return {"machine": machine, "records": records, "paths": paths}
