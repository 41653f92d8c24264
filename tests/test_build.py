"""Without a GPU: the C++ CPU kernels run the CPU tests under AddressSanitizer; CMakeLists.txt
compiles the CUDA kernels with plain nvcc (no torch) for sm_80 and sm_90, and ptxas must report no
register spills for any kernel; every Triton kernel compiles for
sm_90 and sm_80 through Triton's own pipeline (benchmarks/triton_aot.py), within the spill and
shared-memory limits; and benchmarks/gpu_check.sh, the script a lent GPU runs, works in its dry run."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget  # noqa: F401
    HAVE_TRITON_NVIDIA = os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia"))
except ImportError:
    HAVE_TRITON_NVIDIA = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs cmake and nvcc")
def test_cuda_kernels_compile_with_plain_nvcc_without_spills(tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *gen, f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    out = subprocess.run(["cmake", "--build", str(build), "--target", "copa_fast_cuda_kernels", "--verbose"],
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    kernels = {name for name, _ in entries}
    assert {arch for _, arch in entries} == {"sm_80", "sm_90"}
    # copa_sce_single, _episodes, _phase and copa_class_means, float and double; the value checks'
    # copa_count_nonfinite (16-, 32- and 64-bit floats) and copa_label_summary (int32, int64 labels)
    assert len(kernels) == 13, sorted(kernels)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) >= len(entries) and all(a == "0" and b == "0" for a, b in spills), spills
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 255
    print("ptxas registers per kernel:", regs)


@pytest.mark.skipif(not HAVE_TRITON_NVIDIA, reason="needs triton with its NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests compile and run these kernels")
def test_triton_kernels_compile_for_sm90_and_sm80(tmp_path):
    # The interpreter never compiles a kernel: a construct only the compiler rejects (a plain
    # global read inside @triton.jit was one) would first show on a GPU. Compile them all here:
    # every case for sm_90, the core ones for sm_80 (the full sm_80 set is the manual run's, after
    # a kernel change: benchmarks/triton_aot.py --arch 90 80).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_aot.py"), "--arch", "90", "80",
                          "--core-after-first", "--json", str(report)], capture_output=True, text=True, timeout=900,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    kernels = json.loads(report.read_text())["kernels"]
    names = {(k["arch"], k["kernel"]) for k in kernels}
    expected = {"_class_means", "_prep", "_scores", "_colstats", "_grads", "_episodes"}
    assert names == {(a, n) for a in (90, 80) for n in expected}
    assert all(not k["problems"] and k["reg"] <= 255 for k in kernels)
    # the opt-in TF32 mode really runs its products on TF32 tensor cores (the default never does:
    # a "problem" above)
    for kernel in ("_scores", "_grads", "_episodes"):
        assert all(k["tf32_mma"] > 0 for k in kernels
                   if k["kernel"] == kernel and "tf32" in k["case"] and "fused" in k["case"]), kernel
    print(out.stdout[-3000:])


@pytest.mark.skipif(not HAVE_TRITON_NVIDIA, reason="needs triton with its NVIDIA backend")
def test_triton_kernels_compile_once_for_episodes_of_any_n_and_c():
    """Triton compiles a kernel again for each new specialisation of its integer arguments: the
    kernels whose N, C and counts only bound loops and masks compile ONCE for problems of any N and
    C (twelve step shapes, N and C divisible by 16 or not; three episode groups). Before, over 100
    sampled episodes, the five step kernels made 25 compiled variants (26-27 s of compilation on a
    first run here), now 15 (19-20 s): the scores and gradient kernels keep C, the gradient kernel
    N too (their registers need them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_aot.py"), "--variants"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    once = ("_class_means", "_prep", "_colstats", "_episodes")
    assert {k: counts[k] for k in once} == dict.fromkeys(once, 1), counts
    assert counts["_scores"] <= 3, counts   # C alone: divisible by 16, 1, or neither
    print("compiled variants per kernel:", counts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU machine runs the script for real")
def test_gpu_check_script_bench_stage_dry_run(tmp_path):
    """benchmarks/gpu_check.sh, the script a lent GPU runs, keeps working: its bench stage in dry-run
    mode (small shapes, CPU) ends with every stage ok and writes the table; the tests stage is
    skipped through its budget of 0 (the path a short lease takes)."""
    # not an xdist worker's variables: pytest-benchmark would see them and disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TESTS_BUDGET_S="0")
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "tests", "bench"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== status: tests=skipped bench=ok extras=ok adapt=ok sweep=ok" in r.stdout, r.stdout[-3000:]
    assert "test_adapt_episodes[adapt-cpu]" in r.stdout   # the episode-throughput benchmark ran
    table = (tmp_path / "table.md").read_text()
    assert "500 x 50 x 512 | published-eager" in table and "copa_fast-cpu" in table


def test_import_leaves_torch_dynamo_alone_and_the_backend_list_a_compile_constant():
    """copa_fast marks its backend list as ``torch.compiler.assume_constant_result`` does, without
    that decorator's import of torch._dynamo (~1.2 s of a process's start): torch's decorator must
    still mark a function by that one attribute, and ``import copa_fast`` (with a first loss call)
    must not import torch._dynamo. That torch.compile then traces the API without a graph break is
    checked by the fullgraph tests."""
    code = ("import sys, torch, copa_fast\n"
            "x, y = torch.randn(6, 4), torch.arange(6) % 2\n"
            "copa_fast.copa_loss(x, y, torch.eye(4, requires_grad=True), torch.eye(4)).backward()\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]

    def probe():
        return 1

    before = set(vars(probe))
    assert torch.compiler.assume_constant_result(probe) is probe
    assert {k: v for k, v in vars(probe).items() if k not in before} == {"_dynamo_marked_constant": True}
    from copa_fast import backends
    assert vars(backends._available).get("_dynamo_marked_constant") is True


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="needs mypy (requirements-test.txt)")
def test_package_type_checks_clean(tmp_path):
    """copa_fast ships a py.typed marker, so users' type checkers read its annotations: mypy with the
    project's configuration (pyproject.toml) must find no error in the package."""
    assert os.path.exists(os.path.join(ROOT, "copa_fast", "py.typed"))
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="needs ruff (requirements-test.txt)")
def test_sources_lint_clean():
    """ruff with the project's configuration (pyproject.toml) finds nothing in the package, the tests,
    the benchmarks or setup.py: no unused or undefined name, no zip() that would cut a comparison short."""
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "copa_fast", "tests", "benchmarks",
                          "setup.py"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def _gcc_runtime(name):
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN, LIBSTDCXX = _gcc_runtime("libasan.so"), _gcc_runtime("libstdc++.so")


@pytest.mark.skipif(sys.platform != "linux" or LIBASAN is None or LIBSTDCXX is None,
                    reason="needs gcc's AddressSanitizer runtime (Linux)")
def test_cpu_kernels_under_address_sanitizer(tmp_path):
    """The C++ CPU kernels built with AddressSanitizer, and the CPU tests that reach them (bad labels
    with validation off, every op and its autograd, the property tests) run against that build in a
    child process with the sanitizer's runtime preloaded: any out-of-bounds access aborts it. (The
    CUDA kernels get the same check through their host emulation, tests/test_cuda_kernels_host.py.)"""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "out", "*.so", "__pycache__",
                                                             ".hypothesis", ".benchmarks", "*.egg-info"))
    flags = "-fsanitize=address -fno-omit-frame-pointer"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                           text=True, env=dict(os.environ, COPA_FAST_CUDA="0", CFLAGS=flags, LDFLAGS="-fsanitize=address"))
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    # libstdc++ preloaded beside libasan: otherwise the sanitizer cannot intercept C++ throws. Reports
    # go to files: pytest's capture would swallow them with the process the sanitizer ends.
    logs = tmp_path / "asan"
    env = dict(os.environ, LD_PRELOAD=f"{LIBASAN} {LIBSTDCXX}", PYTHONPATH=str(src),
               ASAN_OPTIONS=f"detect_leaks=0:log_path={logs}")
    env.pop("PYTEST_XDIST_WORKER", None)
    where = subprocess.run([sys.executable, "-c", "import copa_fast._C, copa_fast; print(copa_fast.__file__)"],
                           cwd=src, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(src)), where.stdout + where.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not triton",
                          "tests/test_validation.py", "tests/test_symmetric_ce.py", "tests/test_episodes.py",
                          "tests/test_properties.py", "tests/test_higher_order.py"],
                         cwd=src, env=env, capture_output=True, text=True, timeout=1200)
    reports = "".join(f.read_text() for f in tmp_path.glob("asan.*"))
    assert not reports, reports[:4000]
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
