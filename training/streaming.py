"""A streamed fit: routing data that outgrow one process, trained on as Ray jobs over Parquet shards.

`python -m training fit --input URI` reads a file or folder of a user's routing data (JSON Lines or Parquet,
local or on object storage: whatever pyarrow reads) and never gathers the corpus in the driver, which holds
only per-shard counts and two bounded samples:

1. `embed_corpus`: an actor pool of encoders (Ray Data) takes the input in fixed row ranges, checks each row
   (`training.datasets.user_record`), keeps the training rows, embeds their prompts, counts their tokens and
   writes one Parquet shard per range. Each row gets a hash slot of its prompt, so duplicates fall on one side:
   the lowest slots are the validation rows, the next ones the sample that chooses Stage 1's settings, and
   every row above the validation slots is a training row. The shards are cached, keyed by the encoder, the
   embedding format and the input files' identity; a crashed run resumes at the missing shards.
2. Stage 1 settings (kNN degree, mix, Leiden resolution) are chosen on the sample, as `fit_router` chooses
   them on its fit rows.
3. `knn_edges`: one task builds a faiss index (IVF's lists trained on the sample) shard by shard; a Ray Data
   actor pool queries it over the shards and writes each shard's edges to a file of their own.
4. `discover_tasks`: one task, on one node, reads the edges and scores, runs Leiden (igraph's C
   implementation on large graphs), merges tiny tasks by centroids summed shard by shard, and tabulates the
   task table; it writes every row's task label.
5. Stage 2 on Ray Train, reading the shards with their labels as a Ray Dataset.
6. The blend is chosen on the validation rows and the artifact assembled as `fit_router` assembles it.

On a cluster the workspace (where the shards go) must be storage that every node reads: a shared file system or
object storage.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve.core.artifact import RouterArtifact, network_inputs
from serve.core.encoder import count_tokens, encode, load_encoder
from serve.core.features import prompt_features
from serve.core.paths import cache_dir
from serve.core.prompt_files import (
    Chunk,
    JobInput,
    check_input,
    chunks,
    filesystem,
    read_chunk,
)
from training.datasets import DatasetError, RoutingTable, record_layout, user_record
from training.embed import EMBEDDING_FORMAT, canonical_model_name, cpus_per_actor
from training.fit import (
    FitConfig,
    _select_stage1,
    assemble_artifact,
    feature_scaling,
    task_candidates,
    task_table,
)
from training.graph import (
    build_index,
    community_sums,
    leiden,
    merge_by_centroids,
    on_gpu_if_available,
    query_block,
    resolve_index_kind,
    task_graph,
    use_assigned_cpus,
)
from training.moe import array_dataset, train_with_ray
from training.routers.base import TrainingSet

ROWS_PER_SHARD = 20_000
MIN_ROWS_PER_SHARD = 1_000
VALIDATION_ROWS = 10_000  # the validation slice's size on large inputs (its fraction on small ones: FitConfig)
SAMPLE_ROWS = 20_000  # the rows that choose Stage 1's settings and fit the cost model
QUERY_ROWS_PER_CALL = 5_000  # kNN queries per faiss call in a query actor
COMPLETE = "_COMPLETE"  # written last into a folder of edge shards


def _slot(prompts: list[str]) -> np.ndarray:
    """[N] a uniform number in [0, 1) per prompt text: equal prompts get equal slots."""
    digests = (hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest() for p in prompts)
    return np.fromiter((int.from_bytes(d, "little") / 2.0**64 for d in digests), dtype=np.float64, count=len(prompts))


def _vectors(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A fixed-size-list column as a [rows, width] array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(array), array.type.list_size)


def _fixed_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).ravel()), values.shape[1])


def _write_table(path: str, table: pa.Table) -> None:
    """Write a Parquet file under a temporary name, then move it into place: readers never see part of one."""
    fs, target = filesystem(path)
    temporary = f"{target}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(temporary) as handle:
        pq.write_table(table, handle)
    fs.move(temporary, target)


def _read_table(path: str, columns: list[str]) -> pa.Table:
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

    def read(self, shard: int, columns: list[str], part: str = "train") -> dict[str, np.ndarray]:
        """One shard's rows of a part: "train" (every row above the validation slots), "validation" or "sample"."""
        table = _read_table(f"{self.folder}/{self.shards[shard]}", [*columns, "slot"])
        slot = table.column("slot").to_numpy()
        keep = {"train": slot >= self.validation_below, "validation": slot < self.validation_below,
                "sample": (slot >= self.validation_below) & (slot < self.sample_below)}[part]
        result = {}
        for name in columns:
            column = table.column(name)
            values = _vectors(column, np.float32) if pa.types.is_fixed_size_list(column.type) else column.to_numpy(zero_copy_only=False)
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
            slot = _read_table(f"{self.folder}/{name}", ["slot"]).column("slot").to_numpy()
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
        _write_table(path, pa.table({
            "row": pa.array([number for number, _ in kept], pa.int64()),
            "prompt": pa.array(prompts, pa.string()),
            "benchmark": pa.array([row.benchmark for _, row in kept], pa.string()),
            "scores": _fixed_lists(np.array([row.scores for _, row in kept], np.float32).reshape(len(kept), len(self.models))),
            "costs": _fixed_lists(np.array([row.costs for _, row in kept], np.float64).reshape(len(kept), len(self.models))),
            "prompt_tokens": pa.array(count_tokens(prompts, self.embedder), pa.int64()),
            "embedding": _fixed_lists(encode(self.encoder, prompts)),
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
        compute=_one_shard_at_a_time(num_actors, len(pieces)),
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


def _gather(corpus: Corpus, parts: tuple[str, ...], columns: list[str]) -> list[dict[str, np.ndarray]]:
    """Bounded parts ("validation", "sample") of every shard, read in one pass by one Ray task per shard."""
    import ray

    read = ray.remote(num_cpus=0.25)(lambda shard: [corpus.read(shard, columns, part) for part in parts])
    pieces = ray.get([read.remote(shard) for shard in range(len(corpus.shards))])
    return [{name: np.concatenate([piece[p][name] for piece in pieces]) for name in columns} for p in range(len(parts))]


def _training_set(corpus: Corpus, columns: dict[str, np.ndarray]) -> TrainingSet:
    """Gathered rows as the in-memory fit's TrainingSet."""
    n = len(columns["prompt"])
    table = RoutingTable(name=corpus.name, models=corpus.models, prompt_ids=columns["row"].astype(str).astype(object),
                         prompts=list(columns["prompt"]), benchmarks=columns["benchmark"].astype(object),
                         splits=np.full(n, "train", dtype=object), scores=columns["scores"].astype(np.float64),
                         costs=columns["costs"].astype(np.float64), prompt_tokens=columns["prompt_tokens"])
    return TrainingSet(table, columns["embedding"])


ROW_COLUMNS = ["row", "prompt", "benchmark", "scores", "costs", "prompt_tokens", "embedding"]


class _ShardNeighbours:
    """Ray Data actor: holds the index, answers the kNN queries of whole shards and writes their edges."""

    def __init__(self, corpus: Corpus, index, k: int, folder: str):
        import faiss
        import ray

        use_assigned_cpus()
        self.index = on_gpu_if_available(faiss.deserialize_index(ray.get(index["serialized"])))
        self.corpus, self.k, self.folder = corpus, k, folder
        self.offsets = corpus.offsets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = int(batch["shard"][0])
        embeddings = self.corpus.read(shard, ["embedding"])["embedding"]
        rows = np.arange(self.offsets[shard], self.offsets[shard + 1])
        answers = [query_block(self.index, embeddings[start:start + QUERY_ROWS_PER_CALL], rows[start:start + QUERY_ROWS_PER_CALL], self.k)
                   for start in range(0, len(rows), QUERY_ROWS_PER_CALL)]
        neighbours = np.concatenate([a[0] for a in answers]) if answers else np.zeros((0, self.k), np.int64)
        similarities = np.concatenate([a[1] for a in answers]) if answers else np.zeros((0, self.k), np.float32)
        _write_table(f"{self.folder}/{self.corpus.shards[shard]}", pa.table({
            "neighbours": _fixed_lists(neighbours), "similarities": _fixed_lists(similarities)}))
        return {"shard": batch["shard"]}


def _shard_items(corpus: Corpus):
    """A dataset of shard numbers, one block each, so that the shards spread over a pool's actors."""
    import ray

    return ray.data.from_items([{"shard": shard} for shard in range(len(corpus.shards))], override_num_blocks=len(corpus.shards))


def _build_shard_index(corpus: Corpus, kind: str, sample: np.ndarray, seed: int) -> np.ndarray:
    """The serialised index over every training row, added shard by shard (IVF's lists trained on `sample`)."""
    import faiss

    use_assigned_cpus()
    index = build_index(sample, kind, seed, rows=corpus.rows, add=False)
    for shard in range(len(corpus.shards)):
        index.add(np.ascontiguousarray(corpus.read(shard, ["embedding"])["embedding"]))
    return faiss.serialize_index(index)


def _one_shard_at_a_time(actors: int, shards: int):
    """An actor pool handed one shard at a time: a shard is seconds to minutes of work, and Ray Data's default
    of several blocks in flight per actor queues most shards on the first actor ready, leaving the others idle."""
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, min(actors, shards)), max_tasks_in_flight_per_actor=1)


def _node_cpus() -> int:
    import ray

    return max(1, int(max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])))


def knn_edges(corpus: Corpus, k: int, *, index: str = "auto", seed: int = 0, num_actors: int | None = None,
              sample: np.ndarray | None = None, seconds: dict | None = None) -> str:
    """Every training row's k nearest other rows, written per shard (step 3); returns the edges' folder.
    `sample`: the embeddings of the corpus's sample rows (IVF trains on them), when the caller has them.
    `seconds`, when given, gets the index build's seconds as "knn_index" and the queries' as "knn_queries": the
    build runs on one node, the queries on every node, so they scale apart."""
    import ray

    kind = resolve_index_kind(index, corpus.rows)
    if kind == "torch":
        kind = "exact"  # the actors hold a faiss index; torch_knn is the in-memory path's GPU fallback
    folder = f"{corpus.folder}/edges-k{k}-{kind}-seed{seed}"
    fs, target = filesystem(folder)
    if fs.get_file_info(f"{target}/{COMPLETE}").type == pafs.FileType.File:
        return folder
    if sample is None:
        sample = _gather(corpus, ("sample",), ["embedding"])[0]["embedding"]
    started = time.perf_counter()
    index_bytes = corpus.rows * sample.shape[1] * 4 * 2  # the vectors, and room for the structure and a copy
    cpus = _node_cpus()  # the build and each query actor take a whole node: one copy of the index per node
    build = ray.remote(num_cpus=cpus, memory=index_bytes)(_build_shard_index)
    shared = {"serialized": build.remote(corpus, kind, sample, seed)}  # a reference: each actor fetches it once
    ray.wait([shared["serialized"]], fetch_local=False)  # built before the actors take every CPU it needs
    built = time.perf_counter()
    fs.create_dir(target, recursive=True)
    actors = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    _shard_items(corpus).map_batches(
        _ShardNeighbours,
        fn_constructor_kwargs={"corpus": corpus, "index": shared, "k": k, "folder": folder},
        batch_size=1,
        batch_format="numpy",
        compute=_one_shard_at_a_time(actors, len(corpus.shards)),
        num_cpus=cpus,
        memory=index_bytes // 2,
    ).materialize()
    with fs.open_output_stream(f"{target}/{COMPLETE}"):
        pass
    if seconds is not None:
        seconds.update(knn_index=built - started, knn_queries=time.perf_counter() - built)
    return folder


def _discover_tasks(corpus: Corpus, edges: str, mix: float, resolution: float, min_size: int, shrinkage: float,
                    seed: int, labels_path: str) -> np.ndarray:
    """Leiden on the whole kNN graph, on one node (step 4): writes the labels, returns the task table [T, M]."""
    parts = [_read_table(f"{edges}/{name}", ["neighbours", "similarities"]) for name in corpus.shards]
    neighbours = np.concatenate([_vectors(p.column("neighbours"), np.int64) for p in parts])
    similarities = np.concatenate([_vectors(p.column("similarities"), np.float32) for p in parts])
    del parts
    scores = np.concatenate([corpus.read(shard, ["scores"])["scores"] for shard in range(len(corpus.shards))])
    communities = leiden(task_graph(neighbours, similarities, scores, mix), resolution, seed)
    del neighbours, similarities
    offsets, count = corpus.offsets, communities.max() + 1
    sums = sum(community_sums(communities[offsets[s]:offsets[s + 1]], corpus.read(s, ["embedding"])["embedding"], count)
               for s in range(len(corpus.shards)))
    labels = merge_by_centroids(communities, sums, min_size)
    _write_table(labels_path, pa.table({"task": pa.array(labels.astype(np.int32))}))
    return task_table(labels, scores, shrinkage)


class _Stage2Rows:
    """Ray Data map: one shard's network inputs, scores and task labels, for Ray Train."""

    def __init__(self, corpus: Corpus, labels_path: str, scaling: tuple[np.ndarray, np.ndarray]):
        self.corpus, self.scaling, self.offsets = corpus, scaling, corpus.offsets
        self.labels = _read_table(labels_path, ["task"]).column("task").to_numpy().astype(np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shard = int(batch["shard"][0])
        rows = self.corpus.read(shard, ["prompt", "embedding", "scores"])
        return {"inputs": network_inputs(rows["embedding"], list(rows["prompt"]), *self.scaling), "scores": rows["scores"],
                "tasks": self.labels[self.offsets[shard]:self.offsets[shard + 1]]}


def fit_streaming(uri: str, config: FitConfig = FitConfig(), *, workspace: str | None = None, embed_actors: int = 1,
                  embed_gpus: float = 0.0, knn_index: str = "auto", log=print) -> RouterArtifact:
    """Train FineRouter on the input at `uri` without gathering it (the module docstring's six steps)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    started = time.perf_counter()
    corpus = embed_corpus(uri, config.embedder, workspace=workspace, validation_fraction=config.validation_fraction,
                          num_actors=embed_actors, num_gpus=embed_gpus, log=log)
    return fit_corpus(corpus, config, workspace=workspace, knn_index=knn_index, log=log,
                      seconds={"embed": time.perf_counter() - started}, source=uri)


def fit_corpus(corpus: Corpus, config: FitConfig = FitConfig(), *, workspace: str | None = None, knn_index: str = "auto", log=print,
               seconds: dict | None = None, source: str | None = None) -> RouterArtifact:
    """Steps 2-6 on an embedded corpus; the artifact's manifest records each step's seconds."""
    import ray

    seconds = dict(seconds or {})
    clock = [time.perf_counter()]

    def lap(step: str) -> float:
        now = time.perf_counter()
        seconds[step], clock[0] = now - clock[0], now
        return seconds[step]

    if corpus.rows <= max(config.ks):
        raise DatasetError(f"{source or corpus.folder}: {corpus.rows} training rows; a kNN graph of degree {max(config.ks)} needs more")
    sample, validation = (_training_set(corpus, rows) for rows in _gather(corpus, ("sample", "validation"), ROW_COLUMNS))
    stage1, _, trials = _select_stage1(sample, validation, config)
    log(f"stage 1 settings on a sample of {len(sample.table)} rows: k={stage1['k']}, mix={stage1['mix']}, "
        f"resolution={stage1['resolution']} ({lap('stage1_settings'):.1f}s)")

    knn_seconds = {}
    edges = knn_edges(corpus, stage1["k"], index=knn_index, seed=config.seed, sample=sample.embeddings, seconds=knn_seconds)
    log(f"kNN graph of {corpus.rows} rows in {lap('knn'):.1f}s (index build {knn_seconds.get('knn_index', 0):.1f}s)")
    labels_path = f"{edges}/tasks-mix{stage1['mix']}-resolution{stage1['resolution']}-min{config.min_task_size}.parquet"
    discover = ray.remote(num_cpus=_node_cpus(), memory=corpus.rows * (stage1["k"] * 60 + 64))(_discover_tasks)
    table = ray.get(discover.remote(corpus, edges, stage1["mix"], stage1["resolution"], config.min_task_size, config.shrinkage,
                                    config.seed, labels_path))
    log(f"stage 1: {len(table)} tasks in {lap('tasks'):.1f}s")

    scaling = feature_scaling(prompt_features(sample.table.prompts), config.prompt_features)
    train_rows = _shard_items(corpus).map_batches(
        _Stage2Rows, fn_constructor_kwargs={"corpus": corpus, "labels_path": labels_path, "scaling": scaling},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    validation_rows = array_dataset({"inputs": network_inputs(validation.embeddings, validation.table.prompts, *scaling),
                                     "scores": validation.table.scores.astype(np.float32)})
    candidates = task_candidates(table, config.candidate_margin)
    networks = train_with_ray({"train": train_rows, "validation": validation_rows}, candidates, replace(config.network, seed=config.seed),
                              num_workers=config.num_workers, use_gpu=config.use_gpu, checkpoint_every=config.checkpoint_every,
                              storage_path=_checkpoints(workspace))
    log(f"stage 2 on Ray Train in {lap('stage2'):.1f}s")
    streamed = {"input": source, "corpus": corpus.folder, "sample_rows": len(sample.table), "validation_rows": len(validation.table),
                "seconds": seconds, "knn_seconds": knn_seconds}
    artifact = assemble_artifact(networks, table, scaling, sample, sample, validation, config,
                                 {"stage1": stage1, "stage1_trials": trials, "streamed": streamed}, log, training_rows=corpus.rows)
    lap("blend")
    return artifact


def _checkpoints(workspace: str | None) -> str | None:
    """Ray Train's checkpoints beside the shards where the workspace is shared storage (a URI)."""
    return f"{workspace}/checkpoints" if workspace and "://" in workspace else None

