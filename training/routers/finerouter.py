"""FineRouter and its ablations as the evaluation builds them: one fit per (training set, seed, graph), shared
by the variants that only change the blend."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from serve.core.artifact import RouterArtifact
from training.fit import FitConfig, fit_router
from training.routers.base import ArtifactRouter, Router, TrainingSet

_fitted: weakref.WeakKeyDictionary[TrainingSet, dict] = weakref.WeakKeyDictionary()


def evaluation_fit(data: TrainingSet, seed: int, semantic_only: bool = False) -> RouterArtifact:
    cache = _fitted.setdefault(data, {})
    key = (seed, semantic_only)
    if key not in cache:
        config = FitConfig(seed=seed, trainer="local", **({"mixes": (0.0,)} if semantic_only else {}))
        cache[key] = fit_router(data, config, log=lambda message: None)
    return cache[key]


# name -> builder(training set, seed) -> router.
FINEROUTER_VARIANTS: dict[str, Callable[[TrainingSet, int], Router]] = {
    "finerouter": lambda data, seed: ArtifactRouter(evaluation_fit(data, seed)),
    "finerouter_stage1": lambda data, seed: ArtifactRouter(evaluation_fit(data, seed).with_blend(0.0)),
    "finerouter_stage2": lambda data, seed: ArtifactRouter(evaluation_fit(data, seed).with_blend(1.0)),
    "finerouter_semantic_graph": lambda data, seed: ArtifactRouter(evaluation_fit(data, seed, semantic_only=True)),
}
