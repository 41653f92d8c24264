"""Shared fixtures: episode generator, the one tolerance table, the backends under test.

Triton kernels run on CPU tensors under the interpreter where there is no GPU: the variable must
be set before triton is first imported.
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copa_fast  # noqa: E402

# CI draws the same property-test examples on every run (a red CI must mean a regression, not a
# new draw); anywhere else each run explores new ones, and what they find becomes an @example.
try:
    from hypothesis import settings
except ImportError:   # a machine without hypothesis skips the property tests alone
    pass
else:
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("COPA_FAST_HYPOTHESIS_PROFILE") == "ci":
        settings.load_profile("ci")


# For benchmarks/gpu_check.sh, which runs the suite under a time limit on a lent GPU: each failure's
# report is appended to COPA_FAST_FAILURE_LOG the moment it happens (a run stopped at its limit
# prints no summary), and once COPA_FAST_TEST_DEADLINE (seconds since the epoch) has passed the
# remaining tests are skipped, so that pytest ends by itself and prints its summary.
_FAILURE_LOG = os.environ.get("COPA_FAST_FAILURE_LOG")
_DEADLINE = float(os.environ.get("COPA_FAST_TEST_DEADLINE") or 0)


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("COPA_FAST_TEST_DEADLINE passed (the gpu_check.sh stage's time is up)")


def pytest_runtest_logreport(report):
    # under pytest-xdist the controller sees every worker's reports: it alone writes (a worker
    # process has PYTEST_XDIST_WORKER set)
    if _FAILURE_LOG and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(_FAILURE_LOG, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")


def pytest_configure(config):
    # Under the interpreter the Triton kernels run as numpy, which warns on an overflowing exp or an
    # invalid product even in lanes a select later discards — and once in a lane it did not (a NaN
    # gradient, ninth session). Every such warning fails the test here; the kernels raise none.
    if os.environ.get("TRITON_INTERPRET") == "1":
        config.addinivalue_line("filterwarnings", "error::RuntimeWarning")


# One tolerance table for every test: relative error (Frobenius norm for tensors) against the
# float64 reference. float32 bounds are DESIGN §4's; float16/bfloat16 inputs are computed in
# float32 by copa_fast, so their bound is that of rounding the inputs and the outputs.
TOL = {
    torch.float64: {"loss": 1e-10, "grad": 1e-9},
    torch.float32: {"loss": 1e-5, "grad": 1e-4},
    torch.float16: {"loss": 3e-3, "grad": 3e-2},
    torch.bfloat16: {"loss": 2e-2, "grad": 1e-1},
}

KERNEL_BACKENDS = [b for b in copa_fast.available_backends() if b != "reference"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_for(backend: str) -> torch.device:
    """The device a single-device test runs ``backend`` on: CUDA where the backend needs it or a
    GPU exists for it, else the CPU (Triton under the interpreter)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_device_pairs():
    """Every (backend, device) combination that can run here."""
    out = []
    for b in KERNEL_BACKENDS:
        for d in DEVICES:
            if not copa_fast.backends._runs_on(b, torch.device(d)):   # triton: CPU only when interpreted
                continue
            marks = [pytest.mark.cuda] if d == "cuda" else []
            out.append(pytest.param(b, d, id=f"{b}-{d}", marks=marks))
    return out


def count_tolist_reads(monkeypatch) -> list:
    """From here on in the test, the size of each tensor read back with ``tolist`` (one device read
    each: one synchronisation on a GPU), in order."""
    reads: list = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or real(self))
    return reads


def finiteness_check_form(monkeypatch, *, multi_tensor: bool) -> None:
    """Makes the episode checks' finiteness (``_validate.finite_flags``) take one form on every
    device: CUDA's foreach norms (True) or one aminmax a tensor (False)."""
    from copa_fast import _validate as V

    real = V.finite_flags
    monkeypatch.setattr(V, "finite_flags", lambda tensors, **_: real(tensors, multi_tensor=multi_tensor))


class CudaSyncs:
    """Counts the host synchronisations with the GPU (a blocking copy either way, item, nonzero,
    a stream synchronise) that torch's sync debug mode reports inside the ``with`` block."""

    def __enter__(self):
        import warnings

        torch.cuda.synchronize()
        self._record = warnings.catch_warnings(record=True)
        self._seen = self._record.__enter__()
        warnings.simplefilter("always")
        self._mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self._mode)
        self._record.__exit__(*exc)
        self.messages = [str(w.message) for w in self._seen if "synchroniz" in str(w.message)]
        self.count = len(self.messages)
        return False


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def tied_one_class_problem(dtype=torch.float32):
    """(x, p, labels) with D = 1 and one class: every score is -exp(tau) and the loss is log 2 at
    every tau, dloss/dtau = 0 — a log-sum-exp rounded at size exp(tau) shows at once."""
    return (torch.tensor([[-0.2905], [-1.0704]], dtype=dtype), torch.tensor([[1.2645]], dtype=dtype),
            torch.tensor([0, 0]))


def empty_class_problem(dtype=torch.float64):
    """(x, p, labels): 4 classes with samples and a fifth prototype no label names (what validation
    rejects; with it off the published form simply never sees that class). The empty class sits near
    some rows, so at large tau its score exceeds their row maximum by far more than exp can hold."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(30, 8, generator=g, dtype=dtype)
    p = torch.randn(5, 8, generator=g, dtype=dtype)
    p[4] = 3 * x[:5].mean(0)
    return x, p, torch.arange(30) % 4


def make_episode(n, c, d, *, seed=0, dtype=torch.float32, device="cpu", one_shot=0, scale=1.0):
    """Random episode: every class present, unequal counts, ``one_shot`` classes with one sample."""
    g = torch.Generator().manual_seed(seed)
    assert n >= c
    labels = torch.arange(c)
    if n > c:
        # skewed class frequencies; the first `one_shot` classes get no extra samples
        weights = torch.rand(c, generator=g) ** 2 + 0.05
        weights[:one_shot] = 0
        if weights.sum() == 0:
            weights[:] = 1
        extra = torch.multinomial(weights, n - c, replacement=True, generator=g)
        labels = torch.cat([labels, extra])
    labels = labels[torch.randperm(n, generator=g)]
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    x = centers[labels] + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * scale
    return x.to(dtype=dtype, device=device), labels.to(device)


@pytest.fixture
def episode():
    return make_episode
