"""The evaluation harness: every router, one protocol, one run (docs/evaluation.md, "Training and evaluation").

For each fold a router yields a per-prompt curve: at each cost weight of the sweep, the true cost and score of
the model it picks for every test prompt. Figures come from the curve's mean points; the paired bootstrap
resamples prompts of the curves pooled over folds (every prompt is tested in exactly one fold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serve.core.answer_facts import AnswerFacts
from training.datasets import RoutingTable
from training.metrics import (
    bootstrap_gain,
    cost_to_reach,
    curve_aiq,
    frontier,
)
from training.routers.base import Curve, TrainingSet
from training.routers.registry import ROUTERS, router_class
from training.splits import folds

SEEDS = 3  # seeds per learned router: 0, 1, 2


@dataclass
class FoldResult:
    name: str
    test: RoutingTable
    curves: dict[str, list[Curve]]  # router -> one curve per seed


def figures(curves: list[Curve], test: RoutingTable) -> dict:
    """AIQ, best quality, cost to reach the best single model and the best benchmark-averaged quality (how
    RouterDC reports accuracy), averaged over seeds."""
    single_quality, single_cost = test.scores.mean(axis=0), test.costs.mean(axis=0)
    benchmark_masks = [test.benchmarks == b for b in sorted(set(test.benchmarks))]
    best = int(np.argmax(single_quality))
    per_seed = []
    for costs, qualities in curves:
        mean_cost, mean_quality = costs.mean(axis=1), qualities.mean(axis=1)
        reach = cost_to_reach(mean_cost, mean_quality, single_quality[best]) if test.has_costs else None
        per_seed.append(
            {
                "aiq": curve_aiq((costs, qualities), test.costs),
                "best_quality": float(frontier(mean_cost, mean_quality)[1].max()),
                "cost_to_reach_best_single": None if reach is None else reach / single_cost[best],
                "macro_quality": float(np.mean([qualities[:, mask].mean(axis=1) for mask in benchmark_masks], axis=0).max()),
            }
        )
    result = {key: _mean([s[key] for s in per_seed]) for key in per_seed[0]}
    result["aiq_std"] = _std([s["aiq"] for s in per_seed])
    result["seeds"] = [s["aiq"] if s["aiq"] is not None else s["best_quality"] for s in per_seed]
    return result


def _mean(values):
    """Mean of the defined values; None if any is undefined (a router that never reaches a target)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def _std(values):
    return None if any(v is None for v in values) else float(np.std(values))


def run_fold(table: RoutingTable, embeddings: np.ndarray, fold, routers: list[str], seeds, tick, answers: AnswerFacts | None = None,
             training_scores: np.ndarray | None = None) -> FoldResult:
    whole = TrainingSet(table, embeddings, answers)
    trained_on = whole if training_scores is None else TrainingSet(replace(table, scores=training_scores), embeddings, answers)
    train, test_set = trained_on.subset(fold.train), whole.subset(fold.test)
    curves: dict[str, list[Curve]] = {}
    for name in routers:
        curves[name] = []
        for seed in _seeds_of(name, seeds):
            curves[name].append(router_class(name).fit(train, seed).curve(train, test_set))
            tick()
    return FoldResult(fold.name, test_set.table, curves)


def _seeds_of(name: str, seeds) -> tuple:
    """A learned router is fitted once per seed; a reference point once."""
    return tuple(seeds) if router_class(name).learned else (0,)


def pooled_curve(results: list[FoldResult], name: str) -> Curve:
    """Seed-averaged per-prompt outcomes, concatenated over folds (each prompt is tested once)."""
    parts = [tuple(np.mean([c[i] for c in r.curves[name]], axis=0) for i in (0, 1)) for r in results]
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)


def pooled_test_table(results: list[FoldResult]) -> RoutingTable:
    tables = [r.test for r in results]
    first = tables[0]
    return RoutingTable(
        name=first.name,
        models=first.models,
        prompt_ids=np.concatenate([t.prompt_ids for t in tables]),
        prompts=[p for t in tables for p in t.prompts],
        benchmarks=np.concatenate([t.benchmarks for t in tables]),
        splits=np.concatenate([t.splits for t in tables]),
        scores=np.concatenate([t.scores for t in tables]),
        costs=np.concatenate([t.costs for t in tables]),
        prompt_tokens=np.concatenate([t.prompt_tokens for t in tables]),
    )


def evaluate(
    table: RoutingTable,
    embeddings: np.ndarray,
    protocol: str = "standard",
    routers: list[str] | None = None,
    seeds=tuple(range(SEEDS)),
    bootstrap_samples: int = 1000,
    progress: bool = True,
    answer_embeddings: np.ndarray | None = None,
    training_scores: np.ndarray | None = None,
) -> dict:
    """Run every router on every fold of `protocol`; return the report (docs/evaluation.md, "Training and
    evaluation").
    `answer_embeddings` [N, M, D] (`training.answers.embed_answers`) lets the cascades judge the table's
    recorded answers; without them, or without answers, the cascades reduce to routing (the report says so).
    `training_scores` [N, M], where given, are the labels the routers learn from (a judge's, say) in place of the
    table's; every test fold is still scored by the table's."""
    answers = None
    if table.responses is not None and answer_embeddings is not None:
        answers = AnswerFacts.of(table.responses, answer_embeddings)
    if routers is None:  # by default, cascades only where there are answers to judge
        routers = [name for name, router in ROUTERS.items() if answers is not None or not router.cascade]
    elif answers is None:
        routers = [name for name in routers if not router_class(name).needs_answers]
    fold_list = folds(table, protocol)
    steps = len(fold_list) * sum(len(_seeds_of(name, seeds)) for name in routers)
    with tqdm(total=steps, desc=f"{table.name}/{protocol}", disable=not progress) as bar:
        results = [run_fold(table, embeddings, fold, routers, seeds, lambda: bar.update(), answers, training_scores)
                   for fold in fold_list]

    pooled_test = pooled_test_table(results)
    pooled = {name: pooled_curve(results, name) for name in routers}
    report = {"dataset": table.name, "protocol": protocol, "models": table.models, "routers": {}}
    if answers is None:
        report["note"] = ("no recorded answers: cascades reduce to routing (`cascade`, where asked for, is routing on "
                          "FineRouter's estimates, the same curve as `finerouter`) and the fixed-chain cascades do not apply")
    breakdown_key = "per_benchmark" if protocol == "lobo" else "per_fold"
    for name in routers:
        per_fold = {r.name: figures(r.curves[name], r.test) for r in results}
        entry = {key: _mean([f[key] for f in per_fold.values()]) for key in ("aiq", "best_quality", "cost_to_reach_best_single", "macro_quality")}
        entry["aiq_std"] = _mean([f["aiq_std"] for f in per_fold.values()])
        entry["seeds"] = [float(np.mean(s)) for s in zip(*(f["seeds"] for f in per_fold.values()))]
        if len(results) > 1:
            entry[breakdown_key] = per_fold
        if protocol != "lobo":
            entry["per_benchmark"] = {
                bench: figures([tuple(c[:, pooled_test.benchmarks == bench] for c in pooled[name])], pooled_test.subset(pooled_test.benchmarks == bench))
                for bench in sorted(set(pooled_test.benchmarks))
            }
        report["routers"][name] = entry

    if table.has_costs and bootstrap_samples:
        _add_bootstrap_gains(report, pooled, pooled_test, bootstrap_samples)
    report["single_models"] = {
        m: {"quality": float(pooled_test.scores[:, j].mean()), "cost": float(pooled_test.costs[:, j].mean())} for j, m in enumerate(table.models)
    }
    report["curves"] = {name: {"cost": c.mean(axis=1).tolist(), "quality": q.mean(axis=1).tolist()} for name, (c, q) in pooled.items()}
    return report


def _add_bootstrap_gains(report: dict, pooled: dict[str, Curve], test: RoutingTable, samples: int) -> None:
    """Paired bootstrap 95% intervals of each learned router's AIQ gain over the zero router, over the prior (the
    "no routing" curve without hindsight), over the best other baseline and over the best other learned router
    (by mean AIQ)."""
    aiqs = {name: entry["aiq"] for name, entry in report["routers"].items()}
    for name in pooled:
        if not ROUTERS[name].learned:
            continue
        entry = report["routers"][name]
        others = [b for b, router in ROUTERS.items() if router.baseline and b in pooled and b != name and aiqs.get(b) is not None]
        for reference in ("zero_router", "prior"):
            if reference in pooled and reference != name:
                entry[f"gain_vs_{reference}"] = bootstrap_gain(pooled[name], pooled[reference], test.costs.T, samples=samples)
        if others:
            rival = max(others, key=lambda b: aiqs[b])
            entry["gain_vs_best_baseline"] = {"baseline": rival, **bootstrap_gain(pooled[name], pooled[rival], test.costs.T, samples=samples)}
        learned = [r for r in pooled if ROUTERS[r].learned and r != name and aiqs.get(r) is not None]
        if learned:  # every learned router, cascades and FineRouter included: what a headline claim must beat
            rival = max(learned, key=lambda r: aiqs[r])
            entry["gain_vs_best_other"] = {"router": rival, **bootstrap_gain(pooled[name], pooled[rival], test.costs.T, samples=samples)}


def _cell(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    lines = [
        f"Dataset `{report['dataset']}`, protocol `{report['protocol']}`.",
        *([f"Note: {report['note']}."] if "note" in report else []),
        "",
        "| router | AIQ | ± seeds | best quality | benchmark-averaged quality | cost to reach best single | AIQ gain vs prior [95% CI] "
        "| AIQ gain vs best baseline [95% CI] | AIQ gain vs best other learned router [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def gain(g, rival_key=None):
        return f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" + (f" vs {g[rival_key]}" if rival_key else "") if g else ""

    for name, e in report["routers"].items():
        lines.append(f"| {name} | {_cell(e['aiq'])} | {_cell(e['aiq_std'])} | {_cell(e['best_quality'])} | {_cell(e['macro_quality'])} | "
                     f"{_cell(e['cost_to_reach_best_single'], 2)} | {gain(e.get('gain_vs_prior'))} | "
                     f"{gain(e.get('gain_vs_best_baseline'), 'baseline')} | {gain(e.get('gain_vs_best_other'), 'router')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    styles = {"oracle": dict(linestyle="--"), "zero_router": dict(linestyle=":", color="grey"),
              **{name: dict(linestyle="-.") for name, router in ROUTERS.items() if router.cascade}}
    for name, curve in report["curves"].items():
        hull_cost, hull_quality = frontier(np.array(curve["cost"]), np.array(curve["quality"]))
        axes.plot(hull_cost, hull_quality, marker=".", label=name, **styles.get(name, {}))
    for model, point in report["single_models"].items():
        axes.scatter(point["cost"], point["quality"], color="black", s=12)
        axes.annotate(model.split("/")[-1], (point["cost"], point["quality"]), fontsize=6, alpha=0.7)
    axes.set_xscale("log")
    axes.set_xlabel("mean cost per prompt (USD)")
    axes.set_ylabel("mean quality")
    axes.set_title(f"{report['dataset']} ({report['protocol']}): cost-quality frontiers")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown_table(report))
    plot(report, out / "pareto.png")
