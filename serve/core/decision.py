"""The decision rules: predicted quality and estimated cost into a ranked choice (routing), or into the next step
of a cascade.

The evaluation harness, the batch job and the Ranker deployment all call `rank_models`, so what is evaluated
is what is served; all three take every cascade step with `cascade_step` (through `serve.core.cascade.next_step`).
NumPy only: no Ray, no torch.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

# Named cost weights. The weight is dimensionless: the quality (on a 0-1 scale) one would give up to save the
# cost of one call of the pool's most expensive model (the artifact's `cost_scale`).
POLICIES = ("route", "cascade")  # how a request is answered: one routed model, or a cascade
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


def _allowed(allowed: np.ndarray | None, n: int, m: int) -> np.ndarray:
    """[N, M] the request's candidate list per prompt (every model when None); it must leave one model at least."""
    ok = np.ones((n, m), bool) if allowed is None else np.broadcast_to(np.asarray(allowed, bool), (n, m))
    if not ok.any(axis=1).all():
        raise ValueError("allowed excludes every model of the pool")
    return ok


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
    ok = _allowed(allowed, n, m)
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


# Cascades run at most this many models per prompt unless a request asks otherwise.
CASCADE_DEPTH = 3


@dataclass(frozen=True)
class CascadeStep:
    """One step of cascade routing for N prompts: `next_model` [N] is the model to run now, -1 to stop;
    `answer` [N] is the run model whose answer is the best so far (highest post-hoc quality), -1 if none ran."""

    next_model: np.ndarray
    answer: np.ndarray


@functools.lru_cache(maxsize=16)
def _supermodels(models: int, depth: int) -> np.ndarray:
    """[K, M] bool: every set of 1..depth pool models."""
    sets = [s for size in range(1, min(depth, models) + 1) for s in itertools.combinations(range(models), size)]
    members = np.zeros((len(sets), models), bool)
    for k, s in enumerate(sets):
        members[k, list(s)] = True
    return members


def _expected_best(best_so_far: np.ndarray, quality: np.ndarray, resolution: np.ndarray, members: np.ndarray) -> np.ndarray:
    """[N, K] E[max(best so far, the post-hoc qualities of the models of each set)].

    A model not yet run will have a post-hoc quality that averages its current estimate p: modelled as
    (1 - r) p + r with probability p, else (1 - r) p, where r (its `resolution`, in [0, 1]) says how much
    seeing the answer moves the estimate (0: not at all, 1: to certainty). The models' outcomes are taken as
    independent; E[max] = integral over t in [0, 1] of P(max > t), exact for these step distributions.
    """
    low = (1 - resolution) * quality
    high = low + resolution
    points = np.sort(np.concatenate([np.zeros((len(quality), 1)), best_so_far[:, None], low, high, np.ones((len(quality), 1))], axis=1), axis=1)
    starts, widths = points[:, :-1], np.diff(points, axis=1)  # [N, P]: every CDF is constant on [start, start + width)
    t = starts[:, :, None]
    cdf = np.where(t < low[:, None, :], 0.0, np.where(t < high[:, None, :], 1 - quality[:, None, :], 1.0))  # [N, P, M]
    log_cdf_of_set = np.log(np.maximum(cdf, 1e-300)) @ members.T.astype(float)  # [N, P, K]
    below = np.exp(log_cdf_of_set) * (starts >= best_so_far[:, None])[:, :, None]  # P(max <= t)
    return np.einsum("np,npk->nk", widths, 1.0 - below)


def cascade_step(
    quality: np.ndarray,
    cost: np.ndarray,
    ran: np.ndarray,
    cost_weight: float,
    cost_scale: float,
    *,
    resolution: np.ndarray | float = 1.0,  # [M] or [N, M]
    allowed: np.ndarray | None = None,
    cost_cap: float | None = None,
    max_depth: int = CASCADE_DEPTH,
) -> CascadeStep:
    """Cascade routing (Dekoninck, Baader and Vechev, ICML 2025): stop, or run the next model.

    quality: [N, M] the post-hoc estimate of each model already run (`ran` [N, M]), the current (ex-ante)
    estimate of the others. cost: [N, M] USD, spent for the models run, estimated for the others.
    For every set of models not yet run that keeps the cascade within `max_depth` models (and, with
    `cost_cap`, its total within the cap; the request's `allowed` models only), the value is E[best quality
    after running them] - cost_weight x their cost / cost_scale; stopping is the empty set, its value the best
    quality so far. The cascade stops if that wins, else runs the cheapest model of the best set. With
    nothing run yet the step must run a model: where the cap excludes every allowed one, the cheapest allowed
    one runs, as in `rank_models`. Ties go to the cheaper choice. Resolution 0 everywhere (answers say
    nothing) makes the first step `rank_models`'s choice and the second a stop.
    """
    quality, cost, ran = np.asarray(quality, float), np.asarray(cost, float), np.asarray(ran, bool)
    n, m = quality.shape
    ok = _allowed(allowed, n, m)
    resolution = np.broadcast_to(np.clip(np.asarray(resolution, float), 0.0, 1.0), (n, m))
    members = _supermodels(m, max_depth)
    sizes = members.sum(axis=1)
    members, sizes = members[sizes <= max_depth - ran.sum(axis=1).min()], sizes[sizes <= max_depth - ran.sum(axis=1).min()]
    started = ran.any(axis=1)
    if not len(members):  # every prompt has run its `max_depth` models
        return CascadeStep(next_model=np.full(n, -1), answer=np.argmax(np.where(ran, quality, -np.inf), axis=1))
    best_so_far = np.where(started, np.where(ran, quality, -np.inf).max(axis=1), 0.0)
    answer = np.where(started, np.argmax(np.where(ran, quality, -np.inf), axis=1), -1)
    spent = np.where(ran, cost, 0.0).sum(axis=1)
    set_cost = np.where(ran, 0.0, cost) @ members.T  # [N, K]
    valid = ((members[None] & (ran | ~ok)[:, None, :]).sum(axis=2) == 0) & (sizes[None] + ran.sum(axis=1)[:, None] <= max_depth)
    if cost_cap is not None:
        capped = valid & (spent[:, None] + set_cost <= cost_cap)
        cheapest_allowed = np.argmin(np.where(ok, cost, np.inf), axis=1)
        forced = ~started & ~capped.any(axis=1)  # nothing fits under the cap: the cheapest allowed model alone
        capped[forced] = (sizes == 1) & members[:, cheapest_allowed[forced]].T
        valid = capped
    next_model = np.full(n, -1)
    chunk = max(1, int(2e7 // (members.shape[0] * (2 * m + 3))))  # bounds the [prompts, points, sets] array
    for lo in range(0, n, chunk):
        rows = slice(lo, lo + chunk)
        value = _expected_best(best_so_far[rows], np.where(ran[rows], 0.0, quality[rows]), resolution[rows], members)
        value = np.where(valid[rows], value - cost_weight * set_cost[rows] / cost_scale, -np.inf)
        stop_value = np.where(started[rows], best_so_far[rows], -np.inf)
        # The best set; among sets within rounding of it, the cheapest.
        top = value.max(axis=1)
        near = value >= top[:, None] - 1e-12
        best_set = np.argmin(np.where(near, set_cost[rows], np.inf), axis=1)
        go = np.isfinite(top) & (top > stop_value + 1e-12)
        chosen = members[best_set]  # [n, M]
        cheapest_member = np.argmin(np.where(chosen, cost[rows], np.inf), axis=1)
        next_model[rows] = np.where(go, cheapest_member, -1)
    return CascadeStep(next_model=next_model, answer=answer)
