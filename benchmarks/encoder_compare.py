"""The prompt encoder as a lever on the test folds: the same routers, folds and seeds on each encoder's
embeddings, and a paired bootstrap of each router's AIQ gain from the stronger encoder.

The routing table (true costs, prompt token counts) is loaded once with the default encoder's tokenizer, so
the only thing that differs between encoders is the embedding each router learns from. Each `run` writes one
encoder's per-prompt curves, fold by fold (seed-averaged, as `training.evaluate` pools them), for some routers
and some folds, so a long comparison splits into short runs; `report` joins the runs, checks that every encoder
and router covers every fold on the same prompts, pools the folds and pairs the encoders on the same prompts,
and writes report.json and report.md.

    python benchmarks/encoder_compare.py run --dataset llmrouter_9model --protocol cv --embedder all-mpnet-base-v2 \\
        --routers prior knn mlp finerouter --curves runs/encoder/llmrouter_cv_mpnet.npz
    python benchmarks/encoder_compare.py run ... --routers finerouter --folds fold0 fold1 --curves runs/encoder/a.npz
    python benchmarks/encoder_compare.py report runs/encoder/llmrouter_cv_*.npz --out docs/results/encoder_llmrouter_cv
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve.core.encoder import DEFAULT_EMBEDDER
from training.datasets import load_dataset
from training.embed import canonical_model_name, embed_texts
from training.evaluate import SEEDS, figures, pooled_curve, run_fold
from training.metrics import bootstrap_gain
from training.splits import PROTOCOLS, folds

REFERENCE = "prior"  # the "no routing" curve without hindsight, as evaluate's gains use it


def run(args) -> None:
    """One encoder's curves for the chosen routers and folds: per fold, the test prompts and costs, each router's
    seed-averaged per-prompt curve and its figures."""
    table = load_dataset(args.dataset)
    every_fold = folds(table, args.protocol)
    names = [fold.name for fold in every_fold]
    unknown = sorted(set(args.folds or ()) - set(names))
    if unknown:
        raise SystemExit(f"--folds: no fold {unknown} in {table.name}/{args.protocol}; its folds are {names}")
    chosen = [fold for fold in every_fold if not args.folds or fold.name in args.folds]
    embeddings = embed_texts(table.prompts, args.embedder, use_ray=False)
    seeds = tuple(range(args.seeds))
    arrays, fold_figures = {}, {}
    for index, fold in enumerate(chosen):
        result = run_fold(table, embeddings, fold, args.routers, seeds, lambda: None)
        arrays[f"{index}.prompt_ids"], arrays[f"{index}.costs"] = result.test.prompt_ids.astype(str), result.test.costs
        for name in args.routers:
            arrays[f"{index}.{name}.cost"], arrays[f"{index}.{name}.quality"] = pooled_curve([result], name)
        fold_figures[fold.name] = {name: figures(result.curves[name], result.test) for name in args.routers}
        print(f"{fold.name}: " + ", ".join(f"{name} {fold_figures[fold.name][name]['aiq']}" for name in args.routers), flush=True)
    meta = {"dataset": table.name, "protocol": args.protocol, "embedder": canonical_model_name(args.embedder),
            "dimension": int(embeddings.shape[1]), "seeds": args.seeds, "routers": args.routers,
            "protocol_folds": names, "folds": fold_figures}
    args.curves.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.curves, meta=json.dumps(meta), **arrays)
    print(f"wrote {args.curves}: {meta['embedder']} on {table.name}/{args.protocol}, routers {args.routers}, "
          f"folds {[fold.name for fold in chosen]}")


def _load_runs(paths: list[Path]) -> tuple[dict, dict[tuple[str, str], dict[str, tuple]]]:
    """Every run's folds: (encoder, router) -> fold -> (prompt ids, costs, curve, figures); one dataset, protocol
    and seed count, and the same prompts in each fold whichever run tested it."""
    common, pieces = None, {}
    for path in paths:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            setting = {key: meta[key] for key in ("dataset", "protocol", "seeds", "protocol_folds")}
            if common is None:
                common = {**setting, "prompt_ids": {}}
            elif setting != {key: common[key] for key in setting}:
                raise ValueError(f"{path}: dataset, protocol, seeds or folds differ from {paths[0]}; runs cannot be paired")
            for index, fold in enumerate(meta["folds"]):
                prompt_ids = saved[f"{index}.prompt_ids"]
                if not np.array_equal(common["prompt_ids"].setdefault(fold, prompt_ids), prompt_ids):
                    raise ValueError(f"{path}: fold {fold} tests other prompts than an earlier run's; runs cannot be paired")
                for name in meta["routers"]:
                    per_fold = pieces.setdefault((meta["embedder"], name), {})
                    if fold in per_fold:
                        raise ValueError(f"{path}: {meta['embedder']} {name} on {fold} is in two runs")
                    curve = (saved[f"{index}.{name}.cost"], saved[f"{index}.{name}.quality"])
                    per_fold[fold] = (saved[f"{index}.costs"], curve, meta["folds"][fold][name])
    return common, pieces


def _pooled(common: dict, pieces: dict) -> tuple[np.ndarray, dict[str, dict[str, tuple]], dict[str, dict[str, dict]]]:
    """The single models' costs [N, M] and each encoder's and router's curve, pooled over the protocol's folds in
    its order (every prompt is tested once), with the per-fold figures."""
    order = common["protocol_folds"]
    curves, fold_figures, costs = {}, {}, None
    for (encoder, name), per_fold in pieces.items():
        missing = [fold for fold in order if fold not in per_fold]
        if missing:
            raise ValueError(f"{encoder} {name}: no run covers folds {missing}")
        costs = np.concatenate([per_fold[fold][0] for fold in order])
        curves.setdefault(encoder, {})[name] = tuple(np.concatenate([per_fold[fold][1][i] for fold in order], axis=1) for i in (0, 1))
        fold_figures.setdefault(encoder, {})[name] = {fold: per_fold[fold][2] for fold in order}
    return costs, curves, fold_figures


def report(args) -> None:
    common, pieces = _load_runs(args.curves)
    costs, curves, fold_figures = _pooled(common, pieces)
    baseline = canonical_model_name(args.baseline)
    if baseline not in curves:
        raise ValueError(f"no run of the baseline encoder {baseline!r} among {sorted(curves)}")
    result = {"dataset": common["dataset"], "protocol": common["protocol"], "seeds": common["seeds"], "baseline_encoder": baseline,
              "prompts": len(costs), "folds": common["protocol_folds"], "encoders": {}}
    for encoder, routers in curves.items():
        entries = {}
        for name, curve in routers.items():
            per_fold = fold_figures[encoder][name]
            aiqs = [f["aiq"] for f in per_fold.values()]
            stds = [f["aiq_std"] for f in per_fold.values()]
            entry = {"aiq": None if None in aiqs else float(np.mean(aiqs)),
                     "aiq_std": None if None in stds else float(np.mean(stds)),
                     "per_fold_aiq": {fold: f["aiq"] for fold, f in per_fold.items()}}
            if name != REFERENCE and REFERENCE in routers:
                entry["gain_vs_prior"] = bootstrap_gain(curve, routers[REFERENCE], costs.T, samples=args.bootstrap)
            if encoder != baseline and name in curves[baseline]:
                entry["gain_vs_baseline_encoder"] = bootstrap_gain(curve, curves[baseline][name], costs.T, samples=args.bootstrap)
            entries[name] = entry
        result["encoders"][encoder] = entries
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(markdown_table(result))
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    def interval(g):
        return f"{g['mean']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]" if g else ""

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [f"Dataset `{result['dataset']}`, protocol `{result['protocol']}`, {result['prompts']} test prompts, "
             f"{result['seeds']} seeds per learned router; the same folds and prompts for every encoder. AIQ is the "
             "mean over folds; gains are paired bootstraps over the test prompts pooled over folds (95% intervals).", "",
             f"| encoder | router | AIQ | ± seeds | AIQ gain vs prior | AIQ gain vs the same router on {result['baseline_encoder']} |",
             "|---|---|---|---|---|---|"]
    for encoder, entries in result["encoders"].items():
        for name, e in entries.items():
            lines.append(f"| {encoder} | {name} | {cell(e['aiq'])} | {cell(e['aiq_std'])} | {interval(e.get('gain_vs_prior'))} "
                         f"| {interval(e.get('gain_vs_baseline_encoder'))} |")
    columns = [(encoder, name) for encoder, entries in result["encoders"].items() for name in entries]
    lines += ["", "AIQ per fold:", "", "| fold | " + " | ".join(f"{name} ({encoder})" for encoder, name in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for fold in result["folds"]:
        lines.append(f"| {fold} | " + " | ".join(cell(result["encoders"][encoder][name]["per_fold_aiq"][fold]) for encoder, name in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="one encoder's per-prompt curves on the test folds")
    run_parser.add_argument("--dataset", required=True)
    run_parser.add_argument("--protocol", default="cv", choices=PROTOCOLS)
    run_parser.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    run_parser.add_argument("--routers", nargs="+", default=[REFERENCE, "knn", "mlp", "finerouter"])
    run_parser.add_argument("--folds", nargs="+", help="run only these folds of the protocol (default: every fold)")
    run_parser.add_argument("--seeds", type=int, default=SEEDS)
    run_parser.add_argument("--curves", type=Path, required=True, help="the .npz to write")
    report_parser = commands.add_parser("report", help="join the runs, pair the encoders, write report.json and report.md")
    report_parser.add_argument("curves", type=Path, nargs="+")
    report_parser.add_argument("--baseline", default=DEFAULT_EMBEDDER, help="the encoder the gains are measured from")
    report_parser.add_argument("--bootstrap", type=int, default=1000)
    report_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
