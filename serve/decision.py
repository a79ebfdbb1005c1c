"""The decision rule: the one function that turns predicted quality and estimated cost into a ranked choice.

The evaluation harness, the batch job and the Ranker deployment all call `rank_models`, so what is
evaluated is what is served. NumPy only: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Named cost weights. The weight is dimensionless: the quality (on a 0-1 scale) one would give up to save the
# cost of one call of the pool's most expensive model (the artifact's `cost_scale`).
PRESETS = {"quality": 0.0, "balanced": 0.05, "cheap": 0.5}


@dataclass(frozen=True)
class CostModel:
    """USD per query = per_token[m] x prompt tokens + fixed[m]; `fixed` holds the expected output cost.

    Fitted by least squares on the training prompts' costs, so it is exact where the data's cost is
    price x tokens, and an estimate where real costs vary with the answer's length.
    """

    per_token: np.ndarray  # [M]
    fixed: np.ndarray  # [M]

    @classmethod
    def fit(cls, prompt_tokens: np.ndarray, costs: np.ndarray) -> CostModel:
        design = np.stack([prompt_tokens.astype(float), np.ones(len(prompt_tokens))], axis=1)
        coef, *_ = np.linalg.lstsq(design, costs, rcond=None)
        per_token = np.clip(coef[0], 0, None)
        fixed = np.clip((costs - prompt_tokens[:, None] * per_token).mean(axis=0), 0, None)
        return cls(per_token=per_token, fixed=fixed)

    def estimate(self, prompt_tokens: np.ndarray) -> np.ndarray:
        """[N, M] estimated USD per query."""
        return np.asarray(prompt_tokens, float)[:, None] * self.per_token[None, :] + self.fixed[None, :]


def rank_models(
    quality: np.ndarray,
    cost: np.ndarray,
    cost_weight: float,
    cost_scale: float,
    *,
    allowed: np.ndarray | None = None,
    cost_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the pool for each prompt by quality - cost_weight x cost / cost_scale, best first.

    quality, cost: [N, M]. allowed: [M] or [N, M] bool, the request's candidate list. cost_cap: USD per query.
    Exact ties go to the cheaper model. Returns (order [N, M] model indices, eligible [N, M] bool aligned with
    order): a model is eligible when it is allowed and under the cap; where the cap excludes every allowed
    model, the cheapest allowed one stays eligible, so every prompt gets an answer.
    Returns the full order so that a failed backend falls back to the next eligible model.
    """
    quality, cost = np.asarray(quality, float), np.asarray(cost, float)
    n, m = quality.shape
    ok = np.ones((n, m), bool) if allowed is None else np.broadcast_to(np.asarray(allowed, bool), (n, m))
    if not ok.any(axis=1).all():
        raise ValueError("allowed excludes every model of the pool")
    eligible = ok.copy()
    if cost_cap is not None:
        eligible &= cost <= cost_cap
        none_left = ~eligible.any(axis=1)
        cheapest_allowed = np.argmin(np.where(ok, cost, np.inf), axis=1)
        eligible[none_left, cheapest_allowed[none_left]] = True
    utility = np.where(eligible, quality - cost_weight * cost / cost_scale, -np.inf)
    # lexsort: last key is primary. Higher utility first, then cheaper, then pool order.
    index = np.broadcast_to(np.arange(m), (n, m))
    order = np.lexsort((index, cost, -utility), axis=1)
    return order, np.take_along_axis(eligible, order, axis=1)


def choose(quality, cost, cost_weight, cost_scale, **limits) -> np.ndarray:
    """[N] the chosen model index per prompt (the head of `rank_models`)."""
    order, _ = rank_models(quality, cost, cost_weight, cost_scale, **limits)
    return order[:, 0]
