"""copa_fast: fused kernels for CoPA (Tian et al., NeurIPS 2024) few-shot adaptation.

Public API: symmetric_ce, symmetric_ce_with_stats, copa_loss, CoPAHead, adapt, adapt_many,
available_backends, class_means; the readable oracle lives in copa_fast.reference, the episode
sampler in copa_fast.episodes.
"""

from . import _mkl_vml, episodes, reference
from .api import (AdaptResult, CoPAHead, adapt, adapt_many, class_means, copa_loss, symmetric_ce,
                  symmetric_ce_with_stats)
from .backends import available_backends

__all__ = ["AdaptResult", "CoPAHead", "adapt", "adapt_many", "available_backends", "class_means", "copa_loss",
           "episodes", "reference", "symmetric_ce", "symmetric_ce_with_stats"]
__version__ = "0.1.0"

_mkl_vml.resolve_vml_dispatch()
