"""The CPU row kernels' exp (csrc/cpu/row_kernels.inc) built as a host program with the extension's
own compiler flags (read from setup.py) and checked against long double expl: float32 within 0.51
ulp (evaluated in double, rounded once), float64 within 1.5 ulp, from below underflow to past
overflow with NaN and the infinities, every instruction-set copy this CPU runs giving the same bits
(tests/row_kernels_check.cpp). The op-level tests see this exp only through the loss."""

import ast
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _extension_cxx_flags():
    """setup.py's `cxx = [...]` list: the host program is compiled as the extension is."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r"^\s*cxx = (\[.*?\])", f.read(), re.M)
    assert m, "setup.py: no `cxx = [...]` line"
    return ast.literal_eval(m.group(1))


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_row_kernel_exp_accuracy_and_copies(tmp_path):
    flags = _extension_cxx_flags()
    assert "-ffp-contract=off" in flags
    exe = tmp_path / "row_kernels_check"
    build = subprocess.run([CXX, "-std=c++17", *flags, "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "cpu"),
                            os.path.join(ROOT, "tests", "row_kernels_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["float32", "float64"], run.stdout
