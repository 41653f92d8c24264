"""MKL's vector math dispatch, resolved once at import.

On x86 CPUs, PyTorch's float32 / float64 unary ops (exp, log, sqrt, ...) call MKL's vector math
(VML) from every intra-op thread on its share of the tensor. The oneMKL 2024.2 that torch's wheels
bundle picks each function's kernel at its first call; when that first call runs on several
threads at once, one thread can run its whole share with a low-accuracy kernel, for that one call
(pytorch/pytorch#188792). Seen on this project's 2-core development machine (CI's kind): the
first ``torch.exp`` of a process on 3451 floats, split over two threads, came back in ~1 process in
50 with the second half at up to 1.5e-4 relative error (about 1770 float32 ulp), and the next call
was exact.

The ``cpu`` kernel no longer calls ATen's exp (csrc/cpu/row_kernels.inc has its own), but the
package's PyTorch paths do (``reference``'s and the composite op's log-sum-exps, ``distributed``,
Adam's square root): one single-threaded call of each function the package relies on, per dtype,
resolves the dispatch before any concurrent use. It costs a few microseconds at import and
changes no result of a correctly dispatched call."""

from __future__ import annotations

import torch


def resolve_vml_dispatch() -> None:
    """Call exp, log and sqrt once on a one-element float32 and float64 tensor (one thread)."""
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.ones(1, dtype=dtype)
        torch.exp(one)
        torch.log(one)
        torch.sqrt(one)
