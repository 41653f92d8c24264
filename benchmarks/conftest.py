"""Benchmark fixtures: machine description attached to every result (card, driver, versions)."""

import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")


def machine_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            info["driver"] = None
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["copa_fast_machine"] = machine_info()


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
