"""The prompt encoder as a lever on the test folds: the same routers, folds and seeds on each encoder's
embeddings, and a paired bootstrap of each router's AIQ gain from the stronger encoder.

The routing table (true costs, prompt token counts) is loaded once with the default encoder's tokenizer, so
the only thing that differs between encoders is the embedding each router learns from. Each `run` writes one
encoder's per-prompt curves (pooled over folds, as `training.evaluate` pools them), so a long comparison splits
into short runs; `report` pairs them on the same prompts and writes report.json and report.md.

    python benchmarks/encoder_compare.py run --dataset llmrouter_9model --protocol cv --embedder all-mpnet-base-v2 \\
        --routers prior knn mlp finerouter --curves runs/encoder/llmrouter_cv_mpnet.npz
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
from training.evaluate import SEEDS, figures, pooled_curve, pooled_test_table, run_fold
from training.metrics import bootstrap_gain
from training.splits import PROTOCOLS, folds

REFERENCE = "prior"  # the "no routing" curve without hindsight, as evaluate's gains use it


def run(args) -> None:
    """One encoder's curves: every router on every fold, pooled per prompt over folds, with per-fold figures."""
    table = load_dataset(args.dataset)
    embeddings = embed_texts(table.prompts, args.embedder, use_ray=False)
    seeds = tuple(range(args.seeds))
    results = [run_fold(table, embeddings, fold, args.routers, seeds, lambda: None) for fold in folds(table, args.protocol)]
    test = pooled_test_table(results)
    arrays = {"prompt_ids": test.prompt_ids.astype(str), "costs": test.costs}
    fold_figures = {}
    for name in args.routers:
        arrays[f"{name}.cost"], arrays[f"{name}.quality"] = pooled_curve(results, name)
        fold_figures[name] = [figures(result.curves[name], result.test) for result in results]
    meta = {"dataset": table.name, "protocol": args.protocol, "embedder": canonical_model_name(args.embedder),
            "dimension": int(embeddings.shape[1]), "seeds": args.seeds, "folds": fold_figures}
    args.curves.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.curves, meta=json.dumps(meta), **arrays)
    print(f"wrote {args.curves}: {meta['embedder']} on {table.name}/{args.protocol}, routers {args.routers}")


def _load_curves(paths: list[Path]) -> tuple[dict, dict[str, dict[str, tuple]], dict[str, dict[str, list]]]:
    """Merge the runs: per encoder, per router, the pooled curve and the per-fold figures; all on one prompt order."""
    curves, fold_figures, common = {}, {}, None
    for path in paths:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            if common is None:
                common = {"dataset": meta["dataset"], "protocol": meta["protocol"], "prompt_ids": saved["prompt_ids"], "costs": saved["costs"]}
            elif (meta["dataset"], meta["protocol"]) != (common["dataset"], common["protocol"]) or \
                    not np.array_equal(saved["prompt_ids"], common["prompt_ids"]):
                raise ValueError(f"{path}: not the same dataset, protocol and test prompts as {paths[0]}; runs cannot be paired")
            for name, per_fold in meta["folds"].items():
                curves.setdefault(meta["embedder"], {})[name] = (saved[f"{name}.cost"], saved[f"{name}.quality"])
                fold_figures.setdefault(meta["embedder"], {})[name] = per_fold
                common.setdefault("seeds", meta["seeds"])
    return common, curves, fold_figures


def _gain(a, b, costs: np.ndarray, samples: int) -> dict[str, float]:
    return bootstrap_gain(a, b, costs.T, samples=samples)


def report(args) -> None:
    common, curves, fold_figures = _load_curves(args.curves)
    baseline = canonical_model_name(args.baseline)
    if baseline not in curves:
        raise ValueError(f"no run of the baseline encoder {baseline!r} among {sorted(curves)}")
    costs = common["costs"]
    result = {"dataset": common["dataset"], "protocol": common["protocol"], "seeds": common["seeds"], "baseline_encoder": baseline,
              "prompts": len(common["prompt_ids"]), "encoders": {}}
    for encoder, routers in curves.items():
        entries = {}
        for name, curve in routers.items():
            per_fold = fold_figures[encoder][name]
            aiqs = [f["aiq"] for f in per_fold]
            entry = {"aiq": None if None in aiqs else float(np.mean(aiqs)),
                     "aiq_std": None if any(f["aiq_std"] is None for f in per_fold) else float(np.mean([f["aiq_std"] for f in per_fold])),
                     "per_fold_aiq": aiqs}
            if name != REFERENCE and REFERENCE in routers:
                entry["gain_vs_prior"] = _gain(curve, routers[REFERENCE], costs, args.bootstrap)
            if encoder != baseline and name in curves[baseline]:
                entry["gain_vs_baseline_encoder"] = _gain(curve, curves[baseline][name], costs, args.bootstrap)
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
             f"{result['seeds']} seeds per learned router; the same folds and prompts for every encoder. "
             "Gains are paired bootstraps over test prompts (95% intervals).", "",
             f"| encoder | router | AIQ | ± seeds | AIQ gain vs prior | AIQ gain vs the same router on {result['baseline_encoder']} |",
             "|---|---|---|---|---|---|"]
    for encoder, entries in result["encoders"].items():
        for name, e in entries.items():
            lines.append(f"| {encoder} | {name} | {cell(e['aiq'])} | {cell(e['aiq_std'])} | {interval(e.get('gain_vs_prior'))} "
                         f"| {interval(e.get('gain_vs_baseline_encoder'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="one encoder's per-prompt curves on the test folds")
    run_parser.add_argument("--dataset", required=True)
    run_parser.add_argument("--protocol", default="cv", choices=PROTOCOLS)
    run_parser.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    run_parser.add_argument("--routers", nargs="+", default=[REFERENCE, "knn", "mlp", "finerouter"])
    run_parser.add_argument("--seeds", type=int, default=SEEDS)
    run_parser.add_argument("--curves", type=Path, required=True, help="the .npz to write")
    report_parser = commands.add_parser("report", help="pair the runs and write report.json and report.md")
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
