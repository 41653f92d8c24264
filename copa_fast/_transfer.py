"""Small host tensors (sizes, offsets, indices) moved to a device without draining its queue."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor) on ``device``. On CUDA the copy is queued on the current stream from
    pinned memory: a plain ``.to`` from pageable memory copies and then waits for the stream, so it
    stalls the host until every kernel queued before it has run (adapt_many's groups used to meet
    three such waits each). torch's pinned-memory allocator keeps the staging block until the copy
    has run, so ``t`` may be changed or freed at once. Elsewhere, and while the stream is being
    captured into a CUDA graph (a replay would read the staging block again, long after it went
    back to the allocator; the plain copy refuses capture, as it did), a plain ``.to``."""
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
