"""Loads the compiled extension (copa_fast._C) once; the package still imports without it."""

from __future__ import annotations

from typing import Optional, Union

import torch

_STATE: dict[str, Optional[Union[bool, str]]] = {"loaded": None, "error": None}


def loaded() -> bool:
    if _STATE["loaded"] is None:
        try:
            from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers torch.ops.copa_fast.*)

            _STATE["loaded"] = True
        except ImportError as exc:  # built without a compiler, or torch changed under it
            _STATE["loaded"], _STATE["error"] = False, str(exc)
    return bool(_STATE["loaded"])


def load_error() -> str | None:
    loaded()
    error = _STATE["error"]
    return None if error is None else str(error)


def has_cuda_kernels() -> bool:
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("copa_fast::symmetric_ce", "CUDA")


_SUMMARY: dict[str, bool] = {}


def value_summary_on(device_type: str) -> bool:
    """Whether copa_fast::value_summary (the value checks in one call) has a kernel for the device."""
    if device_type not in _SUMMARY:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _SUMMARY[device_type] = key is not None and loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "copa_fast::value_summary", key)
    return _SUMMARY[device_type]
