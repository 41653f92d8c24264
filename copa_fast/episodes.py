"""A seeded Meta-Dataset-style episode sampler over a feature array and its labels.

Follows Meta-Dataset's variable-way variable-shot recipe: ways uniform in [5, min(50, K)] over the
K classes that have enough samples; ``query_per_class`` query images per class; a support-set
budget ``min(max_support, sum_c ceil(beta * min(100, available_c)))`` with beta ~ U(0, 1], split
between classes in proportion to their available images times a random factor in [0.5, 2], at
least one shot each. Labels are remapped to 0..ways-1 in each episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .reference import _tensor_summary


@dataclass(repr=False, eq=False)
class Episode:
    """support (N, D), support_labels (N,), query (M, D), query_labels (M,); labels in 0..C-1.

    Prints on one line (shapes, not values); compares and hashes by identity, as AdaptResult does;
    saved with torch.save, loads with torch.load's default weights_only=True once copa_fast is
    imported."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_tensor_summary(getattr(self, name))}"
                           for name in ("support", "support_labels", "query", "query_labels"))
        ways = self.ways if self.support_labels.numel() else 0   # a repr never raises, even on an empty one
        return f"Episode({fields}, ways={ways})"

    @property
    def ways(self) -> int:
        return int(self.support_labels.max()) + 1

    def to(self, device) -> "Episode":
        return Episode(*(t.to(device) for t in (self.support, self.support_labels, self.query,
                                                 self.query_labels)))


torch.serialization.add_safe_globals([Episode])


def sample_episodes(features, labels, n_episodes: int, *, seed: int = 0, min_ways: int = 5, max_ways: int = 50,
                    max_support: int = 500, query_per_class: int = 10, max_shots: int = 100) -> list[Episode]:
    """Samples ``n_episodes`` episodes from (M, D) features with (M,) integer labels.

    Raises ValueError when fewer than ``min_ways`` classes have ``query_per_class + 1`` samples.
    Deterministic for a given seed.
    """
    feats = torch.as_tensor(features)
    labs = np.asarray(torch.as_tensor(labels).cpu())
    if feats.dim() != 2 or labs.ndim != 1 or len(labs) != feats.shape[0]:
        raise ValueError(f"features, labels: expected (M, D) and (M,), got {tuple(feats.shape)} and {labs.shape}")
    if not np.issubdtype(labs.dtype, np.integer):
        raise TypeError(f"labels: expected integer class ids, got {labs.dtype}")
    for name, value in (("n_episodes", n_episodes), ("min_ways", min_ways), ("max_ways", max_ways),
                        ("max_support", max_support), ("query_per_class", query_per_class), ("max_shots", max_shots)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if max_ways < min_ways:
        raise ValueError(f"max_ways: expected at least min_ways ({min_ways}), got {max_ways}")
    if max_support < min_ways:   # every way takes at least one support sample
        raise ValueError(f"max_support: expected at least min_ways ({min_ways}), got {max_support}")
    classes, counts = np.unique(labs, return_counts=True)
    eligible = classes[counts >= query_per_class + 1]
    if len(eligible) < min_ways:
        raise ValueError(f"labels: need at least {min_ways} classes with {query_per_class + 1} or more samples "
                         f"(a {min_ways}-way episode with {query_per_class} queries per class), "
                         f"found {len(eligible)}")
    index = {c: np.flatnonzero(labs == c) for c in eligible}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_episodes):
        ways = int(rng.integers(min_ways, min(max_ways, len(eligible), max_support) + 1))
        chosen = rng.choice(eligible, size=ways, replace=False)
        perms = [rng.permutation(index[c]) for c in chosen]
        avail = np.array([len(p) - query_per_class for p in perms])
        beta = 1.0 - rng.random()  # (0, 1]
        budget = min(max_support, int(sum(math.ceil(beta * min(max_shots, a)) for a in avail)))
        budget = max(budget, ways)
        share = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=ways)) * avail
        share = share / share.sum()
        shots = np.minimum(np.floor(share * (budget - ways)).astype(int) + 1, avail)
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for k, (p, n) in enumerate(zip(perms, shots, strict=True)):
            q_idx.append(p[:query_per_class])
            s_idx.append(p[query_per_class:query_per_class + n])
            q_lab.append(np.full(query_per_class, k))
            s_lab.append(np.full(n, k))
        support_rows, query_rows = np.concatenate(s_idx), np.concatenate(q_idx)
        out.append(Episode(feats[torch.as_tensor(support_rows)],
                           torch.as_tensor(np.concatenate(s_lab), dtype=torch.int64),
                           feats[torch.as_tensor(query_rows)],
                           torch.as_tensor(np.concatenate(q_lab), dtype=torch.int64)))
    return out


def synthetic_features(n_classes: int = 64, per_class: int = 60, dim: int = 512, *, seed: int = 0):
    """Seeded Gaussian class clusters on a shared low-rank backbone-like subspace: (M, D) float32
    features and (M,) labels. Used by the demo and the benchmarks, not a stand-in for real data."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, dim, generator=g) / 8
    centers = torch.randn(n_classes, 64, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    latent = centers[labels] + 1.2 * torch.randn(len(labels), 64, generator=g)
    feats = torch.relu(latent @ basis + 0.3 * torch.randn(len(labels), dim, generator=g))
    return feats, labels
