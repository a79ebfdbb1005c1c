"""Command line: `python -m training {embed,evaluate,fit,label,onboard,pool} ...` (see docs/evaluation.md, docs/scaling.md
and docs/own_pool.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve.core.encoder import DEFAULT_EMBEDDER
from serve.core.mpnet import MPNET_EMBEDDER
from training.evaluate import SEEDS
from training.fit import FitConfig
from training.labelling import add_arguments as add_label_arguments
from training.splits import PROTOCOLS


def _dataset_arguments(parser: argparse.ArgumentParser, source=None) -> None:
    (source or parser).add_argument("--dataset", required=source is None, help="a built-in dataset name or a .jsonl/.parquet file")
    parser.add_argument("--data-dir", type=Path, help="the routing datasets' folder (default: $FINEROUTER_DATA_DIR or ../shared/data)")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                        help=f"sentence-transformers model: {DEFAULT_EMBEDDER} (default, bundled offline), {MPNET_EMBEDDER} "
                             "(offline with the `mpnet` extra, docs/encoder.md), a local folder or a hub name; an offline one "
                             "ending in @onnx-int8 or @onnx runs on ONNX Runtime (the `onnx` extra, scripts/setup_onnx.sh)")
    parser.add_argument("--embed-actors", type=int, default=1, help="Ray Data encoder actors")
    parser.add_argument("--embed-gpus", type=float, default=0.0, help="GPUs per encoder actor")


def _load(args):
    from training.datasets import load_dataset
    from training.embed import embed_texts

    table = load_dataset(args.dataset, args.data_dir, embedder=args.embedder)
    embeddings = embed_texts(table.prompts, args.embedder, num_actors=args.embed_actors, num_gpus=args.embed_gpus)
    return table, embeddings


def _answer_embeddings(args, table):
    """The recorded answers' embeddings (cached like the prompts'), None where the dataset has no answers."""
    from training.answers import embed_answers

    return None if table.responses is None else embed_answers(table.responses, args.embedder)


def _fit(args, table, embeddings) -> None:
    """Train on every training row (all rows but the dataset's own test and ood rows, less a seeded
    `--holdout` fraction when asked), save the artifact. Where the dataset records the models' answers, the
    artifact also holds the post-hoc estimator that cascades judge answers with, fitted as the evaluation's
    `cascade` fits it (on the router's own fit rows and validation slice)."""
    import numpy as np

    from serve.core.answer_facts import AnswerFacts
    from training.routers.base import TrainingSet
    from training.routers.cascade import fit_with_cascades
    from training.splits import training_rows

    rows = training_rows(table, args.holdout, args.seed)
    answered = _answer_embeddings(args, table)
    answers = None if answered is None else AnswerFacts.of(table.responses, answered).subset(rows)
    artifact = fit_with_cascades(TrainingSet(table.subset(rows), np.asarray(embeddings)[rows], answers), _fit_config(args))
    artifact.save(args.out)
    cascades = "cascades judge answers" if answers is not None else "no recorded answers, so routing only"
    print(f"wrote {args.out}: {artifact.manifest['tasks']} tasks, {len(artifact.models)} models, {len(rows)} training rows; {cascades}")


def _fit_config(args) -> FitConfig:
    return FitConfig(embedder=args.embedder, seed=args.seed, num_workers=args.workers, use_gpu=args.use_gpu, trainer=args.trainer,
                     checkpoint_every=args.checkpoint_every, knn_on_ray=args.knn_on_ray)


def _fit_streaming(args) -> None:
    """Train on a corpus streamed through Ray jobs (`training.streaming`), save the artifact."""
    from training.streaming import fit_streaming

    if args.trainer != "ray":
        raise ValueError("--input trains with Ray Train: leave out --trainer local")
    artifact = fit_streaming(args.input, _fit_config(args), workspace=args.workspace, embed_actors=args.embed_actors,
                             embed_gpus=args.embed_gpus, knn_method=args.knn_method)
    artifact.save(args.out)
    print(f"wrote {args.out}: {artifact.manifest['tasks']} tasks, {len(artifact.models)} models, {artifact.manifest['training_rows']} training rows")


def _prices(text: str) -> tuple[float, float]:
    """"INPUT,OUTPUT" USD per 1M tokens."""
    try:
        input_price, output_price = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INPUT,OUTPUT prices in USD per 1M tokens, got {text!r}") from None
    if min(input_price, output_price) < 0:
        raise argparse.ArgumentTypeError(f"prices cannot be negative, got {text!r}")
    return input_price, output_price


def _model_prices(text: str) -> tuple[str, tuple[float, float]]:
    """"MODEL=INPUT,OUTPUT"."""
    model, separator, prices = text.rpartition("=")
    if not separator or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL=INPUT,OUTPUT, got {text!r}")
    return model, _prices(prices)


def _edit_pool(args) -> None:
    """`onboard` and `pool`: change a trained artifact's pool, nothing retrained (training/onboard.py)."""
    from serve.core.artifact import RouterArtifact
    from training import onboard

    artifact = RouterArtifact.load(args.artifact)
    if args.command == "onboard":
        labels = onboard.read_labels(args.labels, args.model, artifact)
        artifact = onboard.onboard(artifact, args.model, labels, prices=args.price)
        print(f"onboarded {args.model} from {len(labels.scores)} labelled prompts (mean label {labels.scores.mean():.3f})")
    else:
        for model in args.remove:
            artifact = onboard.remove_model(artifact, model)
        for model, prices in args.price:
            artifact = onboard.reprice(artifact, model, *prices)
    artifact.save(args.out)
    print(f"wrote {args.out}: pool {artifact.models}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser("embed", help="embed a dataset's prompts (Ray Data) into the on-disk cache")
    _dataset_arguments(embed)

    evaluate = commands.add_parser("evaluate", help="every router against the baselines, one protocol")
    _dataset_arguments(evaluate)
    evaluate.add_argument("--protocol", default="standard", choices=PROTOCOLS)
    evaluate.add_argument("--routers", nargs="*", help="a subset of routers (default: all)")
    evaluate.add_argument("--seeds", type=int, default=SEEDS, help="seeds per learned router")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AIQ gain intervals")
    evaluate.add_argument("--out", type=Path, required=True)

    fit = commands.add_parser("fit", help="train FineRouter on the training split and write a router artifact")
    source = fit.add_mutually_exclusive_group(required=True)
    _dataset_arguments(fit, source)
    source.add_argument("--input", help="stream a file or folder (or URI: s3://, gs://, ...) of .parquet/.jsonl routing data "
                                        "through Ray jobs, never gathered in this process (training/streaming.py)")
    fit.add_argument("--workspace", help="--input: where the embedded shards and kNN edges go (default: the cache "
                                         "folder; on a cluster, storage every node reads)")
    fit.add_argument("--knn-on-ray", action="store_true", default=None,
                     help="--dataset: build the kNN graph in a Ray task on the largest node whatever the size (default: from 100,000 rows)")
    fit.add_argument("--knn-method", "--knn-index", default="auto",
                     help="--input: how the kNN graph is built (auto, exact, ivf, nndescent, hnsw, torch: training/neighbours.py)")
    fit.add_argument("--out", type=Path, required=True, help="the artifact directory (written atomically)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    fit.add_argument("--use-gpu", action="store_true", help="Ray Train workers on GPUs")
    fit.add_argument("--checkpoint-every", type=int, default=FitConfig.checkpoint_every,
                     help="Ray Train: epochs between checkpoints (a failed worker resumes from the latest)")
    fit.add_argument("--trainer", choices=["ray", "local"], default="ray", help="Ray Train's TorchTrainer, or the same loop in-process")
    fit.add_argument("--holdout", type=float, default=0.0,
                     help="hold out this seeded fraction of the training rows (default 0: train on every one)")

    label = commands.add_parser("label", help="label a prompt log: every pool model's answer, its cost and its judged score "
                                              "(a Ray Data job), written as a routing table for fit")
    add_label_arguments(label)

    onboard = commands.add_parser("onboard", help="add a model to a trained artifact from a few labelled prompts, nothing retrained")
    onboard.add_argument("--artifact", type=Path, required=True, help="the trained router artifact")
    onboard.add_argument("--model", required=True, help="the new pool model's name (as its backend in serve.config)")
    onboard.add_argument("--labels", type=Path, required=True,
                         help="its labelled prompts: .jsonl/.parquet with 'prompt', 'scores' {MODEL: quality} and optional 'costs'")
    onboard.add_argument("--price", type=_prices, help="INPUT,OUTPUT USD per 1M tokens (default: the cost model of the labels' costs)")
    onboard.add_argument("--out", type=Path, required=True, help="the new artifact directory (written atomically)")

    pool = commands.add_parser("pool", help="remove models or change prices of a trained artifact, nothing retrained")
    pool.add_argument("--artifact", type=Path, required=True, help="the trained router artifact")
    pool.add_argument("--remove", action="append", default=[], metavar="MODEL", help="drop a model from the pool (repeatable)")
    pool.add_argument("--price", action="append", default=[], type=_model_prices, metavar="MODEL=INPUT,OUTPUT",
                      help="a model's new prices in USD per 1M tokens (repeatable)")
    pool.add_argument("--out", type=Path, required=True, help="the new artifact directory (written atomically)")

    args = parser.parse_args(argv)
    if args.command == "label":
        from training.labelling.job import run

        return run(args)
    from training.datasets import DatasetError

    try:
        if args.command in ("onboard", "pool"):
            _edit_pool(args)
            return 0
        if args.command == "fit" and args.input:
            _fit_streaming(args)
            return 0
        table, embeddings = _load(args)
        if args.command == "embed":
            answered = _answer_embeddings(args, table)
            print(f"{args.dataset}: {embeddings.shape[0]} prompts embedded, dimension {embeddings.shape[1]}"
                  + ("" if answered is None else f"; {answered.shape[0]} x {answered.shape[1]} answers embedded"))
        elif args.command == "fit":
            _fit(args, table, embeddings)
        elif args.command == "evaluate":
            from training.evaluate import evaluate as run_evaluation
            from training.evaluate import markdown_table, write_report

            report = run_evaluation(
                table, embeddings, args.protocol, routers=args.routers, seeds=tuple(range(args.seeds)), bootstrap_samples=args.bootstrap,
                answer_embeddings=_answer_embeddings(args, table),
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
