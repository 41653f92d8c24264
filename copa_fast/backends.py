"""Backend discovery and selection.

Backends: ``reference`` (the published N x N form in eager PyTorch, any device, any dtype),
``cpu`` (the C++ kernel, CPU tensors), ``triton`` (CUDA tensors; CPU tensors too when
TRITON_INTERPRET=1), ``cuda`` (the CUDA C++ kernels, CUDA tensors). ``backend=None`` picks the
fastest one for the tensors' device (for adapt_many: for batches of episodes); the environment
variable COPA_FAST_BACKEND overrides that default (an explicit ``backend=`` argument still wins).
"""

from __future__ import annotations

import os
import sys

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "COPA_FAST_BACKEND"


_TRITON: dict = {}


def _triton_importable() -> bool:
    if "ok" not in _TRITON:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON["ok"] = True
        except Exception:  # a broken triton install must not break the package
            _TRITON["ok"] = False
    return _TRITON["ok"]


def triton_interpreted() -> bool:
    """Whether the Triton kernels run under Triton's interpreter (on CPU tensors).

    Triton fixes that when it decorates a kernel, which copa_fast does at the kernels' first use:
    from then on the kernels' own state is the answer, whatever TRITON_INTERPRET says now (a
    variable set or cleared later must not make the backend claim tensors its kernels cannot run).
    Before that first use, the variable decides."""
    kernels = sys.modules.get("copa_fast.triton.symmetric_ce")
    if kernels is not None:
        return kernels.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """The backends usable on this machine, in the order listed in BACKENDS."""
    return list(_available())


_AVAILABLE: dict = {}   # interpreter switch -> the answer (asked on every call: keep it cheap)


def _constant_result(fn):
    """``torch.compiler.assume_constant_result``'s mark, set here: that decorator imports
    torch._dynamo (~1.2 s, half of ``import copa_fast`` on the project's CPU machine) only to set
    this one attribute, which torch.compile reads when it meets a call of ``fn`` (torch 2.0 to 2.14;
    tests/test_build.py checks that torch's decorator still marks a function this way and no other)."""
    fn._dynamo_marked_constant = True
    return fn


# torch.compile treats the answer as a constant of the traced graph (no graph break).
@_constant_result
def _available() -> tuple:
    key = triton_interpreted()
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _probe()
    return _AVAILABLE[key]


def _probe() -> tuple:
    out = ["reference"]
    if _extension.loaded():
        out.append("cpu")
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreted()):
        out.append("triton")
    if _extension.has_cuda_kernels() and torch.cuda.is_available():
        out.append("cuda")
    return tuple(out)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def default_backend(device: torch.device, *, batched: bool = False) -> str:
    """The fastest available backend for ``device``, as measured (benchmarks/RESULTS.md, H200,
    2026-11-27, second lease): on CUDA tensors ``cuda``, then ``triton``, for a single problem
    (plain call 359 us against 1.02 ms at N = 500; ahead at every benchmarked size) and for
    batches of episodes (``batched``: adapt_many; 10.1 against 26.3 us per episode-step over 132
    ragged episodes, 600 x 50 steps in 1.59 against 2.05 s). ``batched`` stays for callers: the
    order is the same since the cuda kernels took a warp per row."""
    avail = available_backends()
    order: tuple[str, ...] = ("cpu", "reference")
    if device.type == "cuda":
        order = ("cuda", "triton", "reference")
    return next(b for b in order if b in avail)


def resolve(backend: str | None, device: torch.device, *, batched: bool = False) -> str:
    """Returns the backend to run on tensors of ``device`` (``batched``: for a batch of episodes);
    raises ValueError naming the problem."""
    # A C++ kernel named for tensors it runs on needs no probe: it is in available_backends() iff the
    # extension loaded (cpu) or has CUDA kernels (cuda; CUDA tensors mean a working CUDA).
    if backend == "cpu" and device.type == "cpu" and _extension.loaded():
        return "cpu"
    if backend == "cuda" and device.type == "cuda" and _extension.has_cuda_kernels():
        return "cuda"
    source = "backend"
    if backend is None:
        env = os.environ.get(ENV_VAR)
        if not env:
            return default_backend(device, batched=batched)
        backend, source = env, f"{ENV_VAR} (environment)"
    if backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS} or None, got {backend!r}")
    if backend not in available_backends():
        why = {
            "cpu": f"the C++ extension is not built ({_extension.load_error()})",
            "triton": "triton needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
            "cuda": "the CUDA kernels need a CUDA build of copa_fast and a GPU",
        }.get(backend, "")
        raise ValueError(f"{source}: {backend!r} is not available here ({why}); "
                         f"available: {available_backends()}")
    if not _runs_on(backend, device):
        raise ValueError(f"{source}: {backend!r} does not run on {device.type} tensors; "
                         f"move the tensors or pick another backend")
    return backend
