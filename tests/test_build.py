"""CMakeLists.txt compiles the CUDA kernels with plain nvcc (no torch, no GPU) for sm_80 and sm_90;
ptxas must report no register spills for any kernel."""

import os
import re
import shutil
import subprocess

import pytest

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
    assert len(kernels) == 4   # copa_sce_single and copa_sce_episodes, float and double
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) >= len(entries) and all(a == "0" and b == "0" for a, b in spills), spills
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert regs and max(regs) <= 255
    print("ptxas registers per kernel:", regs)
