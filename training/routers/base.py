"""What every router of the evaluation shares: the training set it learns from, the one interface it implements
(RouteLLM style: one abstract `Router`, one registry in `training.routers.registry`), and how a router is scored
and tuned on a validation slice.

Most routers only predict each pool model's quality on each prompt; the shared decision rule
(`serve.core.decision.rank_models`) turns that into choices, so those routers differ only in what they know.
Cascades and the reference points (the oracle, fixed choices) give their curve directly.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import faiss
import numpy as np

from serve.core.answer_facts import AnswerFacts
from serve.core.artifact import RouterArtifact
from serve.core.decision import CostModel
from training.datasets import RoutingTable
from training.metrics import curve_aiq, trace_curve


@dataclass(eq=False)  # hashed by identity, so fitted routers can be cached per training set
class TrainingSet:
    """A routing table's training rows with their prompt embeddings, and what their recorded answers say
    where the table has answers (the cascades need them)."""

    table: RoutingTable
    embeddings: np.ndarray
    answers: AnswerFacts | None = None

    @cached_property
    def cost_model(self) -> CostModel:
        return CostModel.fit(self.table.prompt_tokens, self.table.costs)

    @cached_property
    def cost_scale(self) -> float:
        """Mean cost of the most expensive model: the unit of the dimensionless cost weight."""
        return float(self.table.costs.mean(axis=0).max()) or 1.0

    def subset(self, rows: np.ndarray) -> TrainingSet:
        return TrainingSet(self.table.subset(rows), self.embeddings[rows], None if self.answers is None else self.answers.subset(rows))

    def validation_split(self, seed: int, fraction: float = 0.2) -> tuple[TrainingSet, TrainingSet]:
        """A seeded (fit, validation) split that keeps duplicate prompts on one side."""
        unique, group = np.unique(np.asarray(self.table.prompts, dtype=object), return_inverse=True)
        held = np.random.default_rng(seed).random(len(unique)) < fraction
        return self.subset(~held[group]), self.subset(held[group])


Curve = tuple[np.ndarray, np.ndarray]  # per-prompt (costs, qualities), each [operating points, prompts]


class Router(ABC):
    """A router as the evaluation runs it: fitted on a training fold (`fit`), it yields its curve on test prompts
    (`curve`). What it needs and how the report treats it are declared on the class."""

    learned: ClassVar[bool] = True  # fitted once per seed, with AIQ gains against its rivals; else a reference point, one curve a fold
    baseline: ClassVar[bool] = False  # a rival in "AIQ gain vs best baseline"
    cascade: ClassVar[bool] = False  # several models may answer a prompt: runs by default only where the table records answers
    needs_answers: ClassVar[bool] = False  # without recorded answers it does not apply and is left out

    @classmethod
    def fit(cls, train: TrainingSet, seed: int) -> Router:
        """The router fitted on a training fold with this seed."""
        return cls(train, seed)

    def curve(self, train: TrainingSet, test: TrainingSet) -> Curve:
        """The realised per-prompt (costs, qualities) on `test` at each cost weight of the sweep
        (`training.metrics.COST_WEIGHTS`); `train` is the set it was fitted on, whose cost model prices the test
        prompts. By default: the shared decision rule on `predict_quality`'s estimates."""
        table = test.table
        quality = self.predict_quality(test.embeddings, table.prompts)
        return trace_curve(quality, train.cost_model.estimate(table.prompt_tokens), table.scores, table.costs, train.cost_scale)

    def predict_quality(self, embeddings: np.ndarray, prompts: list[str]) -> np.ndarray:
        """[N, M] predicted quality (expected score in [0, 1]) for N prompts (their embeddings and texts)."""
        raise TypeError(f"{type(self).__name__} implements neither predict_quality nor curve")


class ArtifactRouter(Router):
    """A router artifact seen through the evaluation's Router interface."""

    def __init__(self, artifact: RouterArtifact):
        self.artifact = artifact

    def predict_quality(self, embeddings, prompts):
        return self.artifact.predict(embeddings, prompts)[0]


def validation_score(router: Router, train: TrainingSet, validation: TrainingSet) -> float:
    """What tuning maximises: AIQ on the validation slice, or the routed quality where all models cost alike."""
    curve = router.curve(train, validation)
    table = validation.table
    score = curve_aiq(curve, table.costs) if table.has_costs else None
    return float(curve[1][0].mean()) if score is None else score


def tune(build: Callable[[TrainingSet, int, object], Router], options, data: TrainingSet, seed: int) -> tuple[Router, object]:
    """Pick the option with the best validation score, then refit it on all of `data`."""
    fit_part, validation = data.validation_split(seed)
    scores = [validation_score(build(fit_part, seed, option), fit_part, validation) for option in options]
    best = options[int(np.argmax(scores))]
    return build(data, seed, best), best


def inner_product_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index
