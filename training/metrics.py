"""Cost-quality curves and their summary figures (docs/evaluation.md, "Training and evaluation": Protocol).

A router traced over a sweep of the cost weight gives points (mean cost, mean quality). Mixing two operating
points at random reaches every point between them, so what a router can deliver is the upper concave hull
of its points, made non-decreasing (spending more never has to lose quality).
"""

from __future__ import annotations

import numpy as np

from serve.core.decision import choose


def frontier(costs: np.ndarray, qualities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing upper concave hull of the points, by increasing cost."""
    costs, qualities = np.asarray(costs, float), np.asarray(qualities, float)
    order = np.lexsort((-qualities, costs))  # by cost; at equal cost the best quality first
    hull: list[tuple[float, float]] = []
    for c, q in zip(costs[order], qualities[order]):
        if hull and c == hull[-1][0]:
            continue  # same cost, lower quality
        if hull and q <= hull[-1][1]:
            continue  # costs more for no gain: below the non-decreasing hull
        while len(hull) >= 2:
            (c1, q1), (c2, q2) = hull[-2], hull[-1]
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):  # the middle vertex lies on or under the chord
                hull.pop()
            else:
                break
        hull.append((c, q))
    points = np.array(hull)
    return points[:, 0], points[:, 1]


def hull_quality_at(cost: np.ndarray | float, hull_costs: np.ndarray, hull_qualities: np.ndarray) -> np.ndarray:
    """The hull's quality at a budget: interpolated, flat right of its largest cost, zero left of its smallest."""
    cost = np.asarray(cost, float)
    value = np.interp(cost, hull_costs, hull_qualities)
    return np.where(cost < hull_costs[0], 0.0, value)


def aiq(costs, qualities, lo: float, hi: float) -> float | None:
    """Average improvement in quality: the hull's integral over [lo, hi] divided by (hi - lo).

    lo and hi are the mean costs of the cheapest and the most expensive single model. None when they are
    equal (every model costs the same: there is no trade-off to integrate over).
    """
    if not hi > lo:
        return None
    hc, hq = frontier(costs, qualities)
    # Between breakpoints the integrand is linear (it jumps only at the first vertex), so the midpoint rule
    # is exact on each piece.
    grid = np.unique(np.clip(np.concatenate([[lo, hi], hc]), lo, hi))
    middles = (grid[:-1] + grid[1:]) / 2
    total = float(np.sum(hull_quality_at(middles, hc, hq) * np.diff(grid)))
    return total / (hi - lo)


def cost_to_reach(costs, qualities, target: float, tolerance: float = 1e-9) -> float | None:
    """The least mean cost at which the hull reaches `target` quality (within `tolerance`, so that a router
    reaches its own best model's quality, whatever the order of the sums), or None if it never does."""
    hc, hq = frontier(costs, qualities)
    target = target - tolerance
    if hq[-1] < target:
        return None
    i = int(np.argmax(hq >= target))
    if i == 0:
        return float(hc[0])
    c1, c2, q1, q2 = hc[i - 1], hc[i], hq[i - 1], hq[i]
    return float(c1 + (target - q1) * (c2 - c1) / (q2 - q1))


def bootstrap_gain(
    curve_a: tuple[np.ndarray, np.ndarray],
    curve_b: tuple[np.ndarray, np.ndarray],
    single_costs: np.ndarray,
    *,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of AIQ(a) - AIQ(b) over test prompts.

    Each curve is (per-prompt costs, per-prompt qualities), each of shape [operating points, prompts]; both
    routers and the single models' costs (shape [models, prompts]) are resampled with the same prompts.
    """
    rng = np.random.default_rng(seed)
    n = single_costs.shape[1]
    gains = []
    for _ in range(samples):
        rows = rng.integers(0, n, n)
        single = single_costs[:, rows].mean(axis=1)
        lo, hi = single.min(), single.max()
        a = aiq(curve_a[0][:, rows].mean(axis=1), curve_a[1][:, rows].mean(axis=1), lo, hi)
        b = aiq(curve_b[0][:, rows].mean(axis=1), curve_b[1][:, rows].mean(axis=1), lo, hi)
        gains.append(a - b)
    gains = np.asarray(gains)
    return {"mean": float(gains.mean()), "low": float(np.quantile(gains, 0.025)), "high": float(np.quantile(gains, 0.975))}


# The cost-weight sweep (dimensionless, see serve.core.decision.PRESETS): 0, then a log grid up to the weight at
# which the cheapest model always wins.
COST_WEIGHTS = np.concatenate([[0.0], np.logspace(-3, 2, 41)])


def trace_curve(quality, estimated_cost, scores, costs, cost_scale: float, *, allowed=None, weights=COST_WEIGHTS):
    """Realised per-prompt (costs, qualities), each [len(weights), N], of routing by predicted `quality` and
    `estimated_cost` at each cost weight; outcomes are the true `scores` and `costs`."""
    rows = np.arange(len(scores))
    picks = np.stack([choose(quality, estimated_cost, w, cost_scale, allowed=allowed) for w in weights])
    return costs[rows, picks], scores[rows, picks]


def curve_aiq(curve: tuple[np.ndarray, np.ndarray], costs: np.ndarray) -> float | None:
    """AIQ of a per-prompt curve, with lo/hi from the single models' mean `costs` [N, M] on the same prompts."""
    single = costs.mean(axis=0)
    return aiq(curve[0].mean(axis=1), curve[1].mean(axis=1), single.min(), single.max())
