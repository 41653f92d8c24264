"""What copa_loss and class_means run outside a torch.compile graph: the number of classes read
from the labels, with the input checks, when ``num_classes`` is not given.

Reading the labels synchronises, which a graph cannot hold. A compiled model that leaves
``num_classes`` out still runs — a graph break there, the checks included, as in eager code — and
``fullgraph=True`` refuses with a reason that says what to pass instead. Imported only while
torch.compile traces (the API imports it in that branch; Dynamo runs the import itself): its
``torch.compiler.disable`` imports torch._dynamo, which ``import copa_fast`` leaves alone.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .api import _readable_values


def _boundary(fn, reason: str):
    """``fn`` run eagerly wherever torch.compile meets it; torch releases whose ``disable`` has no
    ``reason`` give their own message."""
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:
        return torch.compiler.disable(fn)


def _values(*args) -> int:
    with _readable_values():
        return V.values(*args)


def _labels(*args) -> int:
    with _readable_values():
        return V.labels(*args, check_values=True)


values = _boundary(_values, "copa_fast.copa_loss: num_classes not given, so it is read from the labels (with the "
                   "input checks) outside the graph; pass num_classes=C to trace the step as one graph")
labels = _boundary(_labels, "copa_fast.class_means: num_classes not given, so it is read from the labels (with "
                   "the input checks) outside the graph; pass num_classes=C to trace it in one graph")
