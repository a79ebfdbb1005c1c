"""Batch routing: a Ray Data job that routes every prompt of a Parquet or JSON Lines dataset.

    python -m serve.batch --artifact DIR --input PATH --output DIR [--preset balanced] [--generate --endpoint URL]

It writes one output row per input row: the input's columns, plus the decision (`routed_model`,
`ranked_models`, `predicted_quality`, `estimated_cost_usd`, `task`, `task_probability`). Decisions come
from `RouterArtifact.route`, the rule the evaluation harness and the Router deployment call, so what is
batch-routed is what was evaluated. With `--generate`, an OpenAI-compatible endpoint (the running router
app, or any vLLM server) answers each prompt with its routed model; the served app already holds the
engines, so the job does not start its own. Paths may be local or any URI pyarrow reads (s3://, gs://).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from serve.artifact import ArtifactError, PoolRanking, RouterArtifact
from serve.decision import PRESETS

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
DECISION_COLUMNS = ("routed_model", "ranked_models", "predicted_quality", "estimated_cost_usd", "task", "task_probability")
ANSWER_COLUMNS = ("answer", "answered_by", "error")
# Answer calls: transient failures (connection, timeout, 429, 5xx) are retried with exponential backoff.
RETRIES = 3
RETRY_BACKOFF_S = 0.5


class BatchInputError(ValueError):
    """Input or options the job cannot use; the message names the file, column or flag to fix."""


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI (s3://bucket/key) or a local path, and the path within it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _is_data_file(info: pafs.FileInfo) -> bool:
    """Skip hidden and marker files (.crc, _SUCCESS) that writers leave beside the data."""
    return info.type == pafs.FileType.File and not info.base_name.startswith((".", "_"))


def _input_files(path: str) -> tuple[pafs.FileSystem, list[str], str]:
    """(filesystem, the input's data files, their format): a single file, or every file under a folder."""
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise BatchInputError(f"{path}: no such file or folder")
    if info.type == pafs.FileType.File:
        files = [info]
    else:
        files = sorted((i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if _is_data_file(i)), key=lambda i: i.path)
    formats = {FORMATS.get(Path(i.base_name).suffix.lower()) for i in files}
    if not files or None in formats:
        unknown = next((i.path for i in files if Path(i.base_name).suffix.lower() not in FORMATS), path)
        raise BatchInputError(f"{unknown}: unknown input format; give .parquet or .jsonl files (one format per folder)")
    if len(formats) > 1:
        raise BatchInputError(f"{path}: mixes .parquet and .jsonl files; give one format per folder")
    return fs, [i.path for i in files], formats.pop()


def _parquet_columns(fs: pafs.FileSystem, file: str) -> tuple[int, dict[str, str]]:
    """The row count and each column's type."""
    try:
        with fs.open_input_file(file) as handle:
            metadata = pq.ParquetFile(handle).metadata
            return metadata.num_rows, {field.name: str(field.type) for field in metadata.schema.to_arrow_schema()}
    except pa.ArrowInvalid as error:
        raise BatchInputError(f"{file}: not a readable Parquet file ({error})") from None


def _first_record_line(fs: pafs.FileSystem, file: str) -> tuple[int, str]:
    """(line number, text) of the first non-blank line, or (0, "") for a file without one."""
    with fs.open_input_stream(file) as stream:
        try:
            for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), start=1):
                if line.strip():
                    return number, line
        except UnicodeDecodeError:
            raise BatchInputError(f"{file}: not UTF-8 text; expected one JSON object per line") from None
    return 0, ""


def _jsonl_columns(fs: pafs.FileSystem, file: str) -> tuple[int, dict[str, str]]:
    """1 and the first record's keys with the type of each value, or 0 and {} when the file has no record."""
    number, line = _first_record_line(fs, file)
    if not number:
        return 0, {}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BatchInputError(f"{file}: line {number} is not JSON ({error.msg}); expected one JSON object per line") from None
    if not isinstance(record, dict):
        raise BatchInputError(f"{file}: line {number} is not a JSON object; expected one object per line")
    return 1, {key: "string" if isinstance(value, str) else "null" if value is None else type(value).__name__ for key, value in record.items()}


def check_input(path: str, prompt_column: str, output_columns: tuple[str, ...]) -> tuple[pafs.FileSystem, list[str], str]:
    """The filesystem, the non-empty data files to read and their format, after checking each has a text `prompt_column`
    and none already has a column the job writes; raises BatchInputError naming the file and column."""
    fs, files, file_format = _input_files(path)
    read_columns = _parquet_columns if file_format == "parquet" else _jsonl_columns
    readable = []
    for file in files:
        rows, columns = read_columns(fs, file)
        if rows == 0:
            continue
        if prompt_column not in columns:
            raise BatchInputError(f"{file}: no column {prompt_column!r} (it has {sorted(columns)}); name the prompt column with --prompt-column")
        if columns[prompt_column] not in ("string", "large_string", "null"):  # null: a JSON record without a prompt
            raise BatchInputError(f"{file}: column {prompt_column!r} holds {columns[prompt_column]}, not text")
        clashes = sorted(set(columns) & set(output_columns))
        if clashes:
            raise BatchInputError(f"{file}: already has column(s) {clashes} that the job writes; rename them")
        readable.append(file)
    if not readable:
        raise BatchInputError(f"{path}: empty (no rows to route)")
    return fs, readable, file_format


def decision_columns(decision: PoolRanking, models: list[str]) -> dict[str, list]:
    """The decision as output columns; `ranked_models` lists the eligible models, best first."""
    rows = np.arange(len(decision.order))
    chosen = decision.order[:, 0]
    names = np.asarray(models, dtype=object)
    return {
        "routed_model": names[chosen].tolist(),
        "ranked_models": [names[order[eligible]].tolist() for order, eligible in zip(decision.order, decision.eligible)],
        "predicted_quality": decision.quality[rows, chosen].astype(float).tolist(),
        "estimated_cost_usd": decision.cost[rows, chosen].astype(float).tolist(),
        "task": decision.task.astype(int).tolist(),
        "task_probability": decision.task_probability.astype(float).tolist(),
    }


def _spread(values: list, present: np.ndarray, index: pd.Index, dtype: str) -> pd.Series:
    """`values` on the rows where `present` holds, null on the others."""
    remaining = iter(values)
    return pd.Series([next(remaining) if here else None for here in present], index=index, dtype=dtype)


# Nullable dtypes, so a batch with missing prompts writes the same schema as one without.
_DECISION_DTYPES = {"routed_model": "string", "ranked_models": "object", "predicted_quality": "Float64",
                    "estimated_cost_usd": "Float64", "task": "Int64", "task_probability": "Float64"}


class Router:
    """Ray Data actor: loads the artifact and its encoder once, then routes each batch of prompts.

    A row without a prompt (null) gets null decision columns instead of failing the whole job."""

    def __init__(self, artifact_dir: str, prompt_column: str, cost_weight: float, allowed: np.ndarray | None,
                 cost_cap: float | None, device: str):
        from serve.encoder import load_encoder

        self.artifact = RouterArtifact.load(artifact_dir)
        self.encoder = load_encoder(self.artifact.embedder, device=device)
        self.prompt_column, self.cost_weight, self.allowed, self.cost_cap = prompt_column, cost_weight, allowed, cost_cap

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from serve.encoder import count_tokens, encode

        present = batch[self.prompt_column].notna().to_numpy()
        texts = batch[self.prompt_column][present].tolist()
        columns = dict.fromkeys(DECISION_COLUMNS, [])
        if texts:
            decision = self.artifact.route(
                encode(self.encoder, texts), texts, count_tokens(texts, self.artifact.embedder), self.cost_weight,
                allowed=self.allowed, cost_cap=self.cost_cap,
            )
            columns = decision_columns(decision, self.artifact.models)
        return batch.assign(**{name: _spread(values, present, batch.index, _DECISION_DTYPES[name]) for name, values in columns.items()})


def answer(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[str | None, str | None, str | None]:
    """(answer, answering model, None), or (None, None, error) once the call has failed RETRIES + 1 times
    or failed for good (a 4xx other than 429, or a body that is not a chat completion)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        try:
            response = client.post("chat/completions", json=body)
        except httpx.TransportError as error:
            failure = f"{type(error).__name__}: {error}"
            continue
        if response.status_code == 429 or response.status_code >= 500:
            failure = f"HTTP {response.status_code}: {response.text[:300]}"
            continue
        if response.status_code != 200:
            return None, None, f"HTTP {response.status_code}: {response.text[:300]}"
        try:
            completion = response.json()
            return completion["choices"][0]["message"]["content"], completion.get("model"), None
        except (ValueError, KeyError, IndexError, TypeError):
            return None, None, f"not a chat completion: {response.text[:300]}"
    return None, None, f"{failure} (after {RETRIES + 1} attempts)"


def answer_client(endpoint: str, concurrency: int, timeout_s: float, api_key_env: str | None) -> httpx.Client:
    """A pooled client for `endpoint` (the API root, e.g. http://127.0.0.1:8000/v1)."""
    headers = {"Authorization": f"Bearer {os.environ[api_key_env]}"} if api_key_env else None
    return httpx.Client(base_url=endpoint.rstrip("/") + "/", headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0),
                        limits=httpx.Limits(max_connections=concurrency))


class Answerer:
    """Ray Data actor: answers each row's prompt with its routed model, `concurrency` calls at a time; a
    failed call fills the row's `error`, so one bad row never fails the job."""

    def __init__(self, endpoint: str, prompt_column: str, max_tokens: int, concurrency: int, timeout_s: float,
                 api_key_env: str | None):
        self.client = answer_client(endpoint, concurrency, timeout_s, api_key_env)
        self.threads = ThreadPoolExecutor(concurrency)
        self.prompt_column, self.max_tokens = prompt_column, max_tokens

    def _answer(self, model, prompt) -> tuple[str | None, str | None, str | None]:
        if pd.isna(model):
            return None, None, f"no {self.prompt_column!r} value, so no routed model"
        return answer(self.client, model, prompt, self.max_tokens)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        results = list(self.threads.map(self._answer, batch["routed_model"], batch[self.prompt_column]))
        return batch.assign(**{name: pd.Series(values, index=batch.index, dtype="string")
                               for name, values in zip(ANSWER_COLUMNS, zip(*results))})


def _allowed(artifact: RouterArtifact, candidates: list[str] | None) -> np.ndarray | None:
    if candidates is None:
        return None
    unknown = sorted(set(candidates) - set(artifact.models))
    if unknown:
        raise BatchInputError(f"--candidates: {unknown} not in the pool of {artifact.path} ({artifact.models})")
    return np.isin(artifact.models, candidates)


def _check_output(path: str) -> None:
    """Refuse a non-empty output folder: new files beside old ones would duplicate rows."""
    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise BatchInputError(f"--output {path}: is a file; give a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(root)):
        raise BatchInputError(f"--output {path}: not empty; remove it or choose another folder")


class OrderedFileSink(Datasink[None]):
    """Writes each write task's blocks, in arrival order, to one file named by the task's index
    (part-000000.parquet, part-000001.parquet, ...), so the folder read in name order is the input order.

    Ray's own Parquet writer hands a task's blocks to pyarrow's threaded `write_dataset`, which may
    interleave them; routing output is joined back to its input by position, so order is part of the contract."""

    def __init__(self, path: str, file_format: str):
        self.path, self.file_format = path, file_format

    def on_write_start(self, schema=None) -> None:
        fs, root = _filesystem(self.path)
        fs.create_dir(root, recursive=True)

    def write(self, blocks, ctx) -> None:
        tables = [table for table in (BlockAccessor.for_block(block).to_arrow() for block in blocks) if table.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        fs, root = _filesystem(self.path)
        with fs.open_output_stream(f"{root}/part-{ctx.task_idx:06}.{self.file_format}") as stream:
            if self.file_format == "parquet":
                pq.write_table(table, stream)
            else:
                stream.write(table.to_pandas().to_json(orient="records", lines=True, force_ascii=False).encode())


def build_dataset(args: argparse.Namespace):
    """The lazy Ray Data pipeline: read, route (and answer); raises BatchInputError before any work."""
    import ray

    artifact = RouterArtifact.load(args.artifact)
    allowed = _allowed(artifact, args.candidates)
    if args.max_cost is not None and args.max_cost < 0:
        raise BatchInputError(f"--max-cost {args.max_cost}: must be zero or more (USD per prompt)")
    if args.generate and not args.endpoint:
        raise BatchInputError("--generate needs --endpoint (an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1)")
    if args.api_key_env and args.api_key_env not in os.environ:
        raise BatchInputError(f"--api-key-env {args.api_key_env}: no such environment variable")
    fs, files, file_format = check_input(args.input, args.prompt_column, DECISION_COLUMNS + (ANSWER_COLUMNS if args.generate else ()))
    _check_output(args.output)

    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 0)
    if args.actors * args.cpus_per_actor > cpus - 1:  # router actors holding every CPU starve the read tasks
        raise BatchInputError(f"--actors {args.actors} x --cpus-per-actor {args.cpus_per_actor:g} leaves less than one of the "
                              f"cluster's {cpus:g} CPUs to read and write the data; lower them")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    read = ray.data.read_parquet if file_format == "parquet" else ray.data.read_json
    dataset = read(files, filesystem=fs)
    cost_weight = PRESETS[args.preset] if args.cost_weight is None else args.cost_weight
    dataset = dataset.map_batches(
        Router,
        fn_constructor_kwargs={"artifact_dir": os.path.abspath(artifact.path), "prompt_column": args.prompt_column, "cost_weight": cost_weight,
                               "allowed": allowed, "cost_cap": args.max_cost, "device": "cuda" if args.num_gpus > 0 else "cpu"},
        batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_cpus=args.cpus_per_actor, num_gpus=args.num_gpus or None, udf_modifying_row_count=False,
    )
    if args.generate:
        dataset = dataset.map_batches(
            Answerer,
            fn_constructor_kwargs={"endpoint": args.endpoint, "prompt_column": args.prompt_column, "max_tokens": args.max_tokens,
                                   "concurrency": args.concurrency, "timeout_s": args.timeout, "api_key_env": args.api_key_env},
            batch_size=args.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0, udf_modifying_row_count=False,  # waits on HTTP: needs no core of its own
        )
    return dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="the router artifact folder (python -m training fit --out), on every node")
    parser.add_argument("--input", required=True, help="a .parquet or .jsonl file, or a folder of them (local path or URI)")
    parser.add_argument("--output", required=True, help="the output folder (created; must be empty)")
    parser.add_argument("--prompt-column", default="prompt")
    knob = parser.add_mutually_exclusive_group()
    knob.add_argument("--cost-weight", type=float, help="quality given up to save one call of the pool's dearest model")
    knob.add_argument("--preset", choices=sorted(PRESETS), default="balanced", help="a named cost weight (default balanced)")
    parser.add_argument("--candidates", nargs="+", metavar="MODEL", help="route only among these pool models")
    parser.add_argument("--max-cost", type=float, help="USD cap per prompt (the cheapest candidate stays when none fits)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per routing call")
    parser.add_argument("--actors", type=int, default=1, help="router actors (each loads the encoder once)")
    parser.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs (and torch threads) per router actor")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per router actor (encoder on CUDA)")
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="output format")
    answers = parser.add_argument_group("answers")
    answers.add_argument("--generate", action="store_true", help="also answer each prompt with its routed model")
    answers.add_argument("--endpoint", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    answers.add_argument("--api-key-env", help="environment variable holding the endpoint's API key (read where the job's actors run)")
    answers.add_argument("--max-tokens", type=int, default=256)
    answers.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    answers.add_argument("--timeout", type=float, default=120, help="seconds per call")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "actors", "max_tokens", "concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.cost_weight is not None:
        args.preset = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        dataset = build_dataset(args)
        dataset.write_datasink(OrderedFileSink(args.output, args.format))
    except (BatchInputError, ArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"routed {args.input} -> {args.output} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
