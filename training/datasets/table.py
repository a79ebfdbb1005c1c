"""The canonical routing table (prompts x models -> score, cost) every dataset is loaded into, and its assembly:
prompt tokens counted with the embedder's tokenizer, costs priced from them where the data has none, train
prompts that also occur in a held-out split dropped."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from serve.core.encoder import count_tokens

# Output length assumed where a dataset records none (llmrouter_9model, routerdc_7model), in tokens.
DEFAULT_OUTPUT_TOKENS = 256


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, and the row and column where it can."""


@dataclass(frozen=True)
class RoutingTable:
    """N prompts x M models. `split` is "train", "test" or "ood" (test-only, out of distribution)."""

    name: str
    models: list[str]
    prompt_ids: np.ndarray  # [N] str
    prompts: list[str]  # the text the router embeds
    benchmarks: np.ndarray  # [N] str
    splits: np.ndarray  # [N] str
    scores: np.ndarray  # [N, M] float, quality in [0, 1]
    costs: np.ndarray  # [N, M] float, USD per query
    prompt_tokens: np.ndarray | None = None  # [N] int, where known
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> USD per 1M (in, out)
    responses: np.ndarray | None = None  # [N, M] object (str), each model's recorded answer, where the data has them

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.models)
        for name in ("prompt_ids", "benchmarks", "splits"):
            if len(getattr(self, name)) != n:
                raise DatasetError(f"{self.name}: {name} has {len(getattr(self, name))} rows, prompts {n}")
        for name in ("scores", "costs", "responses"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n, m):
                raise DatasetError(f"{self.name}: {name} has shape {getattr(self, name).shape}, want {(n, m)}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_costs(self) -> bool:
        """False where every model costs the same on every prompt: routing is then quality-only."""
        return bool(np.ptp(self.costs, axis=1).max() > 0) if len(self) else False

    def subset(self, rows: np.ndarray) -> RoutingTable:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(
            self,
            prompt_ids=self.prompt_ids[rows],
            prompts=[self.prompts[i] for i in rows],
            benchmarks=self.benchmarks[rows],
            splits=self.splits[rows],
            scores=self.scores[rows],
            costs=self.costs[rows],
            prompt_tokens=None if self.prompt_tokens is None else self.prompt_tokens[rows],
            responses=None if self.responses is None else self.responses[rows],
        )


def _priced_costs(prompt_tokens: np.ndarray, output_tokens: np.ndarray, prices: list[tuple[float, float]]) -> np.ndarray:
    """USD per query: price_in x prompt tokens + price_out x output tokens, prices per 1M tokens."""
    price_in = np.array([p[0] for p in prices])
    price_out = np.array([p[1] for p in prices])
    return (prompt_tokens[:, None] * price_in[None, :] + output_tokens * price_out[None, :]) / 1e6


def drop_train_overlaps(table: RoutingTable) -> RoutingTable:
    """Remove train rows whose prompt text also occurs in a test or ood row, so no test prompt is trained on."""
    held_out = {p for p, s in zip(table.prompts, table.splits) if s != "train"}
    keep = np.array([s != "train" or p not in held_out for p, s in zip(table.prompts, table.splits)])
    return table.subset(keep)


def build_table(name, models, ids, prompts, benchmarks, splits, scores, embedder, costs=None, prices=None, output_tokens=None, responses=None):
    """Assemble a table; prompt tokens are counted with the embedder's tokenizer, as serving counts them, and
    where `costs` is None they are priced from those counts."""
    scores = np.asarray(scores, dtype=np.float64)
    tokens = count_tokens(prompts, embedder)
    if costs is None:
        out = np.full(scores.shape, DEFAULT_OUTPUT_TOKENS, dtype=np.float64) if output_tokens is None else output_tokens
        costs = _priced_costs(tokens, out, [prices[m] for m in models])
    table = RoutingTable(
        name=name,
        models=list(models),
        prompt_ids=np.asarray(ids, dtype=object),
        prompts=list(prompts),
        benchmarks=np.asarray(benchmarks, dtype=object),
        splits=np.asarray(splits, dtype=object),
        scores=scores,
        costs=np.asarray(costs, dtype=np.float64),
        prompt_tokens=tokens,
        prices=dict(prices or {}),
        responses=None if responses is None else _object_array(responses),
    )
    return drop_train_overlaps(table)


def _object_array(rows: list[list[str]]) -> np.ndarray:
    """[N, M] object array of strings (np.asarray would make a fixed-width unicode array)."""
    array = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        array[i, :] = row
    return array
