"""Benchmark fixtures: machine description attached to every result (card, driver, versions)."""

import os

import pytest
import torch

from copa_fast.bench import machine_info

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["copa_fast_machine"] = machine_info()


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
