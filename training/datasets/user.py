"""A user's routing data (JSONL or Parquet, one row per prompt), checked row by row: the streamed fit checks
each row with `user_record` as it reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from serve.core.encoder import DEFAULT_EMBEDDER
from training.datasets.files import read_jsonl
from training.datasets.table import DatasetError, RoutingTable, build_table


def _check_number(value, where: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{where}: expected a finite number, got {value!r}")
    if not low <= value <= high:
        raise DatasetError(f"{where}: {value} is outside [{low}, {high}]")
    return float(value)


@dataclass(frozen=True)
class UserRecord:
    """One checked row of a user's routing data (see `load_user_dataset`)."""

    prompt: str
    scores: list[float]
    costs: list[float]
    responses: list[str] | None
    benchmark: str
    split: str


def record_layout(first: dict) -> tuple[list[str], bool]:
    """(the models, whether answers are recorded) as the first row of a user's data sets them for every row."""
    scores = first.get("scores")
    return list(dict(scores) if isinstance(scores, list) else scores or {}), first.get("responses") is not None


def user_record(record: dict, models: list[str], with_responses: bool, where: str) -> UserRecord:
    """Check one row of a user's routing data against the models (and the presence of answers) of its first row;
    `where` names the file and row in the error. Parquet map columns may arrive as lists of (key, value) pairs."""
    record = {key: dict(value) if key in ("scores", "costs", "responses") and isinstance(value, list) else value
              for key, value in record.items()}
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: column 'prompt': missing or empty")
    row_scores = record.get("scores")
    if not isinstance(row_scores, dict) or not row_scores:
        raise DatasetError(f"{where}: column 'scores': expected an object of model -> score")
    if set(row_scores) != set(models):
        missing, extra = sorted(set(models) - set(row_scores)), sorted(set(row_scores) - set(models))
        raise DatasetError(f"{where}: column 'scores': models differ from row 1 (missing {missing}, extra {extra})")
    scores = [_check_number(row_scores[m], f"{where}: column 'scores', model {m!r}", low=0, high=1) for m in models]
    row_costs = record.get("costs")
    if row_costs is None:
        costs = [0.0] * len(models)
    elif not isinstance(row_costs, dict) or set(row_costs) != set(models):
        raise DatasetError(f"{where}: column 'costs': expected an object with the same models as 'scores'")
    else:
        costs = [_check_number(row_costs[m], f"{where}: column 'costs', model {m!r}", low=0, high=math.inf) for m in models]
    row_responses = record.get("responses")
    if (row_responses is not None) != with_responses:
        raise DatasetError(f"{where}: column 'responses': on some rows and not others (row 1 {'has' if with_responses else 'lacks'} it)")
    responses = None
    if with_responses:
        if not isinstance(row_responses, dict) or set(row_responses) != set(models):
            raise DatasetError(f"{where}: column 'responses': expected an object with the same models as 'scores'")
        if not all(isinstance(row_responses[m], str) for m in models):
            raise DatasetError(f"{where}: column 'responses': every answer must be a string")
        responses = [row_responses[m] for m in models]
    split = record.get("split") or "train"
    if split not in ("train", "test"):
        raise DatasetError(f"{where}: column 'split': expected 'train' or 'test', got {split!r}")
    return UserRecord(prompt, scores, costs, responses, str(record.get("benchmark") or "user"), split)


def load_user_dataset(path: Path | str, embedder: str = DEFAULT_EMBEDDER) -> RoutingTable:
    """A user's routing data, JSONL or Parquet, one row per prompt:

    - `prompt` (string, required)
    - `scores` (object model -> quality in [0, 1], required; the same models on every row)
    - `costs` (object model -> USD per query, optional; where absent every model costs 0: quality-only)
    - `benchmark` (string, optional, default "user"), `split` ("train" or "test", optional: without it the
      protocols make a seeded split), `id` (string, optional)
    - `responses` (object model -> answer text, optional; on every row or none, with the models of 'scores'):
      the answers that answer-aware cascades judge
    """
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DatasetError(f"{path}: not a readable Parquet file ({error})") from None
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".json")):
        records = read_jsonl(path)
    else:
        raise DatasetError(f"{path}: unknown format; use .jsonl or .parquet")
    if not records:
        raise DatasetError(f"{path}: no rows")

    models, with_responses = record_layout(records[0])
    parsed = [user_record(record, models, with_responses, f"{path}: row {number}") for number, record in enumerate(records, start=1)]
    ids = [str(record.get("id") or number) for number, record in enumerate(records, start=1)]
    prompts, scores, costs = [r.prompt for r in parsed], [r.scores for r in parsed], [r.costs for r in parsed]
    responses = [r.responses for r in parsed]
    benchmarks, splits = [r.benchmark for r in parsed], [r.split for r in parsed]
    return build_table(path.stem, models, ids, prompts, benchmarks, splits, scores, embedder, costs=costs,
                  responses=responses if with_responses else None)
