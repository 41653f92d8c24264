"""Compile every Triton kernel of copa_fast for a GPU architecture on a machine WITHOUT a GPU, and
report each kernel's registers, spills and shared memory.

The launchers of ``copa_fast.triton.symmetric_ce`` run on CPU tensors with the GPU tile sizes; a
stand-in driver names the target (no device is touched) and every launch compiles instead of
running (Triton's ``warmup`` path: source -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through
the ptxas Triton ships); registers and spills are what ``ptxas -v`` reports for each PTX. What this
proves: the kernels compile for that architecture with this Triton, without local-memory spills,
within the shared memory an SM offers, and the default float32 kernels hold no TF32 tensor-core
product (precision="tf32" ones do). It proves nothing about their results or speed.

Run: ``python benchmarks/triton_aot.py [--arch 90 80] [--json out.json] [--core-after-first]``;
exit status 1 when a kernel fails to compile, spills more than SPILL_LIMIT bytes a thread, needs
more shared memory than the architecture has, or uses TF32 tensor cores without precision="tf32" /
"tf32x3". CI runs it with --core-after-first (tests/test_build.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot.py compiles real kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver as _driver
from triton.runtime.jit import JITFunction

from copa_fast.ops.symmetric_ce import episode_layout
from copa_fast.triton import symmetric_ce as K

# Spilled bytes a thread may store + load before a kernel counts as spilling: a few bytes stay in
# L1; the tiles used before this check existed spilled 268 to 8,280 B a thread (triton 3.6, sm_90).
SPILL_LIMIT = 32
# Shared memory per block an SM can give (opt-in maximum), bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# SMs of the architecture's data-centre part (A100, H100): the launchers size their splits by them
SMS = {80: 108, 86: 84, 89: 128, 90: 132}


class _TargetOnly:
    """The parts of a Triton driver the compile path asks for: a device id, a stream, a target. The
    device id is the architecture, so that each architecture gets its own kernel cache."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes of a kernel, from ``ptxas -v`` on its PTX: the ptxas
    Triton itself uses for that architecture, for the PTX's own target."""
    tool = get_ptxas(arch).path
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    if not target:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([tool, "-v", f"--gpu-name={target.group(1)}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    res = {}
    for key, pattern in (("reg", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pattern, text)
        if m:
            res[key] = int(m.group(1))
    return res


def _cases():
    """(name, launcher call) at the shapes and flags that give distinct specialisations."""
    g = torch.Generator().manual_seed(0)

    def problem(n, c, d, dtype):
        y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
        return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(c, d, generator=g, dtype=dtype), y

    def single(n, c, d, dtype, fused, weights=False, precision="ieee"):
        def run():
            z, q, y = problem(n, c, d, dtype)
            w = torch.rand(n, dtype=dtype, generator=g) if weights else None
            K.symmetric_ce(z, q, y, torch.tensor(2.0, dtype=dtype), w, fused, precision)
        return run

    def episodes(sizes, d, dtype, fused, precision="ieee"):
        def run():
            zs, qs, ys = zip(*(problem(n, c, d, dtype) for n, c in sizes), strict=True)
            rows, cls, s_off, s_total = episode_layout([n for n, _ in sizes], [c for _, c in sizes], "cpu")
            K.episodes_sce(torch.cat(zs), torch.cat(qs), torch.cat(ys), rows, cls, s_off, s_total,
                           torch.full((len(sizes),), 2.0, dtype=dtype), fused, precision)
        return run

    def step(n, c, d, dtype):   # copa_loss: the one-launch class means, then symmetric_ce's launches
        def run():
            x, _, y = problem(n, c, d, dtype)
            w = torch.eye(d, dtype=dtype)
            K.copa_loss(x, y, w, w, x, c, torch.tensor(2.0, dtype=dtype), None, True)
        return run

    f32, f64 = torch.float32, torch.float64
    return [
        ("step 500x50x512 fp32 (class means)", step(500, 50, 512, f32)),
        ("step 500x50x512 fp64 (class means)", step(500, 50, 512, f64)),
        ("single 500x50x512 fp32 fused", single(500, 50, 512, f32, True)),
        ("single 500x50x512 fp32 forward", single(500, 50, 512, f32, False)),
        ("single 500x50x512 fp32 fused tf32", single(500, 50, 512, f32, True, precision="tf32")),
        ("single 500x50x512 fp32 fused weights", single(500, 50, 512, f32, True, weights=True)),
        ("single 500x50x512 fp64 fused", single(500, 50, 512, f64, True)),
        ("single 33x1x17 fp32 fused (C = 1, odd D)", single(33, 1, 17, f32, True)),
        ("single 33x5x17 fp32 fused (odd D)", single(33, 5, 17, f32, True)),
        ("single 500x50x100 fp32 fused (D not a multiple of 16)", single(500, 50, 100, f32, True)),
        ("single 4096x100x1000 fp32 fused (D not a multiple of 16)", single(4096, 100, 1000, f32, True)),
        ("single 500x50x100 fp32 fused tf32x3 (D not a multiple of 16)", single(500, 50, 100, f32, True,
                                                                               precision="tf32x3")),
        ("single 16384x1000x1024 fp32 fused", single(16384, 1000, 1024, f32, True)),
        ("single 16384x1000x1024 fp32 fused tf32", single(16384, 1000, 1024, f32, True, precision="tf32")),
        ("single 4096x100x512 fp32 fused (medium splits)", single(4096, 100, 512, f32, True)),
        ("single 500x50x512 fp32 fused tf32x3", single(500, 50, 512, f32, True, precision="tf32x3")),
        ("single 16384x1000x1024 fp32 fused tf32x3", single(16384, 1000, 1024, f32, True, precision="tf32x3")),
        ("episodes 3 ragged x512 fp32 fused", episodes([(25, 5), (100, 10), (500, 50)], 512, f32, True)),
        ("episodes 3 ragged x512 fp32 forward", episodes([(25, 5), (100, 10), (500, 50)], 512, f32, False)),
        ("episodes 2 ragged x512 fp32 fused tf32", episodes([(25, 5), (40, 8)], 512, f32, True, "tf32")),
        ("episodes 2 ragged x512 fp64 fused", episodes([(25, 5), (40, 8)], 512, f64, True)),
        ("episodes 3 ragged x100 fp32 fused (D not a multiple of 16)",
         episodes([(25, 5), (100, 10), (500, 50)], 100, f32, True)),
    ]


# The cases each architecture compiles under --core-after-first: the step's class means, the default
# float32 kernels of one problem at both plans (few and many row blocks), tf32x3 (its tiles were
# chosen for sm_80's registers), the batched episodes, and a D that is not a multiple of 16 (its own
# tiles): every kernel, at the specialisations where spills showed.
CORE = {"step 500x50x512 fp32 (class means)", "single 500x50x512 fp32 fused", "single 16384x1000x1024 fp32 fused",
        "single 500x50x512 fp32 fused tf32x3", "episodes 3 ragged x512 fp32 fused",
        "single 500x50x100 fp32 fused (D not a multiple of 16)",
        "episodes 3 ragged x100 fp32 fused (D not a multiple of 16)"}


@contextlib.contextmanager
def _compile_only(on_compile=None):
    """What every run here stands in for a GPU with, restored on exit: the launchers' GPU tiles, no
    device check (CPU tensors stand in for the GPU's: nothing runs), each launch a compile (Triton's
    warmup path; ``on_compile(kernel name, compiled kernel)`` after each). ``_target`` picks the
    architecture."""
    original_run = JITFunction.run
    gpu_config, gpu_slots, device_check = K._launch_config, K._slots, K._check_device

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = original_run(self, *a, grid=grid, warmup=True, **kw)
        if on_compile is not None:
            on_compile(self.fn.__name__, kernel)
        return kernel

    K._launch_config = lambda interpreted, *a, **kw: gpu_config(False, *a, **kw)   # the GPU tiles
    K._check_device = lambda name, t: None
    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = original_run
        K._launch_config, K._slots, K._check_device = gpu_config, gpu_slots, device_check
        _driver._active = None   # back to whatever driver this machine has (none without a GPU)


def _target(arch: int) -> None:
    """Compile for sm_``arch``: its driver stand-in, and its SM count for the splits and column groups."""
    _driver.set_active(_TargetOnly(arch))
    K._slots = lambda device, arch=arch: 2 * SMS.get(arch, 132)


def count_variants(arch: int = 90) -> dict:
    """Compiled variants (specialisation keys) each kernel takes over problems of varied N and C: the
    step op (``copa_loss``, as ``adapt`` runs it) on twelve episode shapes — N and C each divisible
    by 16 or not — and the episodes kernel on three stacked groups. Counted, not compiled: Triton's
    compile step is replaced by a record of its key."""
    keys: dict = {}
    original_compile = JITFunction._do_compile

    def record(self, key, signature, device, *rest):   # the place of a compile: its key, kept as compiled
        keys.setdefault(self.fn.__name__, set()).add(key)
        cache = self.device_caches[device][0]
        cache[key] = object()
        return cache[key]

    JITFunction._do_compile = record
    try:
        with _compile_only():
            _target(arch)
            g = torch.Generator().manual_seed(0)
            d, tau = 64, torch.tensor(2.0)
            for n, c in ((25, 5), (32, 5), (48, 16), (100, 10), (112, 7), (160, 32), (200, 20), (333, 33),
                         (400, 40), (480, 48), (500, 50), (512, 50)):
                y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])
                x, w = torch.randn(n, d, generator=g), torch.eye(d)
                K.copa_loss(x, y, w, w, x, c, tau, None, True)
            for ns, cs in (([500, 333, 100], [50, 33, 10]), ([48, 32], [16, 5]), ([25] * 7, [5] * 7)):
                e, nm, cm = len(ns), max(ns), max(cs)
                rows, cls, s_off, s_total = episode_layout(ns, cs, "cpu", row_stride=nm, class_stride=cm)
                K.episodes_sce(torch.zeros(e * nm, d), torch.zeros(e * cm, d),
                               torch.zeros(e * nm, dtype=torch.long), rows, cls, s_off, s_total,
                               torch.full((e,), 2.0), True)
    finally:
        JITFunction._do_compile = original_compile
    return {name: len(k) for name, k in sorted(keys.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--case", default="", help="only the cases whose name contains this text")
    ap.add_argument("--core-after-first", action="store_true",
                    help="every case for the first architecture, only the core ones (CORE) for the others: "
                         "CI's run, which takes about a third less time")
    ap.add_argument("--variants", action="store_true",
                    help="only count each kernel's compiled variants over problems of varied N and C (JSON)")
    args = ap.parse_args(argv)
    if args.variants:
        print(json.dumps(count_variants(args.arch[0])))
        return 0

    compiled: list = []
    report, failures = [], 0
    with _compile_only(lambda name, kernel: compiled.append((name, kernel))):
        for arch in args.arch:
            _target(arch)
            for name, run in _cases():
                if args.case not in name or (args.core_after_first and arch != args.arch[0] and name not in CORE):
                    continue
                compiled.clear()
                try:
                    run()
                except Exception as e:  # a compile error: report it, go on with the next case
                    failures += 1
                    report.append({"arch": arch, "case": name, "error": f"{type(e).__name__}: {e}"[:2000]})
                    print(f"sm_{arch}  {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                for kname, kern in compiled:
                    res = _resources(kern.asm["ptx"], arch)
                    shared = int(kern.metadata.shared)
                    # tensor-core products reading TF32 operands: only where precision="tf32" asks for them
                    tf32 = len(re.findall(r"\bw?gmma[\w.]*\.tf32|\bmma[\w.]*\.tf32", kern.asm["ptx"]))
                    row = {"arch": arch, "case": name, "kernel": kname, "num_warps": kern.metadata.num_warps,
                           "shared_bytes": shared, "tf32_mma": tf32, **res}
                    bad = []
                    if tf32 and "tf32" not in name:
                        bad.append("TF32 tensor-core products without precision='tf32'")
                    if "reg" not in res:
                        bad.append("ptxas -v gave no resource report")
                    spilled = res.get("spill_stores", 0) + res.get("spill_loads", 0)
                    if spilled > SPILL_LIMIT:
                        bad.append(f"spills {spilled} B a thread to local memory")
                    if shared > MAX_SHARED.get(arch, 48 * 1024):
                        bad.append(f"shared memory {shared} B > {MAX_SHARED.get(arch, 48 * 1024)} B")
                    row["problems"] = bad
                    failures += bool(bad)
                    report.append(row)
                    print(f"sm_{arch}  {name:42s} {kname:10s} warps {row['num_warps']}  regs {res.get('reg', '?'):>3}  "
                          f"shared {shared:6d} B  stack {res.get('stack', '?'):>3} B  "
                          f"spills {res.get('spill_stores', '?')}/{res.get('spill_loads', '?')} B  tf32 mma {tf32}"
                          + (f"  PROBLEM: {', '.join(bad)}" if bad else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__, "kernels": report}, f, indent=1)
    print(f"triton {triton.__version__}: {len(report)} kernel compilations, {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
