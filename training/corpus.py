"""The streamed fit's corpus: a user's routing data embedded into Parquet shards by a Ray Data job.

An actor pool of encoders takes the input in fixed row ranges, checks each row (`training.datasets.user_record`),
keeps the training rows, embeds their prompts, counts their tokens and writes one Parquet shard per range. Each
row gets a hash slot of its prompt, so duplicates fall on one side: the lowest slots are the validation rows,
the next ones the sample that chooses Stage 1's settings, and every row above the validation slots is a training
row. The shards are cached, keyed by the encoder, the embedding format and the input files' identity; a crashed
run resumes at the missing shards. On a cluster the workspace must be storage that every node reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve.core.atomic import atomic_file
from serve.core.encoder import count_tokens, encode, load_encoder
from serve.core.paths import cache_dir
from serve.core.prompt_files import (
    Chunk,
    JobInput,
    check_input,
    chunks,
    filesystem,
    read_chunk,
)
from training.cluster import cpus_per_actor
from training.datasets import DatasetError, record_layout, user_record
from training.embed import EMBEDDING_FORMAT, canonical_model_name

ROWS_PER_SHARD = 20_000
MIN_ROWS_PER_SHARD = 1_000
VALIDATION_ROWS = 10_000  # the validation slice's size on large inputs (its fraction on small ones: FitConfig)
SAMPLE_ROWS = 20_000  # the rows that choose Stage 1's settings and fit the cost model


def _slot(prompts: list[str]) -> np.ndarray:
    """[N] a uniform number in [0, 1) per prompt text: equal prompts get equal slots."""
    digests = (hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest() for p in prompts)
    return np.fromiter((int.from_bytes(d, "little") / 2.0**64 for d in digests), dtype=np.float64, count=len(prompts))


def column_vectors(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A fixed-size-list column as a [rows, width] array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(array), array.type.list_size)


def fixed_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).ravel()), values.shape[1])


def write_table(path: str, table: pa.Table) -> None:
    """Write a Parquet file atomically: readers never see part of one."""
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def read_table(path: str, columns: list[str]) -> pa.Table:
    fs, target = filesystem(path)
    with fs.open_input_file(target) as handle:
        return pq.read_table(handle, columns=columns)


@dataclass(frozen=True)
class Corpus:
    """The embedded training rows, as shards in `folder`; rows are numbered across shards in order."""

    folder: str
    name: str
    models: list[str]
    embedder: str
    shards: list[str]  # file names, in row order
    shard_rows: list[int]  # training rows per shard (validation rows excluded)
    validation_below: float  # slots below this are validation rows
    sample_below: float  # slots in [validation_below, sample_below) are the Stage 1 sample

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)

    @property
    def offsets(self) -> np.ndarray:
        """[shards + 1] the first row number of each shard, and the total."""
        return np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)

    @property
    def embedding_dim(self) -> int:
        """The embeddings' width, from the first shard's schema (nothing else is read)."""
        fs, target = filesystem(f"{self.folder}/{self.shards[0]}")
        with fs.open_input_file(target) as handle:
            return pq.read_schema(handle).field("embedding").type.list_size

    def read(self, shard: int, columns: list[str], part: str = "train") -> dict[str, np.ndarray]:
        """One shard's rows of a part: "train" (every row above the validation slots), "validation" or "sample"."""
        table = read_table(f"{self.folder}/{self.shards[shard]}", [*columns, "slot"])
        slot = table.column("slot").to_numpy()
        keep = {"train": slot >= self.validation_below, "validation": slot < self.validation_below,
                "sample": (slot >= self.validation_below) & (slot < self.sample_below)}[part]
        result = {}
        for name in columns:
            column = table.column(name)
            values = column_vectors(column, np.float32) if pa.types.is_fixed_size_list(column.type) else column.to_numpy(zero_copy_only=False)
            result[name] = values[keep]
        return result

    def save(self) -> None:
        fs, target = filesystem(f"{self.folder}/corpus.json")
        with fs.open_output_stream(target) as handle:
            handle.write(json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, folder: str) -> Corpus | None:
        fs, target = filesystem(f"{folder}/corpus.json")
        try:
            with fs.open_input_stream(target) as handle:
                return cls(**json.loads(handle.read()))
        except FileNotFoundError:
            return None


class _ShardEncoder:
    """Ray Data actor: each call reads one row range of the input, keeps its training rows, embeds them and
    writes their shard (skipped when a previous run wrote it); it returns the shard's row counts."""

    def __init__(self, source: JobInput, models: list[str], with_responses: bool, embedder: str, folder: str,
                 validation_below: float, device: str):
        self.source, self.models, self.with_responses = source, models, with_responses
        self.embedder, self.folder, self.validation_below = embedder, folder, validation_below
        self.encoder = load_encoder(embedder, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunk: Chunk = batch["chunk"][0]
        name = f"part-{chunk.start:012d}-{chunk.stop:012d}.parquet"
        fs, target = filesystem(f"{self.folder}/{name}")
        if fs.get_file_info(target).type == pafs.FileType.File:
            slot = read_table(f"{self.folder}/{name}", ["slot"]).column("slot").to_numpy()
        else:
            slot = self._write(chunk, f"{self.folder}/{name}")
        validation = int((slot < self.validation_below).sum())
        return {"shard": np.array([name]), "train_rows": np.array([len(slot) - validation]), "validation_rows": np.array([validation])}

    def _write(self, chunk: Chunk, path: str) -> np.ndarray:
        records = read_chunk(self.source.fs, self.source.file_format, chunk).to_pylist()
        kept = []
        for record in records:
            row = user_record(record, self.models, self.with_responses, f"{chunk.file.path}: row {record['_row'] - chunk.file_start + 1}")
            if row.split == "train":
                kept.append((record["_row"], row))
        prompts = [row.prompt for _, row in kept]
        slot = _slot(prompts)
        write_table(path, pa.table({
            "row": pa.array([number for number, _ in kept], pa.int64()),
            "prompt": pa.array(prompts, pa.string()),
            "benchmark": pa.array([row.benchmark for _, row in kept], pa.string()),
            "scores": fixed_lists(np.array([row.scores for _, row in kept], np.float32).reshape(len(kept), len(self.models))),
            "costs": fixed_lists(np.array([row.costs for _, row in kept], np.float64).reshape(len(kept), len(self.models))),
            "prompt_tokens": pa.array(count_tokens(prompts, self.embedder), pa.int64()),
            "embedding": fixed_lists(encode(self.encoder, prompts)),
            "slot": pa.array(slot, pa.float64()),
        }))
        return slot


def _input_identity(source: JobInput) -> list[tuple[str, int, float]]:
    """The input files with their sizes and modification times (ns): a changed file is a new input."""
    infos = source.fs.get_file_info([file.path for file in source.files])
    return [(info.path, info.size, info.mtime_ns or 0) for info in infos]


def embed_corpus(uri: str, embedder: str, *, workspace: str | None = None, validation_fraction: float = 0.2,
                 num_actors: int = 1, num_gpus: float = 0.0, rows_per_shard: int = ROWS_PER_SHARD, log=print) -> Corpus:
    """Embed the training rows of the input at `uri` into shards (step 1 of the module docstring), or reuse the
    shards of an earlier run over the same input and encoder."""
    import ray

    try:
        source = check_input(uri, "prompt", ())
    except ValueError as error:
        raise DatasetError(str(error)) from None
    first = read_chunk(source.fs, source.file_format, chunks(source, [(0, 1)], 1)[0]).to_pylist()[0]
    models, with_responses = record_layout(first)
    total = source.rows
    rows_per_shard = min(rows_per_shard, max(MIN_ROWS_PER_SHARD, math.ceil(total / 8)))  # a small input still spreads
    validation_below = min(validation_fraction, VALIDATION_ROWS / total)
    sample_below = validation_below + min(1.0, SAMPLE_ROWS / total)
    key = json.dumps({"model": canonical_model_name(embedder), "format": EMBEDDING_FORMAT, "files": _input_identity(source),
                      "validation_below": validation_below, "rows_per_shard": rows_per_shard}, sort_keys=True)
    root = workspace or str(cache_dir() / "corpora")
    folder = f"{root}/{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    if (corpus := Corpus.load(folder)) is not None:
        log(f"corpus: {corpus.rows} training rows in {len(corpus.shards)} shards, cached in {folder}")
        return corpus
    fs, target = filesystem(folder)
    fs.create_dir(target, recursive=True)
    started = time.perf_counter()
    pieces = chunks(source, [(0, total)], rows_per_shard)
    counts = ray.data.from_items([{"chunk": piece} for piece in pieces], override_num_blocks=len(pieces)).map_batches(
        _ShardEncoder,
        fn_constructor_kwargs={"source": source, "models": models, "with_responses": with_responses, "embedder": embedder,
                               "folder": folder, "validation_below": validation_below, "device": "cuda" if num_gpus > 0 else "cpu"},
        batch_size=1,
        batch_format="numpy",
        compute=one_shard_at_a_time(num_actors, len(pieces)),
        num_cpus=1 if num_gpus > 0 else cpus_per_actor(num_actors),
        num_gpus=num_gpus or None,
    ).take_all()
    by_name = {row["shard"]: row for row in counts}
    names = sorted(by_name)  # zero-padded row ranges: name order is row order
    corpus = Corpus(folder=folder, name=Path(uri.rstrip("/")).stem, models=models, embedder=embedder, shards=names,
                    shard_rows=[int(by_name[n]["train_rows"]) for n in names], validation_below=validation_below, sample_below=sample_below)
    corpus.save()
    log(f"corpus: embedded {corpus.rows} training rows (+{sum(int(r['validation_rows']) for r in counts)} validation) "
        f"into {len(names)} shards in {time.perf_counter() - started:.1f}s")
    return corpus


def one_shard_at_a_time(actors: int, shards: int):
    """An actor pool handed one shard at a time: a shard is seconds to minutes of work, and Ray Data's default
    of several blocks in flight per actor queues most shards on the first actor ready, leaving the others idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, min(actors, shards)), max_tasks_in_flight_per_actor=1)


def shard_items(corpus: Corpus):
    """A dataset of shard numbers, one block each, so that the shards spread over a pool's actors."""
    import ray

    return ray.data.from_items([{"shard": shard} for shard in range(len(corpus.shards))], override_num_blocks=len(corpus.shards))
