"""Throughput of the whole episode adaptation — CoPA's 50 Adam steps on sampled Meta-Dataset-shaped
episodes, the README's main job — side by side in one run: the published per-episode loop
(``copa_fast.reference.adapt``, eager PyTorch), ``copa_fast.adapt`` on each kernel backend of the
device, and ``adapt_many`` on the batched ones (a GPU). One benchmark round adapts the same episodes
(5-50 ways, support <= 500, D = 512); ``extra_info`` carries the episode count and episodes/s.

Run: ``pytest benchmarks/bench_adapt.py --benchmark-columns=median,ops``.
COPA_BENCH_SHAPES=small: two small episodes, 5 steps (a dry run).
"""

import os

import pytest
import torch

import copa_fast
from copa_fast import reference as ref
from copa_fast.episodes import sample_episodes, synthetic_features

SMALL = os.environ.get("COPA_BENCH_SHAPES") == "small"
STEPS = 5 if SMALL else 50


def _episodes(device):
    feats, labels = synthetic_features(dim=64 if SMALL else 512, seed=0)
    count = 2 if SMALL else (16 if device.type == "cuda" else 8)
    eps = sample_episodes(feats, labels, count, seed=1, max_support=40 if SMALL else 500)
    return [e.to(device) for e in eps]


def _impls(device):
    kernels = [b for b in copa_fast.available_backends() if b in ("cpu", "triton", "cuda")
               and (b == "cpu") == (device.type == "cpu")]
    impls = {"published-loop": lambda eps: [ref.adapt(*_parts(e), steps=STEPS) for e in eps]}
    for b in kernels:
        impls[f"adapt-{b}"] = lambda eps, b=b: [copa_fast.adapt(*_parts(e), steps=STEPS, backend=b) for e in eps]
        if b in ("triton", "cuda"):
            impls[f"adapt_many-{b}"] = lambda eps, b=b: copa_fast.adapt_many(eps, steps=STEPS, backend=b)
    return impls


def _parts(e):
    return e.support, e.support_labels, e.query, e.query_labels


IMPLS = ["published-loop", "adapt-cpu", "adapt-triton", "adapt-cuda", "adapt_many-triton", "adapt_many-cuda"]


@pytest.mark.parametrize("impl", IMPLS)
def test_adapt_episodes(benchmark, device, impl):
    impls = _impls(device)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device.type} here")
    eps = _episodes(device)
    fn = impls[impl]

    def run():
        results = fn(eps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return results

    results = run()   # warm-up (compilation); every implementation must adapt every episode
    assert len(results) == len(eps) and all(len(r.losses) == STEPS for r in results)
    rounds = 3 if device.type == "cpu" else 5
    benchmark.extra_info.update({"episodes": len(eps), "steps": STEPS, "impl": impl, "device": str(device),
                                 "mean_query_accuracy": sum(r.query_accuracy for r in results) / len(results)})
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["episodes_per_s"] = len(eps) / benchmark.stats.stats.median
