"""The batch job's pipeline and command line (`python -m serve.batch --help`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import yaml

import serve.batch
from serve.batch.answers import ANSWER_COLUMNS, Answerer
from serve.batch.cascade import CASCADE_COLUMNS, BatchCascade
from serve.batch.output import RowRangeSink, prepare_output
from serve.batch.ranking import DECISION_COLUMNS, BatchRanker
from serve.core.artifact import ArtifactError, RouterArtifact
from serve.core.capabilities import FEATURES, Needs, shortfalls
from serve.core.decision import POLICIES, PRESETS
from serve.core.prompt_files import (
    BatchInputError,
    Chunk,
    JobInput,
    check_input,
    chunks,
    read_chunk,
)

# Reading and writing a chunk is light work: a fraction of a CPU each, so that parts are written while the
# ranker actors still route (and a crash loses little) instead of waiting for a free core.
IO_CPUS = 0.25


def _allowed(artifact: RouterArtifact, candidates: list[str] | None, needs: list[str] | None,
             pool_config: str | None) -> np.ndarray | None:
    """[M] the models a prompt may go to: among `candidates`, and able to serve what every prompt `needs` (by the
    capabilities that `pool_config`, the app's config, gives the pool: the served app's own rule)."""
    allowed = np.ones(len(artifact.models), bool)
    if candidates is not None:
        unknown = sorted(set(candidates) - set(artifact.models))
        if unknown:
            raise BatchInputError(f"--candidates: {unknown} not in the pool of {artifact.path} ({artifact.models})")
        allowed &= np.isin(artifact.models, candidates)
    if needs:
        if pool_config is None:
            raise BatchInputError("--needs: give --pool-config too (the app's config, e.g. serve.config), which says what each "
                                  "pool model can do")
        lacking = shortfalls(list(_pool_capabilities(pool_config, artifact.models).values()),
                             Needs(**{feature: f"--needs {feature}" for feature in needs}))
        allowed &= np.array([reason is None for reason in lacking], bool)
        if not allowed.any():
            considered = "; ".join(f"{model}: {reason.reason}" for model, reason in zip(artifact.models, lacking) if reason)
            raise BatchInputError(f"--needs {' '.join(needs)}: no candidate can serve it ({considered})")
    return None if allowed.all() else allowed


def _pool_capabilities(pool_config: str, models: list[str]) -> dict:
    """The pool's capabilities under the app config in `pool_config` (a Serve config such as serve.config, or its
    `args`): its `backends` and `local` sections."""
    from pydantic import TypeAdapter

    from serve.backends.backend_config import Backend, LocalEngineConfig
    from serve.backends.capabilities import pool_capabilities

    try:
        document = yaml.safe_load(Path(pool_config).read_text())
        args = document["applications"][0]["args"] if "applications" in document else document
        backends = TypeAdapter(dict[str, Backend]).validate_python(args.get("backends") or {})
        local = LocalEngineConfig.model_validate(args.get("local") or {})
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
        raise BatchInputError(f"--pool-config {pool_config}: not a readable app config ({error})") from None
    return pool_capabilities(models, backends, local)


def _ranker_actors(args: argparse.Namespace, cpus: float) -> tuple[int, float]:
    """(ranker actors, CPUs for each). Without GPUs the default is one actor per CPU, sharing what the reads and writes
    leave, so each runs one torch thread: actors of one thread never wait on each other, where the threads of one
    process wait at every operation (a long wait on a busy machine). With GPUs: one actor of one CPU."""
    if args.num_gpus > 0:
        return args.actors or 1, 1.0 if args.cpus_per_actor is None else args.cpus_per_actor
    actors = args.actors or max(1, int(cpus))
    return actors, max(cpus - 2 * IO_CPUS, IO_CPUS) / actors if args.cpus_per_actor is None else args.cpus_per_actor


def _read_chunks(items: pa.Table, job_input: JobInput, pieces: list[Chunk]) -> pa.Table:
    return pa.concat_tables([read_chunk(job_input.fs, job_input.file_format, pieces[index]) for index in items["chunk"].to_pylist()],
                            promote_options="permissive")


def _job_description(args: argparse.Namespace, artifact: RouterArtifact, job_input: JobInput, cost_weight: float) -> dict:
    """What the output depends on: a resumed job must match it."""
    return {
        "input": [[file.path, file.rows] for file in job_input.files],
        "artifact": os.path.abspath(artifact.path), "artifact_checksums": artifact.manifest.get("checksums"),
        "prompt_column": args.prompt_column, "cost_weight": cost_weight, "candidates": args.candidates, "needs": args.needs,
        "max_cost": args.max_cost, "format": args.format, "policy": args.policy,
        "answers": {"endpoint": args.endpoint, "max_tokens": args.max_tokens} if args.generate else None,
    }


def build_dataset(args: argparse.Namespace):
    """The lazy Ray Data pipeline over the rows still to write (all of them, unless resuming): read, route (and
    answer); None when nothing is left. Raises BatchInputError before any work."""
    import ray

    artifact = RouterArtifact.load(args.artifact)
    allowed = _allowed(artifact, args.candidates, args.needs, args.pool_config)
    if args.max_cost is not None and args.max_cost < 0:
        raise BatchInputError(f"--max-cost {args.max_cost}: must be zero or more (USD per prompt)")
    if args.generate and not args.endpoint:
        raise BatchInputError("--generate needs --endpoint (an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1)")
    if args.policy == "cascade" and not args.generate:
        raise BatchInputError("--policy cascade needs --generate and --endpoint: a cascade decides on the models' answers")
    if args.policy == "cascade" and artifact.posthoc is None:
        raise BatchInputError(f"--policy cascade: the artifact {artifact.path} has no post-hoc estimator to judge answers with (its "
                              "training data recorded no answers); fit one on a dataset with answers, or use --policy route")
    if args.api_key_env and args.api_key_env not in os.environ:
        raise BatchInputError(f"--api-key-env {args.api_key_env}: no such environment variable")
    cascade = args.policy == "cascade"
    written = CASCADE_COLUMNS if cascade else DECISION_COLUMNS + (ANSWER_COLUMNS if args.generate else ())
    job_input = check_input(args.input, args.prompt_column, written)
    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 0)
    actors, cpus_per_actor = _ranker_actors(args, cpus)
    if actors * cpus_per_actor > cpus - 2 * IO_CPUS:  # ranker actors holding every CPU starve the reads and writes
        raise BatchInputError(f"--actors {actors} x --cpus-per-actor {cpus_per_actor:g} leaves less than {2 * IO_CPUS:g} of "
                              f"the cluster's {cpus:g} CPUs to read and write the data; lower them")
    cost_weight = PRESETS[args.preset] if args.cost_weight is None else args.cost_weight
    todo = prepare_output(args.output, _job_description(args, artifact, job_input, cost_weight), args.resume, job_input.rows)
    if not todo:
        return None
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    pieces = chunks(job_input, todo, args.batch_size)
    dataset = ray.data.from_items([{"chunk": index} for index in range(len(pieces))]).map_batches(
        _read_chunks, fn_kwargs={"job_input": job_input, "pieces": pieces}, batch_size=1, batch_format="pyarrow",
        num_cpus=IO_CPUS)
    routing = {"artifact_dir": os.path.abspath(artifact.path), "prompt_column": args.prompt_column, "cost_weight": cost_weight,
               "allowed": allowed, "cost_cap": args.max_cost, "device": "cuda" if args.num_gpus > 0 else "cpu",
               "threads": math.ceil(cpus_per_actor)}
    answering = {"endpoint": args.endpoint, "max_tokens": args.max_tokens, "concurrency": args.concurrency, "timeout_s": args.timeout,
                 "api_key_env": args.api_key_env}
    dataset = dataset.map_batches(
        BatchCascade if cascade else BatchRanker, fn_constructor_kwargs={**routing, **answering} if cascade else routing,
        batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=args.num_gpus or None, udf_modifying_row_count=False,
    )
    if args.generate and not cascade:
        dataset = dataset.map_batches(
            Answerer,
            fn_constructor_kwargs={**answering, "prompt_column": args.prompt_column},
            batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0, udf_modifying_row_count=False,  # waits on HTTP: needs no core of its own
        )
    return dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.batch", description=serve.batch.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="the router artifact folder (python -m training fit --out), on every node")
    parser.add_argument("--input", required=True, help="a .parquet or .jsonl file, or a folder of them (local path or URI)")
    parser.add_argument("--output", required=True, help="the output folder (created; must be empty unless --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="finish the job that wrote --output (same arguments): write only the rows it lacks")
    parser.add_argument("--prompt-column", default="prompt")
    knob = parser.add_mutually_exclusive_group()
    knob.add_argument("--cost-weight", type=float, help="quality given up to save one call of the pool's dearest model")
    knob.add_argument("--preset", choices=sorted(PRESETS), default="balanced", help="a named cost weight (default balanced)")
    parser.add_argument("--candidates", nargs="+", metavar="MODEL", help="route only among these pool models")
    parser.add_argument("--needs", nargs="+", choices=FEATURES,
                        help="what every prompt needs of its model: route only among the models that can (with --pool-config)")
    parser.add_argument("--pool-config", help="the app's config (serve.config) whose backends say what each pool model can do")
    parser.add_argument("--max-cost", type=float, help="USD cap per prompt (the cheapest candidate stays when none fits)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per routing call (and per read)")
    parser.add_argument("--actors", type=int,
                        help="ranker actors, each loading the encoder once (default: one per CPU of the cluster; 1 with --num-gpus)")
    parser.add_argument("--cpus-per-actor", type=float,
                        help="CPUs per ranker actor, rounded up for its torch threads (default: the CPUs that reading and "
                             "writing leave, shared among the actors; 1 with --num-gpus)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per ranker actor (encoder on CUDA)")
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="output format")
    parser.add_argument("--policy", choices=POLICIES, default="route",
                        help="route: one model per prompt; cascade (with --generate): models asked in turn, each answer judged, "
                             "the best returned (the artifact needs a post-hoc estimator)")
    answers = parser.add_argument_group("answers")
    answers.add_argument("--generate", action="store_true", help="also answer each prompt with its routed model (or its cascade)")
    answers.add_argument("--endpoint", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    answers.add_argument("--api-key-env", help="environment variable holding the endpoint's API key (read where the job's actors run)")
    answers.add_argument("--max-tokens", type=int, default=256)
    answers.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    answers.add_argument("--timeout", type=float, default=120, help="seconds per call")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "actors", "max_tokens", "concurrency"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.cost_weight is not None:
        args.preset = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        dataset = build_dataset(args)
        if dataset is None:
            print(f"{args.output} already holds every row of {args.input}: nothing to do")
            return 0
        dataset.write_datasink(RowRangeSink(args.output, args.format), ray_remote_args={"num_cpus": IO_CPUS})
    except (BatchInputError, ArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"routed {args.input} -> {args.output} in {time.perf_counter() - started:.1f}s")
    return 0
