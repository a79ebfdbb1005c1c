"""Command line: `python -m training {embed,evaluate,fit} ...` (see README)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a built-in dataset name or a .jsonl/.parquet file")
    parser.add_argument("--data-dir", type=Path, help="the routing datasets' folder (default: $FINEROUTER_DATA_DIR or ../shared/data)")
    parser.add_argument("--embedder", default=None, help="sentence-transformers model (default all-MiniLM-L6-v2, bundled offline)")
    parser.add_argument("--embed-actors", type=int, default=1, help="Ray Data encoder actors")
    parser.add_argument("--embed-gpus", type=float, default=0.0, help="GPUs per encoder actor")


def _load(args):
    from training.datasets import load_dataset
    from training.embed import DEFAULT_EMBEDDER, embed_texts

    table = load_dataset(args.dataset, args.data_dir)
    embeddings = embed_texts(table.prompts, args.embedder or DEFAULT_EMBEDDER, num_actors=args.embed_actors, num_gpus=args.embed_gpus)
    return table, embeddings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed a dataset's prompts (Ray Data) into the on-disk cache")
    _dataset_arguments(embed)

    evaluate = commands.add_parser("evaluate", help="every router against the baselines, one protocol")
    _dataset_arguments(evaluate)
    evaluate.add_argument("--protocol", default="standard", choices=["standard", "cv", "lobo", "ood"])
    evaluate.add_argument("--routers", nargs="*", help="a subset of routers (default: all)")
    evaluate.add_argument("--seeds", type=int, default=3, help="seeds per learned router")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AIQ gain intervals")
    evaluate.add_argument("--out", type=Path, required=True)

    args = parser.parse_args(argv)
    from training.datasets import DatasetError

    try:
        table, embeddings = _load(args)
        if args.command == "embed":
            print(f"{args.dataset}: {embeddings.shape[0]} prompts embedded, dimension {embeddings.shape[1]}")
        elif args.command == "evaluate":
            from training.evaluate import evaluate as run_evaluation, markdown_table, write_report

            report = run_evaluation(
                table, embeddings, args.protocol, routers=args.routers, seeds=tuple(range(args.seeds)), bootstrap_samples=args.bootstrap
            )
            write_report(report, args.out)
            print(markdown_table(report))
            print(f"wrote {args.out}/report.json, report.md, pareto.png")
    except (DatasetError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
