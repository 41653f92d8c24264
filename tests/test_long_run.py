"""Long runs: 10,000 forward + backward calls keep the process's resident memory (and, on a GPU,
the CUDA allocated memory) flat."""

import resource

import pytest
import torch

import copa_fast
from conftest import make_episode

# the cpu backend on CPU tensors; each kernel backend on CUDA tensors where there is a GPU (its own
# test, so that a slow host's CPU run cannot use up a time limit the GPU run needs)
CASES = [pytest.param("cpu", "cpu", id="cpu-cpu")] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.cuda)
    for b in ("triton", "cuda") if torch.cuda.is_available() and b in copa_fast.available_backends()]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("backend,device", CASES)
def test_ten_thousand_calls_keep_memory_flat(backend, device):
    x, y = make_episode(40, 5, 24, seed=0)
    x, y = x.to(device), y.to(device)
    head = copa_fast.CoPAHead(24, backend=backend).to(device)
    for _ in range(500):  # warm the allocators
        head(x, y).backward()
    before = _rss_mib()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(10_000):
        head.zero_grad(set_to_none=True)
        head(x, y).backward()
    growth = _rss_mib() - before
    assert growth < 16.0, f"{backend}: resident memory grew by {growth:.1f} MiB over 10,000 calls"
    if device == "cuda":
        assert torch.cuda.memory_allocated() <= base, f"{backend}: CUDA allocated memory grew"
