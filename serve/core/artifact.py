"""The router artifact: everything a routing decision needs, in one versioned, checksummed directory.

    ARTIFACT_DIR/manifest.json   format version, embedder, pool (models, prices), cost model scale, training
                                 config, validation metrics, and the sha256 of every other file
    ARTIFACT_DIR/weights.npz     the task classifier, the mixture of experts, the task quality table, the
                                 blend weight and the cost model, as plain arrays; where the training data
                                 recorded the models' answers, the post-hoc estimator that judges answers
                                 for cascades (`posthoc_*` arrays, its feature groups in the manifest)

Inference is a few matrix products in NumPy, so the evaluation harness, the batch job and the Ranker
deployment load this one type and call `route`, which ends in the shared decision rule (or, for cascades,
`serve.core.cascade.next_step` with `posthoc`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.core.atomic import atomic_directory
from serve.core.decision import CostModel, rank_models
from serve.core.features import FEATURE_NAMES, prompt_features
from serve.core.posthoc import ESTIMATOR_ARRAYS, PostHocEstimator

# 3: no calibration arrays, one blend weight; prompt features in linear time on a bounded window (serve.core.features).
# 4: an optional post-hoc estimator. A format-3 artifact reads as one without it; a build that reads only 3
# refuses a 4, which may hold an estimator it would ignore.
FORMAT_VERSION = 4
READABLE_FORMATS = (3, 4)
POSTHOC_PREFIX = "posthoc_"
WEIGHT_ARRAYS = (
    "feature_mean",  # [F] standardisation of the prompt features
    "feature_std",  # [F]
    "classifier_w1",  # [D+F, Hc] task classifier p(task | prompt): one hidden layer
    "classifier_b1",  # [Hc]
    "classifier_w2",  # [Hc, T]
    "classifier_b2",  # [T]
    "trunk_w",  # [D+F, H] mixture of experts: shared trunk
    "trunk_b",  # [H]
    "general_w",  # [H, M] general heads, one logit per model
    "general_b",  # [M]
    "task_w",  # [T, H, M] task-specific heads (residual logits on each task's candidates)
    "task_b",  # [T, M]
    "candidates",  # [T, M] 1 where the model is one of the task's candidates
    "task_quality",  # [T, M] each model's mean quality on each task, shrunk toward the global mean
    "blend",  # [] weight of the MoE against the task table
    "cost_per_token",  # [M] the cost model (serve.core.decision.CostModel)
    "cost_fixed",  # [M]
)


class ArtifactError(ValueError):
    """A router artifact that cannot be used; the message says which file and what is wrong."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def network_inputs(embeddings: np.ndarray, texts: list[str], feature_mean: np.ndarray, feature_std: np.ndarray) -> np.ndarray:
    """[N, D+F] what the networks read: the embedding beside the standardised prompt features. Training builds
    its network inputs with this function too, so the two cannot drift apart."""
    features = (prompt_features(texts) - feature_mean) / feature_std
    return np.concatenate([np.asarray(embeddings, np.float32), features.astype(np.float32)], axis=1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PoolRanking:
    """The pool ranked for each of N prompts (M models): what `RouterArtifact.route` returns."""

    order: np.ndarray  # [N, M] model indices, best first
    eligible: np.ndarray  # [N, M] bool, aligned with order
    quality: np.ndarray  # [N, M] predicted quality, pool order
    cost: np.ndarray  # [N, M] estimated USD, pool order
    task: np.ndarray  # [N] most likely task
    task_probability: np.ndarray  # [N]


@dataclass
class RouterArtifact:
    manifest: dict
    weights: dict[str, np.ndarray]
    path: Path | None = field(default=None, compare=False)

    @property
    def models(self) -> list[str]:
        return list(self.manifest["models"])

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]

    @property
    def cost_scale(self) -> float:
        return float(self.manifest["cost_scale"])

    @property
    def cost_model(self) -> CostModel:
        return CostModel(per_token=self.weights["cost_per_token"], fixed=self.weights["cost_fixed"])

    @property
    def embedding_dimension(self) -> int:
        return self.weights["trunk_w"].shape[0] - len(FEATURE_NAMES)

    @property
    def posthoc(self) -> PostHocEstimator | None:
        """The estimator that judges answers for cascades; None where the training data recorded no answers."""
        if "posthoc" not in self.manifest:
            return None
        arrays = {name: self.weights[POSTHOC_PREFIX + name] for name in ESTIMATOR_ARRAYS}
        return PostHocEstimator(groups=tuple(self.manifest["posthoc"]["groups"]), **arrays)

    def with_posthoc(self, estimator: PostHocEstimator, details: dict) -> RouterArtifact:
        """The same router with a post-hoc estimator; `details` (how it was fitted) go to the manifest."""
        arrays = {POSTHOC_PREFIX + name: array for name, array in estimator.arrays().items()}
        return RouterArtifact({**self.manifest, "posthoc": {"groups": list(estimator.groups), **details}}, {**self.weights, **arrays})

    def _array_names(self) -> list[str]:
        return list(WEIGHT_ARRAYS) + ([POSTHOC_PREFIX + name for name in ESTIMATOR_ARRAYS] if "posthoc" in self.manifest else [])

    def with_blend(self, blend: float) -> RouterArtifact:
        """The same router with one blend weight for every task (1: MoE only, 0: task table only)."""
        return RouterArtifact(self.manifest, {**self.weights, "blend": np.float32(blend)})

    def inputs(self, embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
        return network_inputs(embeddings, texts, self.weights["feature_mean"], self.weights["feature_std"])

    def task_probabilities(self, inputs: np.ndarray) -> np.ndarray:
        w = self.weights
        hidden = np.maximum(inputs @ w["classifier_w1"] + w["classifier_b1"], 0)
        return _softmax(hidden @ w["classifier_w2"] + w["classifier_b2"])

    def moe_logits(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([N, M] the mixture of experts' quality logits, [N, T] task probabilities) from `inputs`."""
        w = self.weights
        tasks = self.task_probabilities(inputs)
        hidden = np.maximum(inputs @ w["trunk_w"] + w["trunk_b"], 0)
        task_logits = np.einsum("nh,thm->ntm", hidden, w["task_w"]) + w["task_b"][None]
        return hidden @ w["general_w"] + w["general_b"] + np.einsum("nt,ntm->nm", tasks, task_logits * w["candidates"][None]), tasks

    def predict_inputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([N, M] blended quality, [N, T] task probabilities) from the networks' `inputs`."""
        w = self.weights
        logits, tasks = self.moe_logits(inputs)
        moe = 0.5 * (1 + np.tanh(logits / 2))  # the logistic function, without overflow
        blend = float(w["blend"])
        return blend * moe + (1 - blend) * (tasks @ w["task_quality"]), tasks

    def predict(self, embeddings: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """([N, M] blended quality, [N, T] task probabilities) of prompts: their embeddings and texts."""
        return self.predict_inputs(self.inputs(embeddings, texts))

    def route(
        self,
        embeddings: np.ndarray,
        texts: list[str],
        prompt_tokens: np.ndarray,
        cost_weight: float,
        *,
        allowed: np.ndarray | None = None,
        cost_cap: float | None = None,
    ) -> PoolRanking:
        quality, tasks = self.predict(embeddings, texts)
        cost = self.cost_model.estimate(prompt_tokens)
        order, eligible = rank_models(quality, cost, cost_weight, self.cost_scale, allowed=allowed, cost_cap=cost_cap)
        return PoolRanking(order, eligible, quality, cost, tasks.argmax(axis=1), tasks.max(axis=1))

    def save(self, path: Path | str) -> Path:
        """Write atomically: a complete artifact appears at `path`, or nothing changes there."""
        path = Path(path)
        missing = [name for name in self._array_names() if name not in self.weights]
        if missing:
            raise ArtifactError(f"cannot save an artifact without {missing}")
        with atomic_directory(path) as staging:
            np.savez(staging / "weights.npz", **{name: self.weights[name] for name in self._array_names()})
            manifest = {
                **self.manifest,
                "format_version": FORMAT_VERSION,
                "features": list(FEATURE_NAMES),
                "checksums": {"weights.npz": _sha256(staging / "weights.npz")},
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        self.manifest, self.path = manifest, path
        return path

    @classmethod
    def load(cls, path: Path | str) -> RouterArtifact:
        """Load and verify: refuses a missing file, a checksum mismatch, another format version, or weights
        whose shapes disagree with the manifest's pool."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise ArtifactError(f"{path}: not a router artifact (no manifest.json); build one with `python -m training fit`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ArtifactError(f"{manifest_path}: not valid JSON ({error.msg})") from None
        if manifest.get("format_version") not in READABLE_FORMATS:
            raise ArtifactError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, this build reads "
                                f"{' and '.join(map(str, READABLE_FORMATS))}; train it again with `python -m training fit`")
        for name, expected in manifest.get("checksums", {}).items():
            if not (path / name).is_file():
                raise ArtifactError(f"{path / name}: missing (the artifact is incomplete)")
            if _sha256(path / name) != expected:
                raise ArtifactError(f"{path / name}: checksum mismatch (the file was changed or corrupted after training)")
        if "weights.npz" not in manifest.get("checksums", {}):
            raise ArtifactError(f"{manifest_path}: no checksum for weights.npz")
        with np.load(path / "weights.npz") as archive:
            weights = {name: archive[name] for name in archive.files}
        artifact = cls(manifest, weights, path)
        missing = [name for name in artifact._array_names() if name not in weights]
        if missing:
            raise ArtifactError(f"{path / 'weights.npz'}: missing arrays {missing}")
        models = len(manifest["models"])
        shapes = {"general_w": weights["general_w"].shape[1], "task_quality": weights["task_quality"].shape[1]}
        if "posthoc" in manifest:
            shapes |= {name: weights[POSTHOC_PREFIX + name].shape[0] for name in ("answer_weights", "resolution")}
            shapes["prior_weights"] = weights[POSTHOC_PREFIX + "prior_weights"].shape[0] - 2
        for name, size in shapes.items():
            if size != models:
                raise ArtifactError(f"{path}: weights are for {size} models, the manifest lists {models} ({name})")
        if manifest.get("features") != list(FEATURE_NAMES):
            raise ArtifactError(f"{manifest_path}: trained with prompt features {manifest.get('features')}, this build computes {list(FEATURE_NAMES)}")
        return artifact
