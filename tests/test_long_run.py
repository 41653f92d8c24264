"""Long runs: 10,000 forward + backward calls keep the process's resident memory flat."""

import resource

import pytest
import torch

import copa_fast
from conftest import make_episode


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_ten_thousand_calls_keep_rss_flat():
    x, y = make_episode(40, 5, 24, seed=0)
    head = copa_fast.CoPAHead(24, backend="cpu")
    for _ in range(500):  # warm the allocator
        head(x, y).backward()
    before = _rss_mib()
    for _ in range(10_000):
        head.zero_grad(set_to_none=True)
        head(x, y).backward()
    growth = _rss_mib() - before
    assert growth < 16.0, f"resident memory grew by {growth:.1f} MiB over 10,000 calls"
    if torch.cuda.is_available():
        xc, yc = x.cuda(), y.cuda()
        for backend in [b for b in ("triton", "cuda") if b in copa_fast.available_backends()]:
            headc = copa_fast.CoPAHead(24, backend=backend).cuda()
            headc(xc, yc).backward()
            base = torch.cuda.memory_allocated()
            for _ in range(10_000):
                headc.zero_grad(set_to_none=True)
                headc(xc, yc).backward()
            assert torch.cuda.memory_allocated() <= base, f"{backend}: CUDA allocated memory grew"
