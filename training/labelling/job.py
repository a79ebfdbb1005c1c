"""The labelling job: a prompt log and a pool in, the routing table `python -m training fit --dataset` reads out.

    python -m training label --prompts LOG --pool POOL.yaml --out DIR [--budget N] [--artifact A] [--resume]

1. Sample `--budget` rows of the log (JSONL/Parquet, local or URI, read by the batch job's reader): uniformly,
   or with `--artifact` stratified over its latent tasks (estimated on a uniform pre-sample of the log).
2. A Ray Data pipeline asks every pool model for each sampled prompt (one stage per model, `concurrency` calls in
   flight, the project's retry policy), prices each answer by its usage, and judges it (`judges`).
3. Part files are written as the batch job writes them (atomic, named by the sample positions they hold), so
   `--resume` asks only for the rows that are missing, and `--retry-failed` also asks again for rows a model or
   judge failed on. A row whose prompt is missing, or that a model or judge failed on, stays in its part file
   with the reason in `failures`: nothing is dropped silently.
4. `DIR/labels.jsonl` gathers every row that every model answered and every judge graded, in the user format
   (`id`, `prompt`, `scores`, `costs`, `responses`, and `benchmark` where the log has one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from serve.batch.output import (
    RowRangeSink,
    done_ranges,
    missing_ranges,
    part_name,
    prepare_output,
)
from serve.core.prompt_files import (
    ROW_COLUMN,
    BatchInputError,
    JobInput,
    check_input,
    chunks,
    filesystem,
    read_chunk,
)
from training.labelling.judges import Verdict, judge_with_reference
from training.labelling.pool import (
    LabelPoolConfig,
    PoolAnswerer,
    ask_llm_judge,
    judge_client,
    load_pool,
)
from training.labelling.sampling import latent_tasks, stratified_sample, uniform_sample

LABEL_COLUMNS = ("input_row", "responses", "costs", "scores", "judges", "failures")
SAMPLE_FILE = "_sample.json"
LABELS_FILE = "labels.jsonl"
# With --artifact, the pre-sample the latent tasks are estimated on: this many times the budget.
PRESAMPLE_FACTOR = 10
IO_CPUS = 0.25


def _read_rows(job_input: JobInput, rows: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """The log's `rows` (sorted input row numbers), with `columns` where the log has them."""
    ranges, start = [], None
    for position, row in enumerate(rows):
        if start is None:
            start = row
        if position + 1 == len(rows) or rows[position + 1] != row + 1:
            ranges.append((int(start), int(row) + 1))
            start = None
    tables = [read_chunk(job_input.fs, job_input.file_format, piece) for piece in chunks(job_input, ranges, 4096)]
    table = pa.concat_tables(tables, promote_options="permissive")
    frame = table.select([c for c in (*columns, ROW_COLUMN) if c in table.column_names]).to_pandas()
    return frame.rename(columns={ROW_COLUMN: "input_row"})


def sample_rows(job_input: JobInput, args: argparse.Namespace) -> np.ndarray:
    """The input rows to label, sorted: uniform, or stratified over the artifact's latent tasks."""
    if args.artifact is None:
        return uniform_sample(job_input.rows, args.budget or job_input.rows, args.seed)
    from serve.core.artifact import RouterArtifact
    from training.embed import embed_texts

    artifact = RouterArtifact.load(args.artifact)
    frame = _read_rows(job_input, uniform_sample(job_input.rows, PRESAMPLE_FACTOR * (args.budget or job_input.rows), args.seed),
                       [args.prompt_column])
    frame = frame[frame[args.prompt_column].map(lambda p: isinstance(p, str) and bool(p.strip()))]
    prompts = frame[args.prompt_column].tolist()
    tasks = latent_tasks(artifact, embed_texts(prompts, artifact.embedder), prompts)
    chosen = stratified_sample(tasks, args.budget or len(prompts), args.floor, args.seed)
    return np.sort(frame["input_row"].to_numpy()[chosen])


class Judge:
    """Ray Data actor: every answer of each row judged (its reference where the row has one, else the LLM judge),
    gathered with the answers and costs into the per-row label columns."""

    def __init__(self, config: dict, reference_column: str):
        self.config = LabelPoolConfig.model_validate(config)
        self.models = list(self.config.models)
        self.reference_column = reference_column
        judge = self.config.llm_judge
        self.client = judge_client(judge) if judge else None
        self.threads = ThreadPoolExecutor(judge.concurrency if judge else 4)

    def _verdict(self, prompt, reference, answer) -> Verdict:
        if reference is not None and not pd.isna(reference) and str(reference).strip():  # JSON may hold a number
            return judge_with_reference(answer, str(reference), self.config.reference_judge)
        if self.client is None:
            return Verdict(None, "none", "no reference and no llm_judge configured")
        return ask_llm_judge(self.client, self.config.llm_judge, prompt, answer)

    def _row(self, row: dict) -> dict:
        responses, costs, scores, judges, failures = {}, {}, {}, {}, {}
        for column, model in enumerate(self.models):
            answer, failure = row[f"answer_{column}"], row[f"failure_{column}"]
            if isinstance(failure, str):
                verdict = Verdict(None, "none", failure)
            else:
                verdict = self._verdict(row["prompt"], row.get(self.reference_column), answer)
            responses[model], scores[model], judges[model], failures[model] = answer, verdict.score, verdict.judge, verdict.failure
            costs[model] = None if isinstance(failure, str) else float(row[f"cost_{column}"])
        return {"responses": responses, "costs": costs, "scores": scores, "judges": judges, "failures": failures}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        labels = list(self.threads.map(self._row, batch.to_dict("records")))
        flat = [f"{kind}_{column}" for column in range(len(self.models)) for kind in ("answer", "cost", "failure")]
        return batch.drop(columns=flat).assign(**{key: [label[key] for label in labels] for key in labels[0]} if labels else {})


def _job_description(args, config: LabelPoolConfig, job_input: JobInput) -> dict:
    """What the labels depend on: a resumed job must match it."""
    return {"input": [[file.path, file.rows] for file in job_input.files], "pool": config.model_dump(mode="json"),
            "budget": args.budget, "seed": args.seed, "prompt_column": args.prompt_column,
            "reference_column": args.reference_column, "artifact": args.artifact and os.path.abspath(args.artifact),
            "floor": args.floor if args.artifact else None}


def _retryable(failures: dict) -> bool:
    """A row asked again by --retry-failed: a model or judge failed on it (a missing prompt stays missing)."""
    return any(reason and reason != "no prompt" for reason in failures.values())


def _read_part(fs, path: str) -> pd.DataFrame:
    with fs.open_input_stream(path) as stream:
        return pd.read_json(stream, lines=True, dtype=False)


def drop_failed_rows(out: str) -> int:
    """Rewrite the part files so that the rows a model or judge failed on are missing (and a resume asks for them
    again); returns how many. Each good run of rows is written as its own part before the old part goes."""
    fs, root = filesystem(out)
    dropped = 0
    for start, stop in done_ranges(out):
        path = f"{root}/{part_name(start, stop, 'jsonl')}"
        part = _read_part(fs, path)
        failed = part["failures"].map(_retryable).to_numpy()
        if not failed.any():
            continue
        part[ROW_COLUMN] = np.arange(start, stop)
        RowRangeSink(out, "jsonl").write([pa.Table.from_pandas(part[~failed], preserve_index=False)], None)
        fs.delete_file(path)
        dropped += int(failed.sum())
    return dropped


def write_labels(out: str, models: list[str]) -> dict:
    """Gather the part files into LABELS_FILE (the rows with every score) and return the job's summary."""
    fs, root = filesystem(out)
    parts = [_read_part(fs, f"{root}/{part_name(start, stop, 'jsonl')}") for start, stop in done_ranges(out)]
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["failures"])
    complete = rows["failures"].map(lambda failures: not any(failures.values())).to_numpy(bool)
    lines = []
    for row in rows[complete].to_dict("records"):
        record = {"id": str(row["input_row"]), "prompt": row["prompt"],
                  **{key: {model: row[key][model] for model in models} for key in ("scores", "costs", "responses")}}  # pool order
        if isinstance(row.get("benchmark"), str):
            record["benchmark"] = row["benchmark"]
        lines.append(json.dumps(record, ensure_ascii=False))
    temporary = f"{root}/.{LABELS_FILE}.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(("\n".join(lines) + "\n" if lines else "").encode())
    fs.move(temporary, f"{root}/{LABELS_FILE}")
    reasons: dict[str, int] = {}
    for failures in rows["failures"][~complete]:
        for model, reason in failures.items():
            if reason:
                key = f"{model}: {reason.split(':')[0]}"
                reasons[key] = reasons.get(key, 0) + 1
    spent = sum(cost for costs in rows.get("costs", []) for cost in costs.values() if cost is not None)
    return {"rows": len(rows), "labelled": int(complete.sum()), "failed": int((~complete).sum()), "failures": reasons,
            "cost_usd": spent, "models": models}


def build_dataset(args: argparse.Namespace, config: LabelPoolConfig):
    """The lazy pipeline over the sampled rows still to label (None when none is left); raises BatchInputError
    before any call to a model."""
    import ray

    job_input = check_input(args.prompts, args.prompt_column, LABEL_COLUMNS)
    prepare_output(args.out, _job_description(args, config, job_input), args.resume, 0)
    fs, root = filesystem(args.out)
    sample_path = f"{root}/{SAMPLE_FILE}"
    if fs.get_file_info(sample_path).type == pafs.FileType.NotFound:  # a new job, or one that crashed before sampling
        rows = sample_rows(job_input, args)
        with fs.open_output_stream(sample_path) as stream:
            stream.write(json.dumps(rows.tolist()).encode())
    else:
        with fs.open_input_stream(sample_path) as stream:
            rows = np.array(json.loads(stream.read()), dtype=np.int64)
    if args.retry_failed:
        print(f"asking again for {drop_failed_rows(args.out)} rows a model or judge failed on")
    todo = missing_ranges(done_ranges(args.out), len(rows))
    positions = np.concatenate([np.arange(start, stop) for start, stop in todo]) if todo else np.zeros(0, np.int64)
    if not len(positions):
        return None
    frame = _read_rows(job_input, rows[positions], [args.prompt_column, args.reference_column, "benchmark"])
    frame = frame.rename(columns={args.prompt_column: "prompt"})
    frame[ROW_COLUMN] = positions
    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_pandas(frame).repartition(max(1, len(frame) // args.batch_size))
    pool = config.model_dump(mode="json")
    for column, model in enumerate(config.models):
        dataset = dataset.map_batches(PoolAnswerer, fn_constructor_kwargs={"config": pool, "model": model, "column": column},
                                      batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
                                      num_cpus=0, udf_modifying_row_count=False)  # waits on HTTP: no core of its own
    return dataset.map_batches(Judge, fn_constructor_kwargs={"config": pool, "reference_column": args.reference_column},
                               batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
                               num_cpus=IO_CPUS, udf_modifying_row_count=False)


def run(args: argparse.Namespace) -> int:
    """The job, start to end; 2 with a message on bad input."""
    import sys

    if args.retry_failed and not args.resume:
        print("error: --retry-failed continues a job: add --resume", file=sys.stderr)
        return 2
    for flag in ("budget", "batch_size", "floor"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    started = time.perf_counter()
    try:
        config = load_pool(args.pool)
        dataset = build_dataset(args, config)
        if dataset is not None:
            dataset.write_datasink(RowRangeSink(args.out, "jsonl"), ray_remote_args={"num_cpus": IO_CPUS})
    except BatchInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = write_labels(args.out, list(config.models))
    print(json.dumps(summary))
    print(f"labelled {summary['labelled']} of {summary['rows']} sampled prompts ({summary['failed']} failed, kept in the part "
          f"files) at {summary['cost_usd']:.4f} USD in {time.perf_counter() - started:.1f}s -> {args.out}/{LABELS_FILE}")
    return 0
