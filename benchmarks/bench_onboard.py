"""Onboarding without retraining, measured: leave each pool model out of training in turn, then add it back from
k labelled prompts per latent task (training/onboard.py), and compare on the cv test folds with
(i) a router retrained from scratch on the same labelled prompts (every model scored on them),
(ii) the full-data router (trained with the model), and
(iii) the prior for the new model (the leave-one-out router, the new model at its mean label on every prompt).

Cheap by design: per fold, the full-data router selects Stage 1 on its validation slice as `fit` does, and each
leave-one-out router reuses that fold's Stage 1 setting (one fit each). The onboarding settings (shrinkage,
profile prior, head) are chosen per fold on the leave-one-out routers' own validation slices (labels from their
fit rows, AIQ on their validation rows), never on test. A run takes some folds and held-out models (`--folds 0
--models a b`: the settings are then chosen over those models), its figures kept under `--work`; `--report`
merges the runs so far into report.json and report.md.

    python benchmarks/bench_onboard.py --folds 0 --models qwen2.5-7b-instruct gemma-2-9b-it --work /tmp/onboard_work
    python benchmarks/bench_onboard.py --report --work /tmp/onboard_work --out docs/results/onboarding
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve.core.artifact import RouterArtifact
from training.datasets import load_dataset
from training.embed import embed_texts
from training.fit import FitConfig, fit_router
from training.labelling.sampling import sample_per_task
from training.metrics import curve_aiq, trace_curve
from training.onboard import (
    Labels,
    OnboardConfig,
    label_evidence,
    onboard,
)
from training.routers.base import TrainingSet
from training.splits import folds

DATASET = "llmrouter_9model"
KS = (1, 3, 10)
SAMPLERS = ("stratified", "random")
# The onboarding settings compared on validation.
CANDIDATES = [OnboardConfig(shrinkage=s, profile_ridge=p, pool_scores=u, head_ridge=h)
              for s, (p, u), h in itertools.product((10.0, 30.0, 100.0), [(None, False)] + [(p, u) for p in (1.0, 10.0, 100.0) for u in (False, True)],
                                                    (None, 30.0, 300.0))]


def without_model(data: TrainingSet, model: str) -> TrainingSet:
    """The training set as if `model` had never been in the pool."""
    table = data.table
    keep = [j for j, m in enumerate(table.models) if m != model]
    reduced = replace(table, models=[table.models[j] for j in keep], scores=table.scores[:, keep], costs=table.costs[:, keep],
                      prices={m: p for m, p in table.prices.items() if m != model})
    return TrainingSet(reduced, data.embeddings)


def label_rows(sampler: str, tasks: np.ndarray, per_task: int, seed: int) -> np.ndarray:
    """Which prompts get labels: `per_task` per latent task, or as many drawn uniformly."""
    stratified = sample_per_task(tasks, per_task, seed)
    if sampler == "stratified":
        return stratified
    return np.sort(np.random.default_rng(seed + 7919).choice(len(tasks), len(stratified), replace=False))


def labels_of(data: TrainingSet, rows: np.ndarray, column: int) -> Labels:
    """The new model's labels on training prompts, with the pool's scores of them (the training table has them)."""
    table = data.table
    others = [j for j in range(len(table.models)) if j != column]
    return Labels(embeddings=data.embeddings[rows], texts=[table.prompts[i] for i in rows], prompt_tokens=table.prompt_tokens[rows],
                  scores=table.scores[rows, column], costs=table.costs[rows, column], pool_scores=table.scores[np.ix_(rows, others)])


_inputs: dict[tuple, np.ndarray] = {}


def network_inputs(artifact: RouterArtifact, evaluation: TrainingSet) -> np.ndarray:
    """The networks' inputs for `evaluation`'s prompts, computed once per prompt set and feature scaling."""
    key = (id(evaluation), artifact.weights["feature_mean"].tobytes(), artifact.weights["feature_std"].tobytes())
    if key not in _inputs:
        _inputs[key] = artifact.inputs(evaluation.embeddings, evaluation.table.prompts)
    return _inputs[key]


def routed_aiq(artifact: RouterArtifact, evaluation: TrainingSet, quality: np.ndarray | None = None) -> float:
    """AIQ of routing `evaluation`'s prompts with the artifact (its models put in the table's order), or with
    `quality` [N, M] in its place; the artifact's own cost model and cost scale, as served."""
    table = evaluation.table
    order = [artifact.models.index(m) for m in table.models]
    if quality is None:
        quality = artifact.predict_inputs(network_inputs(artifact, evaluation))[0]
    estimated = artifact.cost_model.estimate(table.prompt_tokens)
    curve = trace_curve(quality[:, order], estimated[:, order], table.scores, table.costs, artifact.cost_scale)
    return float(curve_aiq(curve, table.costs))


def replaced_aiq(added: RouterArtifact, new_quality, evaluation: TrainingSet) -> float:
    """The onboarded router with `new_quality` for the new model (its last) instead: (iii) the prior, its mean label
    on every prompt; or the ceiling, the full-data router's estimate."""
    quality = added.predict_inputs(network_inputs(added, evaluation))[0]
    quality[:, -1] = new_quality
    return routed_aiq(added, evaluation, quality)


def run_fold(table, embeddings, fold_index: int, models: list[str], label_seeds: int, log, save=lambda result: None) -> dict:
    """One fold for the held-out `models`; `save(result)` after each model's test runs, so that a run cut short
    keeps what it measured."""
    _inputs.clear()  # keyed by the prompt sets' ids: those of another fold may be reused
    fold = folds(table, "cv")[fold_index]
    whole = TrainingSet(table, embeddings)
    train, test = whole.subset(fold.train), whole.subset(fold.test)
    started = time.perf_counter()
    full = fit_router(train, FitConfig(trainer="local"), log=lambda message: None)
    stage1 = full.manifest["validation"]["stage1"]
    fixed = FitConfig(trainer="local", ks=(stage1["k"],), mixes=(stage1["mix"],), resolutions=(stage1["resolution"],))
    log(f"fold {fold_index}: full router {time.perf_counter() - started:.0f}s, stage 1 {stage1}")
    result = {"fold": fold_index, "stage1": stage1, "test_rows": len(test.table), "full": routed_aiq(full, test), "models": {}}

    left_out: dict[str, RouterArtifact] = {}
    for model in models:
        left_out[model] = fit_router(without_model(train, model), fixed, log=lambda message: None)
        log(f"fold {fold_index}: without {model}: {left_out[model].manifest['tasks']} tasks, {time.perf_counter() - started:.0f}s")

    # Onboarding settings, chosen on the left-out routers' validation slices (the split `fit_router` made).
    validation_scores = {i: [] for i in range(len(CANDIDATES))}
    fit_part, validation = train.validation_split(fixed.seed, fixed.validation_fraction)
    for model in models:
        column = table.models.index(model)
        artifact = left_out[model]
        tasks = artifact.task_probabilities(network_inputs(artifact, fit_part)).argmax(axis=1)
        for per_task in KS:
            labels = labels_of(fit_part, label_rows("stratified", tasks, per_task, 0), column)
            evidence = label_evidence(artifact, labels)
            for i, config in enumerate(CANDIDATES):
                validation_scores[i].append(routed_aiq(onboard(artifact, model, labels, config, evidence=evidence), validation))
    mean_validation = {i: float(np.mean(s)) for i, s in validation_scores.items()}
    chosen = CANDIDATES[max(mean_validation, key=mean_validation.get)]
    result["validation"] = [{**asdict(CANDIDATES[i]), "aiq": score} for i, score in mean_validation.items()]
    result["chosen"] = asdict(chosen)
    log(f"fold {fold_index}: chosen on validation {chosen}, {time.perf_counter() - started:.0f}s")

    retrained: dict[tuple, float] = {}
    for model in models:
        column = table.models.index(model)
        artifact = left_out[model]
        tasks = artifact.task_probabilities(network_inputs(artifact, train)).argmax(axis=1)
        full_estimate = full.predict_inputs(network_inputs(full, test))[0][:, full.models.index(model)]
        entry = {"tasks": artifact.manifest["tasks"], "runs": []}
        for sampler, per_task, seed in itertools.product(SAMPLERS, KS, range(label_seeds)):
            rows = label_rows(sampler, tasks, per_task, seed)
            labels = labels_of(train, rows, column)
            added = onboard(artifact, model, labels, chosen)
            run = {"sampler": sampler, "k": per_task, "seed": seed, "labels": len(rows),
                   "onboarded": routed_aiq(added, test), "prior": replaced_aiq(added, labels.scores.mean(), test),
                   "ceiling": replaced_aiq(added, full_estimate, test)}
            if sampler == "stratified" and seed == 0:
                key = tuple(rows)
                if key not in retrained:
                    # The product's fit on the labelled prompts alone; kNN degrees that a few dozen prompts can hold.
                    config = FitConfig(trainer="local", ks=tuple(sorted({min(k, len(rows) // 2) for k in FitConfig.ks})))
                    retrained[key] = routed_aiq(fit_router(train.subset(rows), config, log=lambda message: None), test)
                run["retrained"] = retrained[key]
            entry["runs"].append(run)
        result["models"][model] = entry
        result["seconds"] = time.perf_counter() - started
        save(result)
        log(f"fold {fold_index}: {model} onboarded, {time.perf_counter() - started:.0f}s")
    return result


def summarise(results: list[dict]) -> dict:
    """Per sampler and k: mean AIQ of each router over folds, models and label seeds, and the fraction of the
    full router's gain over the prior that onboarding recovers (a ratio of the mean gains)."""
    rows = []
    for sampler, per_task in itertools.product(SAMPLERS, KS):
        cells = [(r["full"], run) for r in results for entry in r["models"].values() for run in entry["runs"]
                 if run["sampler"] == sampler and run["k"] == per_task]
        full = np.array([c[0] for c in cells])
        onboarded = np.array([c[1]["onboarded"] for c in cells])
        prior = np.array([c[1]["prior"] for c in cells])
        retrained = [c[1]["retrained"] for c in cells if "retrained" in c[1]]
        ceiling = [c[1]["ceiling"] for c in cells if "ceiling" in c[1]]
        rows.append({
            "sampler": sampler, "k": per_task, "cases": len(cells),
            "labels_per_model": float(np.mean([c[1]["labels"] for c in cells])),
            "onboarded": float(onboarded.mean()), "prior": float(prior.mean()), "full": float(full.mean()),
            "retrained": float(np.mean(retrained)) if retrained else None,
            "ceiling": float(np.mean(ceiling)) if ceiling else None, "ceiling_cases": len(ceiling),
            "recovered": float((onboarded - prior).mean() / (full - prior).mean()),
        })
    per_model = {}
    for model in dict.fromkeys(m for r in results for m in r["models"]):
        for per_task in KS:
            cells = [(r["full"], run) for r in results if model in r["models"] for run in r["models"][model]["runs"]
                     if run["sampler"] == "stratified" and run["k"] == per_task]
            per_model.setdefault(model, {})[str(per_task)] = {
                "onboarded": float(np.mean([c[1]["onboarded"] for c in cells])), "prior": float(np.mean([c[1]["prior"] for c in cells])),
                "full": float(np.mean([c[0] for c in cells]))}
    return {"table": rows, "per_model": per_model, "alternatives": alternatives(results)}


def alternatives(results: list[dict]) -> list[dict]:
    """Validation AIQ of each design alternative (the prior: the new model's mean label, a regression on the pool's
    task profiles, or on the pool's own scores of the labelled prompts; the head: the task table alone, or with the
    pool heads' correction) at its best shrinkage and ridges, mean over runs."""
    def family(setting: dict) -> tuple[str, str]:
        prior = "mean label" if setting["profile_ridge"] is None else "pool's scores" if setting["pool_scores"] else "pool's task profiles"
        return prior, "task table" if setting["head_ridge"] is None else "task table + pool heads"

    best: dict[tuple, list[float]] = {}
    for result in results:
        by_family: dict[tuple, float] = {}
        for setting in result["validation"]:
            key = family(setting)
            by_family[key] = max(by_family.get(key, -np.inf), setting["aiq"])
        for key, score in by_family.items():
            best.setdefault(key, []).append(score)
    return [{"prior": prior, "head": head, "validation_aiq": float(np.mean(scores))} for (prior, head), scores in best.items()]


def markdown(report: dict) -> str:
    lines = [f"Onboarding on `{report['dataset']}` (cv folds {report['folds']}, {report['label_seeds']} label seeds), "
             f"commit `{report['commit']}`.", "", f"Command: `{report['command']}`", "",
             "| sampler | k per task | labels of the new model | onboarded AIQ | prior AIQ | full-data AIQ | retrained on the labels AIQ "
             "| gain recovered | ceiling AIQ (cases) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]["table"]:
        retrained = "-" if row["retrained"] is None else f"{row['retrained']:.4f}"
        ceiling = "-" if row.get("ceiling") is None else f"{row['ceiling']:.4f} ({row['ceiling_cases']})"
        lines.append(f"| {row['sampler']} | {row['k']} | {row['labels_per_model']:.0f} | {row['onboarded']:.4f} | {row['prior']:.4f} "
                     f"| {row['full']:.4f} | {retrained} | {row['recovered']:.2f} | {ceiling} |")
    lines += ["", "Ceiling: the left-out router with the full-data router's estimate of the new model (measured in the runs "
              "that record it): what a perfect onboarding of the new model alone could reach."]
    lines += ["", "Per held-out model (stratified labels): onboarded / prior / full-data AIQ", "",
              "| model | " + " | ".join(f"k = {k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for model, by_k in report["summary"]["per_model"].items():
        lines.append(f"| {model} | " + " | ".join(f"{c['onboarded']:.3f} / {c['prior']:.3f} / {c['full']:.3f}" for c in by_k.values()) + " |")
    lines += ["", "Design alternatives on the validation slices (best setting of each, mean over runs):", "",
              "| prior of a task | MoE head | validation AIQ |", "|---|---|---|"]
    lines += [f"| {a['prior']} | {a['head']} | {a['validation_aiq']:.4f} |" for a in report["summary"]["alternatives"]]
    lines += ["", "Onboarding settings chosen on validation, per run (fold, held-out models):", ""]
    lines += [f"- fold {r['fold']}, {', '.join(r['models'])}: {r['chosen']}" for r in report["folds_detail"]]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return commit + ("+changes" if status else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, nargs="*", default=[], help="cv folds to run now (0-4)")
    parser.add_argument("--models", nargs="*", help="held-out models (default: every pool model)")
    parser.add_argument("--label-seeds", type=int, default=2)
    parser.add_argument("--work", type=Path, required=True, help="where each fold's figures are kept")
    parser.add_argument("--report", action="store_true", help="merge the folds under --work into --out")
    parser.add_argument("--out", type=Path, default=Path("docs/results/onboarding"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.folds:
        table = load_dataset(DATASET)
        embeddings = embed_texts(table.prompts, use_ray=False)
        models = args.models or table.models
        run = {"command": " ".join(sys.argv), "commit": _commit()}
        for fold in args.folds:
            path = args.work / f"fold{fold}_{'+'.join(models)}.json"
            run_fold(table, embeddings, fold, models, args.label_seeds, lambda message: print(message, flush=True),
                     lambda result: path.write_text(json.dumps({**result, **run}, indent=1)))
    if args.report:
        results = [json.loads(path.read_text()) for path in sorted(args.work.glob("fold*.json"))]
        report = {"dataset": DATASET, "commit": "; ".join(sorted({r["commit"] for r in results})), "folds": sorted({r["fold"] for r in results}), "label_seeds": args.label_seeds,
                  "command": "; ".join(sorted({r["command"] for r in results})) + f"; {' '.join(sys.argv)}",
                  "summary": summarise(results), "folds_detail": results}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
        (args.out / "report.md").write_text(markdown(report))
        print(markdown(report))


if __name__ == "__main__":
    main()
