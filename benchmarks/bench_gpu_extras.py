"""GPU figures beyond the per-shape table, each measured side by side in one process:

1. CUDA-graph replay of one copa_loss training step (forward + backward), N=500 C=50 D=512, for the
   published formulation and each copa_fast backend (issue targets: >= 4x the published replay),
   each backend's plain call with the value checks on too (what a user's default call pays),
   and where a plain step's time goes (torch.profiler: device time, launches, host-heavy operators),
   and a large step's (N=16384, C=1000) device time kernel by kernel;
2. 132 ragged episodes (N 25-500) in ONE batched launch of the episodes op: time per episode-step
   against a single-episode call of the same backend (target: >= 10x lower);
3. adapt_many over 600 sampled episodes x 50 steps, against the published per-episode loop timed on
   a few episodes and scaled to 600 (stated as such), its checks of the episodes' data (one read
   for all against one episode at a time), and where its time goes (torch.profiler);
4. the Triton kernels under each candidate launch configuration (tiles, warps): the default (no
   register spills, see benchmarks/triton_aot.py) against the tiles it replaced, and the class
   gradient split over row ranges (the default) against one program per class block; and the
   kernels at each precision ("ieee", "tf32x3", "tf32");
5. the Triton step's class means in one launch against the composite's torch ops, on both sides of
   the size bound that picks between them.

    python benchmarks/bench_gpu_extras.py [--small]    # --small: tiny sizes (a CPU dry run)

Prints one markdown table per figure. Times are medians of CUDA events (perf_counter on CPU).
"""

import argparse
import statistics
import time

import torch

import copa_fast
from copa_fast import bench, reference as ref
from copa_fast.episodes import sample_episodes, synthetic_features


def _timer(device):
    def run(fn, reps):   # median of `reps` calls after one warm-up (CUDA events on GPU)
        return statistics.median(bench.time_step(fn, device, min_reps=reps, max_reps=reps, budget_s=0.0))
    return run


def _fmt(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def graph_replay(device, n, c, d, reps):
    print(f"\n### CUDA-graph replay of one step, N={n} C={c} D={d} fp32\n")
    print("| implementation | plain call | graph replay |\n|---|---|---|")
    timer = _timer(device)
    impls = bench.implementations(device, compile_published=False)
    # The published step reads C off the labels (a host sync, which capture forbids); given C it
    # runs the same kernels and can be captured: the row the targets compare against.
    impls = {"published-eager": impls.pop("published-eager"),
             "published-eager, C given": lambda x, y, wi, wp, c: ref.copa_loss(x, y, wi, wp, num_classes=c),
             **impls}
    # each backend's step as a user writes it: the value checks on (one device read) and C read off
    # the labels, beside the unchecked step the other rows time
    for name in [k for k in impls if k.startswith("copa_fast-")]:
        impls[f"{name}, checks on"] = (lambda x, y, wi, wp, c, b=name.split("-", 1)[1]:
                                       copa_fast.copa_loss(x, y, wi, wp, backend=b))
    for name, fn in impls.items():
        x, y, wi, wp = bench.problem(n, c, d, device)
        step = bench.step_fn(fn, x, y, wi, wp, c)
        plain = timer(step, reps)
        replay = "-"
        if device.type == "cuda" and name in ("published-eager", "nxc-eager"):
            replay = "not capturable (host sync: labels.max(), bincount)"
        elif device.type == "cuda" and name.endswith("checks on"):
            replay = "not capturable (the checks read the data)"
        elif device.type == "cuda":
            wi.grad = torch.zeros_like(wi)
            wp.grad = torch.zeros_like(wp)

            def captured():
                fn(x, y, wi, wp, c).backward()   # grads accumulate into the static buffers

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    captured()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                captured()
            replay = _fmt(timer(g.replay, reps))
        print(f"| {name} | {_fmt(plain)} | {replay} |")


def _profiled_steps(device, n, c, d, steps, baseline):
    """For ``baseline`` and each copa_fast backend: (name, profile of ``steps`` plain steps, wall
    seconds a step under the profiler), after three warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    impls = bench.implementations(device, compile_published=False)
    for name, fn in impls.items():
        if name != baseline and not name.startswith("copa_fast"):
            continue
        x, y, wi, wp = bench.problem(n, c, d, device)
        step = bench.step_fn(fn, x, y, wi, wp, c)
        for _ in range(3):
            step()
        _sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            wall = (time.perf_counter() - t0) / steps
        yield name, prof, wall


def host_split(device, n, c, d, steps):
    """Where a plain step's time goes: under torch.profiler, per step, the device time of all
    kernels, the launches, and the operators with the most host time of their own."""
    print(f"\n### Where a plain step's time goes, N={n} C={c} D={d} fp32 (torch.profiler, {steps} steps; "
          f"the profiler adds host time of its own)\n")
    for name, prof, wall in _profiled_steps(device, n, c, d, steps, "published-eager"):
        events = prof.key_averages()
        on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]   # kernels, copies
        dev_us = sum(e.self_device_time_total for e in on_device) / steps
        launches = sum(e.count for e in on_device) / steps
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        print(f"**{name}**: {_fmt(wall)} a step under the profiler; kernels {dev_us:.1f} us of device time "
              f"in {launches:.1f} kernels and copies a step\n")
        print("| operator (most host time of its own) | host us / step | calls / step |\n|---|---|---|")
        for e in top:
            print(f"| {e.key[:70]} | {e.self_cpu_time_total / steps:.1f} | {e.count / steps:.1f} |")
        print()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ragged(count, d, device, n_lo, n_hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(count):
        n = int(torch.randint(n_lo, n_hi + 1, (1,), generator=g))
        c = max(1, min(n // 10, 50))
        y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
        eps.append((torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), y))
    return eps


def batched_episodes(device, count, d, n_lo, n_hi, reps):
    from copa_fast.ops import symmetric_ce as ops

    print(f"\n### {count} ragged episodes (N {n_lo}-{n_hi}, C = N/10 up to 50, D={d}) in one launch, fp32\n")
    print("| backend | one launch, all episodes | per episode-step | single-episode call (N=500) | ratio |")
    print("|---|---|---|---|---|")
    timer = _timer(device)
    eps = _ragged(count, d, device, n_lo, n_hi)
    z = torch.cat([e[0] for e in eps]).to(device)
    q = torch.cat([e[1] for e in eps]).to(device)
    y = torch.cat([e[2] for e in eps]).to(device)
    ns, cs = [len(e[2]) for e in eps], [e[1].shape[0] for e in eps]
    rows, cls, s_off, s_total = ops.episode_layout(ns, cs, device)
    tau = torch.full((count,), 2.0, device=device)
    x1, p1, y1 = _ragged(1, d, device, 500, 500, seed=1)[0]
    x1, p1, y1 = x1.to(device), p1.to(device), y1.to(device)
    tau1 = torch.tensor(2.0, device=device)
    for backend in ("triton", "cuda", "cpu"):
        if backend not in copa_fast.available_backends() or bench.implementations(device).get(
                f"copa_fast-{backend}") is None:
            continue
        # what the API calls (for triton: the kernels without torch.library's Python wrapper)
        op = ops.episodes_call(backend)
        batched = timer(lambda: op(z, q, y, rows, cls, s_off, s_total, tau, True), reps)
        single_op = ops.triton_call() if backend == "triton" else ops.cpp_op()
        single = timer(lambda: single_op(x1, p1, y1, tau1, None, True), reps)
        per = batched / count
        print(f"| {backend} | {_fmt(batched)} | {_fmt(per)} | {_fmt(single)} | {single / per:.1f}x |")


def adapt_many_run(device, count, steps, d, ref_episodes):
    print(f"\n### adapt_many: {count} sampled episodes x {steps} steps, D={d}, fp32\n")
    print("| implementation | total | per episode |\n|---|---|---|")
    feats, labels = synthetic_features(dim=d, seed=0)
    eps = [e.to(device) for e in sample_episodes(feats, labels, count, seed=0)]

    t0 = time.perf_counter()
    for e in eps[:ref_episodes]:
        ref.adapt(e.support, e.support_labels, e.query, e.query_labels, steps=steps)
    _sync(device)
    per_ref = (time.perf_counter() - t0) / ref_episodes
    print(f"| published loop (reference), {ref_episodes} episodes timed, scaled to {count} | "
          f"{per_ref * count:.1f} s | {_fmt(per_ref)} |")
    for backend in ("triton", "cuda", "cpu"):
        impl = bench.implementations(device).get(f"copa_fast-{backend}")
        if impl is None:
            continue
        copa_fast.adapt_many(eps[:2], steps=2, backend=backend)   # warm-up (compilation)
        _sync(device)
        t0 = time.perf_counter()
        res = copa_fast.adapt_many(eps, steps=steps, backend=backend)
        _sync(device)
        total = time.perf_counter() - t0
        acc = sum(r.query_accuracy for r in res) / len(res)
        print(f"| copa_fast.adapt_many, {backend} | {total:.2f} s | {_fmt(total / count)} "
              f"(mean query accuracy {100 * acc:.1f} %) |")


def episode_checks(device, count, d, reps):
    """adapt_many's checks of its episodes' data before any is adapted: all at once with one read
    (what adapt_many runs) against one episode at a time (9 reads an episode, the path it takes
    only to name a bad episode), on the same episodes."""
    from copa_fast import api

    print(f"\n### Episode checks: {count} sampled episodes, D={d} (median of {reps})\n")
    print("| checks | total | per episode |\n|---|---|---|")
    feats, labels = synthetic_features(dim=d, seed=0)
    items = api._episode_items([e.to(device) for e in sample_episodes(feats, labels, count, seed=0)])
    for name, fn in (("all at once, one read (adapt_many)", lambda: api._check_episodes(enumerate(items))),
                     ("one episode at a time", lambda: [api._check_episode(*p) for p in items])):
        fn()
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"| {name} | {_fmt(t)} | {_fmt(t / count)} |")


def adapt_many_split(device, count, steps, d):
    """Where adapt_many's time goes: one run under torch.profiler, the device time of the kernels
    with the most of it, and the wall time against the device total (the rest is host work that
    the device waited on)."""
    from torch.profiler import ProfilerActivity, profile

    backend = copa_fast.backends.default_backend(device, batched=True)
    print(f"\n### Where adapt_many's time goes: {count} episodes x {steps} steps, D={d}, fp32, {backend} "
          f"(torch.profiler)\n")
    feats, labels = synthetic_features(dim=d, seed=0)
    eps = [e.to(device) for e in sample_episodes(feats, labels, count, seed=0)]
    copa_fast.adapt_many(eps[:2], steps=2, backend=backend)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        copa_fast.adapt_many(eps, steps=steps, backend=backend)
        _sync(device)
        wall = time.perf_counter() - t0
    print(f"wall {wall * 1e3:.1f} ms under the profiler; ", end="")
    _kernel_table(prof, 1, 10)


def _kernel_table(prof, per: int, top: int) -> None:
    """The device total and the ``top`` kernels (and copies) by device time, per 1 / ``per`` of the
    profiled run (a step, when ``per`` steps ran)."""
    on_device = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in on_device)
    print(f"device {total / per / 1e3:.2f} ms in {sum(e.count for e in on_device) / per:.0f} kernels and copies\n")
    print("| kernel (most device time) | device ms | share | calls |\n|---|---|---|---|")
    for e in sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        share = e.self_device_time_total / total if total else 0.0
        print(f"| {e.key[:70]} | {e.self_device_time_total / per / 1e3:.3f} | {100 * share:.0f} % | {e.count / per:.0f} |")


def kernel_split(device, n, c, d, steps):
    """Where one large step's device time goes, kernel by kernel (torch.profiler, ``steps`` steps):
    each copa_fast backend and the N x C form in eager PyTorch."""
    print(f"\n### Where a large step's device time goes, N={n} C={c} D={d} fp32 (torch.profiler, {steps} steps)\n")
    for name, prof, _ in _profiled_steps(device, n, c, d, steps, "nxc-eager"):
        print(f"**{name}**: ", end="")
        _kernel_table(prof, steps, 8)
        print()


# (BN, BC, BD, num_warps) candidates for float32 launches, and the single problem's gradient
# launch: "default" (column groups and row-range splits as planned), "ungrouped" (row-range
# splits only: one program per row block, as in the eleventh session) or "unsplit" (one program
# per row block and per class block, as timed in the tenth)
TRITON_CONFIGS = {"32x32x64, 8 warps (batched default)": ((32, 32, 64, 8), "default"),
                  "64x32x64, 4 warps": ((64, 32, 64, 4), "default"),
                  "64x32x64, 8 warps (single-problem default)": ((64, 32, 64, 8), "default"),
                  "64x32x64, 8 warps, gradient columns ungrouped": ((64, 32, 64, 8), "ungrouped"),
                  "64x32x64, 8 warps, class gradient unsplit": ((64, 32, 64, 8), "unsplit")}


def triton_configs(device, n, d, count, reps, large=None):
    """Each TRITON_CONFIGS entry timed on one N-row problem (C = N/10 up to 50), on ``count`` ragged
    episodes in one launch and, with ``large`` = (N, C), on one large tiled problem."""
    if "triton" not in copa_fast.available_backends():
        return
    from copa_fast.ops import symmetric_ce as ops
    from copa_fast.triton import symmetric_ce as kernels

    big = f"; one problem N={large[0]} C={large[1]}" if large else ""
    print(f"\n### Triton launch configurations, fp32, D={d}: one problem N={n}; {count} ragged episodes{big}\n")
    print("| configuration | one problem N=" + str(n) + " | batched episodes, one launch |"
          + (f" one problem N={large[0]} |" if large else "") + "\n|---|---|---|" + ("---|" if large else ""))
    timer = _timer(device)
    x1, p1, y1 = (t.to(device) for t in _ragged(1, d, device, n, n, seed=1)[0])
    eps = _ragged(count, d, device, 25, max(25, n))
    z, q, y = (torch.cat([e[k] for e in eps]).to(device) for k in range(3))
    rows, cls, s_off, s_total = ops.episode_layout([len(e[2]) for e in eps], [e[1].shape[0] for e in eps], device)
    tau, tau1 = torch.full((count,), 2.0, device=device), torch.tensor(2.0, device=device)
    if large:
        xl, _, yl, _ = bench.problem(large[0], large[1], d, device)
        ql = torch.randn(large[1], d, device=device)
    default, default_plan = kernels._launch_config, kernels._grads_plan
    plans = {"default": default_plan,
             "ungrouped": lambda *a: default_plan(*a)[:2] + (1, 1),
             "unsplit": lambda n, *a: (1, n, 1, 1)}
    try:
        for name, (cfg, plan) in TRITON_CONFIGS.items():
            kernels._launch_config = lambda *a, cfg=cfg, **kw: cfg
            kernels._grads_plan = plans[plan]
            single = timer(lambda: kernels.symmetric_ce(x1, p1, y1, tau1, None, True), reps)
            batched = timer(lambda: kernels.episodes_sce(z, q, y, rows, cls, s_off, s_total, tau, True), reps)
            row = f"| {name} | {_fmt(single)} | {_fmt(batched)} |"
            if large:
                row += f" {_fmt(timer(lambda: kernels.symmetric_ce(xl, ql, yl, tau1, None, True), reps))} |"
            print(row)
    finally:
        kernels._launch_config, kernels._grads_plan = default, default_plan


def triton_precisions(device, n, d, reps, large):
    """The Triton single-problem kernels (forward + fused gradient) at each precision, side by side:
    "ieee" (the default), "tf32x3" (three TF32 products a product, float32-grade) and "tf32"."""
    if "triton" not in copa_fast.available_backends():
        return
    from copa_fast.triton import symmetric_ce as kernels

    print(f"\n### Triton precisions, fp32, D={d}: one problem N={n} and N={large[0]} C={large[1]}\n")
    print(f"| precision | N={n} | N={large[0]} |\n|---|---|---|")
    timer = _timer(device)
    x1, p1, y1 = (t.to(device) for t in _ragged(1, d, device, n, n, seed=1)[0])
    xl, _, yl, _ = bench.problem(large[0], large[1], d, device)
    ql = torch.randn(large[1], d, device=device)
    tau = torch.tensor(2.0, device=device)
    for prec in ("ieee", "tf32x3", "tf32"):
        small = timer(lambda: kernels.symmetric_ce(x1, p1, y1, tau, None, True, prec), reps)
        big = timer(lambda: kernels.symmetric_ce(xl, ql, yl, tau, None, True, prec), reps)
        print(f"| {prec} | {_fmt(small)} | {_fmt(big)} |")


def class_means_paths(device, sizes, reps):
    """The Triton step's class means both ways, side by side: the one-launch kernel (``_class_means``,
    taken up to MEANS_KERNEL_MAX = 2^27 N x C x D products) against the composite's torch ops (the
    vendor one-hot GEMM; taken above), at sizes on both sides of the bound — what the bound is for."""
    if "triton" not in copa_fast.available_backends():
        return
    from copa_fast.ops.composite import class_means as composite_means
    from copa_fast.triton import symmetric_ce as kernels

    print(f"\n### Triton step's class means, fp32: one launch against the composite (bound 2^27 = "
          f"{kernels.MEANS_KERNEL_MAX:,} products)\n")
    print("| N x C x D | one launch | composite | the step takes |\n|---|---|---|---|")
    timer = _timer(device)
    bound = kernels.MEANS_KERNEL_MAX
    try:
        kernels.MEANS_KERNEL_MAX = 1 << 62   # the kernel at every size, for the comparison
        for n, c, d in sizes:
            x, y, _, _ = bench.problem(n, c, d, device)
            one = timer(lambda: kernels.class_means(x, y, c), reps)
            comp = timer(lambda: composite_means(x, y, c), reps)
            takes = "one launch" if n * c * d <= bound else "composite"
            print(f"| {n} x {c} x {d} | {_fmt(one)} | {_fmt(comp)} | {takes} |")
    finally:
        kernels.MEANS_KERNEL_MAX = bound


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="tiny sizes, for a CPU dry run")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {bench.machine_info()}")
    if args.small:
        graph_replay(device, 100, 10, 64, 3)
        host_split(device, 100, 10, 64, 3)
        kernel_split(device, 120, 12, 32, 2)
        batched_episodes(device, 6, 32, 25, 60, 2)
        adapt_many_run(device, 4, 3, 32, 2)
        episode_checks(device, 6, 32, 2)
        adapt_many_split(device, 4, 2, 32)
        triton_configs(device, 60, 32, 3, 2, large=(120, 12))
        triton_precisions(device, 60, 32, 2, large=(120, 12))
        class_means_paths(device, [(60, 6, 32), (120, 12, 64)], 2)
    else:
        graph_replay(device, 500, 50, 512, 50)
        host_split(device, 500, 50, 512, 20)
        kernel_split(device, 16384, 1000, 512, 5)
        batched_episodes(device, 132, 512, 25, 500, 20)
        adapt_many_run(device, 600, 50, 512, 5)
        episode_checks(device, 600, 512, 5)
        adapt_many_split(device, 600, 10, 512)
        triton_configs(device, 500, 512, 132, 20, large=(16384, 1000))
        triton_precisions(device, 500, 512, 20, large=(16384, 1000))
        class_means_paths(device, [(500, 50, 512), (1024, 128, 1024), (4096, 100, 512), (16384, 1000, 512)], 20)


if __name__ == "__main__":
    main()
