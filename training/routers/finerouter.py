"""FineRouter and its ablations as the evaluation builds them: one fit per (training set, seed, graph), shared
by the variants that only change the blend."""

from __future__ import annotations

import weakref
from typing import ClassVar

from serve.core.artifact import RouterArtifact
from training.fit import FitConfig, fit_router
from training.routers.base import ArtifactRouter, TrainingSet

_fitted: weakref.WeakKeyDictionary[TrainingSet, dict] = weakref.WeakKeyDictionary()


def evaluation_fit(data: TrainingSet, seed: int, semantic_only: bool = False) -> RouterArtifact:
    cache = _fitted.setdefault(data, {})
    key = (seed, semantic_only)
    if key not in cache:
        config = FitConfig(seed=seed, trainer="local", **({"mixes": (0.0,)} if semantic_only else {}))
        cache[key] = fit_router(data, config, log=lambda message: None)
    return cache[key]


class FineRouter(ArtifactRouter):
    """`finerouter`: the artifact `python -m training fit` would write for this training set and seed, with
    the blend between the task table and the MoE chosen on its validation slice."""

    blend: ClassVar[float | None] = None  # None: the blend chosen on validation
    semantic_only: ClassVar[bool] = False  # the task graph's edges from prompt similarity alone

    @classmethod
    def fit(cls, train, seed):
        artifact = evaluation_fit(train, seed, cls.semantic_only)
        return cls(artifact if cls.blend is None else artifact.with_blend(cls.blend))


class FineRouterStage1(FineRouter):
    """`finerouter_stage1`: the task table alone."""

    blend = 0.0


class FineRouterStage2(FineRouter):
    """`finerouter_stage2`: the mixture of experts alone."""

    blend = 1.0


class FineRouterSemanticGraph(FineRouter):
    """`finerouter_semantic_graph`: tasks found on a graph of prompt similarity only (no performance mix)."""

    semantic_only = True
