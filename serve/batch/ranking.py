"""The routing stage: a Ray Data actor that embeds each batch of prompts and ranks the pool for each."""

from __future__ import annotations

import numpy as np
import pandas as pd

from serve.core.artifact import PoolRanking, RouterArtifact

DECISION_COLUMNS = ("routed_model", "ranked_models", "predicted_quality", "estimated_cost_usd", "task", "task_probability")
# Nullable dtypes, so a batch with missing prompts writes the same schema as one without.
_DECISION_DTYPES = {"routed_model": "string", "ranked_models": "object", "predicted_quality": "Float64",
                    "estimated_cost_usd": "Float64", "task": "Int64", "task_probability": "Float64"}


def decision_columns(decision: PoolRanking, models: list[str]) -> dict[str, list]:
    """The decision as output columns; `ranked_models` lists the eligible models, best first."""
    rows = np.arange(len(decision.order))
    chosen = decision.order[:, 0]
    names = np.asarray(models, dtype=object)
    return {
        "routed_model": names[chosen].tolist(),
        "ranked_models": [names[order[eligible]].tolist() for order, eligible in zip(decision.order, decision.eligible)],
        "predicted_quality": decision.quality[rows, chosen].astype(float).tolist(),
        "estimated_cost_usd": decision.cost[rows, chosen].astype(float).tolist(),
        "task": decision.task.astype(int).tolist(),
        "task_probability": decision.task_probability.astype(float).tolist(),
    }


def _spread(values: list, present: np.ndarray, index: pd.Index, dtype: str) -> pd.Series:
    """`values` on the rows where `present` holds, null on the others."""
    remaining = iter(values)
    return pd.Series([next(remaining) if here else None for here in present], index=index, dtype=dtype)


class BatchRanker:
    """Ray Data actor: loads the artifact and its encoder once, then routes each batch of prompts.

    A row without a prompt (null) gets null output columns instead of failing the whole job. The encoder uses
    `threads` torch threads: Ray sets an actor's to its whole CPUs only, so an actor given 1.5 CPUs would use one."""

    dtypes = _DECISION_DTYPES  # the columns it writes

    def __init__(self, artifact_dir: str, prompt_column: str, cost_weight: float, allowed: np.ndarray | None,
                 cost_cap: float | None, device: str, threads: int):
        import torch

        from serve.core.encoder import load_encoder

        torch.set_num_threads(threads)
        self.artifact = RouterArtifact.load(artifact_dir)
        self.encoder = load_encoder(self.artifact.embedder, device=device)
        self.prompt_column, self.cost_weight, self.allowed, self.cost_cap = prompt_column, cost_weight, allowed, cost_cap

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        present = batch[self.prompt_column].notna().to_numpy()
        texts = batch[self.prompt_column][present].tolist()
        columns = self.decide(texts) if texts else dict.fromkeys(self.dtypes, [])
        return batch.assign(**{name: _spread(values, present, batch.index, self.dtypes[name]) for name, values in columns.items()})

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The prompts' embeddings and token counts, as the Embedder deployment computes them."""
        from serve.core.encoder import count_tokens, encode

        return encode(self.encoder, texts), count_tokens(texts, self.artifact.embedder)

    def decide(self, texts: list[str]) -> dict[str, list]:
        embeddings, tokens = self.embed(texts)
        decision = self.artifact.route(embeddings, texts, tokens, self.cost_weight, allowed=self.allowed, cost_cap=self.cost_cap)
        return decision_columns(decision, self.artifact.models)
