"""Build of copa_fast: the C++ CPU kernels always, the CUDA kernels where a CUDA torch and nvcc exist.

Environment: COPA_FAST_CUDA=0 skips the CUDA build, =1 requires it; TORCH_CUDA_ARCH_LIST (default
"8.0;9.0") picks the targets; MAX_JOBS bounds parallel compilation (ninja).
Install with ``pip install --no-build-isolation .`` so that the extension is compiled against the
torch that is installed, not a different one in an isolated build environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit(torch, cpp_extension):
    """The CUDA toolkit's root: torch's own pick (CUDA_HOME, else nvcc's location) when it holds
    the runtime headers, else /usr/local/cuda or /usr/local/cuda-<torch's CUDA version>; None when
    none does. torch guesses from the nvcc on PATH, and a wrapper script there (``exec
    /usr/local/cuda-13.0/bin/nvcc``) makes it guess ``/usr/local``, whose include/ lacks the CUDA
    headers: the build then failed deep in a compile. The root found is given to torch's builder."""
    picks = [cpp_extension.CUDA_HOME, "/usr/local/cuda", f"/usr/local/cuda-{torch.version.cuda}"]
    for root in picks:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")) and \
                os.path.isfile(os.path.join(root, "bin", "nvcc")):
            if root != cpp_extension.CUDA_HOME:
                print(f"copa_fast: CUDA toolkit at {root} (torch's pick, {cpp_extension.CUDA_HOME}, has no CUDA "
                      "headers; set CUDA_HOME to choose another)", file=sys.stderr)
                cpp_extension.CUDA_HOME = root   # where torch's builder reads it (include dirs, nvcc)
            return root
    return None


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("copa_fast: torch is not installed; building the pure-Python package only "
              "(install torch first, then reinstall with --no-build-isolation)", file=sys.stderr)
        return [], {}

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                      glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -ffp-contract=off: no multiply-add contraction, so the CPU row kernels' per-ISA copies
    # (csrc/cpu/row_kernels.inc) give the same bits; -fno-trapping-math: selects such as the exp
    # kernel's clamps may become vector blends (no value changes, only FP exception flags are not
    # kept). The C++ standard is torch's choice.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    want = os.environ.get("COPA_FAST_CUDA", "auto")
    toolkit = _cuda_toolkit(torch, cpp_extension) if want != "0" and torch.version.cuda is not None else None
    have_cuda = toolkit is not None
    if want == "1" and not have_cuda:
        raise RuntimeError("COPA_FAST_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc and "
                           "include/cuda_runtime_api.h) was found: set CUDA_HOME to the toolkit's root")
    if want != "0" and have_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # the kernels and their one ATen binding (host_check.cpp is the host-emulation test driver)
        cu = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        cu.append(os.path.join("csrc", "cuda", "binding.cpp"))
        ext = cpp_extension.CUDAExtension(
            "copa_fast._C", sources + cu,
            extra_compile_args={"cxx": cxx + ["-DCOPA_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DCOPA_FAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp"])
    else:
        if want != "0":
            print("copa_fast: no CUDA torch or CUDA toolkit found; building the CPU extension only", file=sys.stderr)
        ext = cpp_extension.CppExtension("copa_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="copa_fast",
    version="0.1.0",
    description="Fused kernels for CoPA few-shot adaptation (symmetric CE over two linear adapters)",
    packages=find_packages(include=["copa_fast", "copa_fast.*"]),
    package_data={"copa_fast": ["data/*.npz", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={"plot": ["matplotlib"], "progress": ["tqdm"]},
    entry_points={"console_scripts": ["copa-fast=copa_fast.cli:main"]},
)
