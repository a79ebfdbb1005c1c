"""Routing datasets (prompts x models -> score, cost) loaded into one canonical table.

Every loader follows its dataset's SOURCE.md: rows with empty scores are dropped, train prompts that also
occur in a test split are removed from train, and cost is the per-query USD cost where the data has it,
else price x (prompt tokens + estimated output tokens) / 1e6.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from serve.core.encoder import DEFAULT_EMBEDDER, count_tokens
from serve.core.paths import data_dir

# Output length assumed where a dataset records none (llmrouter_9model, routerdc_7model), in tokens.
DEFAULT_OUTPUT_TOKENS = 256
# A price for models of equal size where the data has none (routerdc_7model): quality-only routing.
FLAT_PRICE_PER_MTOK = 0.2


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, and the row and column where it can."""


@dataclass(frozen=True)
class RoutingTable:
    """N prompts x M models. `split` is "train", "test" or "ood" (test-only, out of distribution)."""

    name: str
    models: list[str]
    prompt_ids: np.ndarray  # [N] str
    prompts: list[str]  # the text the router embeds
    benchmarks: np.ndarray  # [N] str
    splits: np.ndarray  # [N] str
    scores: np.ndarray  # [N, M] float, quality in [0, 1]
    costs: np.ndarray  # [N, M] float, USD per query
    prompt_tokens: np.ndarray | None = None  # [N] int, where known
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> USD per 1M (in, out)
    responses: np.ndarray | None = None  # [N, M] object (str), each model's recorded answer, where the data has them

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.models)
        for name in ("prompt_ids", "benchmarks", "splits"):
            if len(getattr(self, name)) != n:
                raise DatasetError(f"{self.name}: {name} has {len(getattr(self, name))} rows, prompts {n}")
        for name in ("scores", "costs", "responses"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n, m):
                raise DatasetError(f"{self.name}: {name} has shape {getattr(self, name).shape}, want {(n, m)}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_costs(self) -> bool:
        """False where every model costs the same on every prompt: routing is then quality-only."""
        return bool(np.ptp(self.costs, axis=1).max() > 0) if len(self) else False

    def subset(self, rows: np.ndarray) -> RoutingTable:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return replace(
            self,
            prompt_ids=self.prompt_ids[rows],
            prompts=[self.prompts[i] for i in rows],
            benchmarks=self.benchmarks[rows],
            splits=self.splits[rows],
            scores=self.scores[rows],
            costs=self.costs[rows],
            prompt_tokens=None if self.prompt_tokens is None else self.prompt_tokens[rows],
            responses=None if self.responses is None else self.responses[rows],
        )


def _open_text(path: Path):
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (set FINEROUTER_DATA_DIR to the routing datasets' folder)")
    return gzip.open(path, "rt", newline="", encoding="utf-8") if path.suffix == ".gz" else open(path, newline="", encoding="utf-8")


@contextmanager
def _parsing(path: Path):
    """Turn a malformed file's KeyError/ValueError into a DatasetError that names the file."""
    try:
        yield
    except DatasetError:
        raise
    except KeyError as error:
        raise DatasetError(f"{path}: missing field {error}") from None
    except (ValueError, TypeError, IndexError, SyntaxError, OSError, csv.Error) as error:
        raise DatasetError(f"{path}: malformed value ({error})") from None


def _read_csv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    with _open_text(path) as handle, _parsing(path):
        return list(csv.DictReader(handle))


def _read_json(path: Path):
    with _open_text(path) as handle, _parsing(path):
        return json.load(handle)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{path}: row {number}: not valid JSON ({error.msg})") from None
    return rows


def _priced_costs(prompt_tokens: np.ndarray, output_tokens: np.ndarray, prices: list[tuple[float, float]]) -> np.ndarray:
    """USD per query: price_in x prompt tokens + price_out x output tokens, prices per 1M tokens."""
    price_in = np.array([p[0] for p in prices])
    price_out = np.array([p[1] for p in prices])
    return (prompt_tokens[:, None] * price_in[None, :] + output_tokens * price_out[None, :]) / 1e6


def drop_train_overlaps(table: RoutingTable) -> RoutingTable:
    """Remove train rows whose prompt text also occurs in a test or ood row, so no test prompt is trained on."""
    held_out = {p for p, s in zip(table.prompts, table.splits) if s != "train"}
    keep = np.array([s != "train" or p not in held_out for p, s in zip(table.prompts, table.splits)])
    return table.subset(keep)


def _build(name, models, ids, prompts, benchmarks, splits, scores, embedder, costs=None, prices=None, output_tokens=None, responses=None):
    """Assemble a table; prompt tokens are counted with the embedder's tokenizer, as serving counts them, and
    where `costs` is None they are priced from those counts."""
    scores = np.asarray(scores, dtype=np.float64)
    tokens = count_tokens(prompts, embedder)
    if costs is None:
        out = np.full(scores.shape, DEFAULT_OUTPUT_TOKENS, dtype=np.float64) if output_tokens is None else output_tokens
        costs = _priced_costs(tokens, out, [prices[m] for m in models])
    table = RoutingTable(
        name=name,
        models=list(models),
        prompt_ids=np.asarray(ids, dtype=object),
        prompts=list(prompts),
        benchmarks=np.asarray(benchmarks, dtype=object),
        splits=np.asarray(splits, dtype=object),
        scores=scores,
        costs=np.asarray(costs, dtype=np.float64),
        prompt_tokens=tokens,
        prices=dict(prices or {}),
        responses=None if responses is None else _object_array(responses),
    )
    return drop_train_overlaps(table)


def _object_array(rows: list[list[str]]) -> np.ndarray:
    """[N, M] object array of strings (np.asarray would make a fixed-width unicode array)."""
    array = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        array[i, :] = row
    return array


def load_llmrouter(root: Path, embedder: str) -> RoutingTable:
    """LLMRouter's DCRouter data: 14 tasks, 9 NIM models, list prices, no token counts (256 output tokens assumed)."""
    folder = root / "llmrouter_9model"
    path, prices_path = folder / "llmrouter_dcrouter_merged.jsonl.gz", folder / "raw" / "default_llm.json"
    rows, llms = _read_jsonl(path), _read_json(prices_path)
    with _parsing(path):
        models = list(rows[0]["scores"])
        columns = dict(
            ids=[f"{r['split']}-{i}" for i, r in enumerate(rows)],
            prompts=[r["query"] for r in rows],
            benchmarks=[r["task_name"] for r in rows],
            splits=[r["split"] for r in rows],
            scores=[[float(r["scores"][m]) for m in models] for r in rows],
        )
    with _parsing(prices_path):
        prices = {m: (float(llms[m]["input_price"]), float(llms[m]["output_price"])) for m in models}
    return _build("llmrouter_9model", models, **columns, embedder=embedder, prices=prices)


def routerbench_question(prompt_field: str) -> str:
    """The question a user would ask: RouterBench's ARC and Winogrande prompts carry a few-shot context of
    solved examples separated by blank lines, and only the final block is the question itself."""
    parts = ast.literal_eval(prompt_field)
    text = "\n".join(parts) if isinstance(parts, list) else str(parts)
    return text.strip().split("\n\n")[-1].strip()


def routerbench_response(field: str) -> str:
    """A recorded answer: RouterBench stores each response as the string form of a list of parts."""
    parts = ast.literal_eval(field)
    return "".join(parts) if isinstance(parts, list) else str(parts)


def _routerbench_responses(folder: Path, rows: list[dict[str, str]], models: list[str]) -> list[list[str]] | None:
    """Each compact row's responses from `raw/`, matched by (split, sample_id) and, for the few ids that occur
    twice in one split, by the order of occurrence (the compact file is the raw files concatenated). None
    where `raw/` is absent: the table then routes without answers."""
    raw_files = sorted((folder / "raw").glob("*.csv.gz"))
    if not raw_files:
        return None
    by_key: dict[tuple[str, str], list[list[str]]] = {}
    for path in raw_files:
        split = path.name.removesuffix(".csv.gz").rsplit("_", 1)[1]
        with _parsing(path):
            for raw in _read_csv(path):
                raw_answers = [routerbench_response(raw[f"{m}|model_response"]) for m in models]
                by_key.setdefault((split, raw["sample_id"]), []).append(raw_answers)
    seen: dict[tuple[str, str], int] = {}
    responses = []
    for row in rows:
        key = (row["split"], row["sample_id"])
        occurrence = seen[key] = seen.get(key, -1) + 1
        matches = by_key.get(key, [])
        if occurrence >= len(matches):
            raise DatasetError(f"{folder / 'raw'}: no recorded responses for {key[1]} ({key[0]})")
        responses.append(matches[occurrence])
    return responses


def load_routerbench(root: Path, embedder: str) -> RoutingTable:
    """RouterBench 0-shot subset (ARC-C, MBPP, Winogrande), 11 models, real USD cost per query, and each
    model's recorded answer (from `raw/`)."""
    folder = root / "routerbench_partial"
    path = folder / "routerbench_partial_compact.csv.gz"
    rows = _read_csv(path)
    with _parsing(path):
        models = [c for c in rows[0] if "|" not in c and c not in {"split", "sample_id", "eval_name", "prompt", "oracle_model_to_route_to"}]
    matched = _routerbench_responses(folder, rows, models)
    with _parsing(path):
        kept = [i for i, r in enumerate(rows) if all(r[m].strip() for m in models)]
        rows, responses = [rows[i] for i in kept], None if matched is None else [matched[i] for i in kept]
        columns = dict(
            ids=[r["sample_id"] for r in rows],
            prompts=[routerbench_question(r["prompt"]) for r in rows],
            benchmarks=[r["eval_name"] for r in rows],
            splits=[r["split"] for r in rows],
            scores=[[float(r[m]) for m in models] for r in rows],
            costs=[[float(r[f"{m}|total_cost"]) for m in models] for r in rows],
        )
    return _build("routerbench_partial", models, **columns, embedder=embedder, responses=responses)


_ROUTERDC_FILE = re.compile(r"^(?P<bench>.+?)(?:[_-](?P<split>train|test))?\.json\.gz$")


# RouterDC's own benchmarks (its paper's in-distribution and out-of-distribution sets); the folder also holds
# ARC-Easy and JavaScript, which its evaluation does not use.
ROUTERDC_BENCHMARKS = {"mmlu", "gsm8k", "cmmlu", "arc_challenge", "humaneval", "MATH_prealgebra", "ceval", "mbpp"}
# Multiple-choice sets score the probability of the right option when the top choice is right, else 0:
# RouterDC counts a score > 0 as correct, and so does this loader.
ROUTERDC_MULTIPLE_CHOICE = {"mmlu", "cmmlu", "arc_challenge", "ceval"}


def load_routerdc(root: Path, embedder: str) -> RoutingTable:
    """RouterDC's 7 same-size models: in-distribution train/test files plus test-only ood files, scored as
    RouterDC scores them (multiple choice: correct or not; generative: the fraction of samples correct); no
    costs, so every model is priced alike (quality-only routing)."""
    ids, prompts, benchmarks, splits, scores = [], [], [], [], []
    models: list[str] = []
    for path in sorted((root / "routerdc_7model" / "raw").glob("*.json.gz")):
        match = _ROUTERDC_FILE.match(path.name)
        bench, split = match["bench"], match["split"] or "ood"
        if bench not in ROUTERDC_BENCHMARKS:
            continue
        with _parsing(path):
            for i, row in enumerate(_read_json(path)):
                models = models or list(row["scores"])
                row_scores = [float(row["scores"][m]) for m in models]
                scores.append([float(s > 0) for s in row_scores] if bench in ROUTERDC_MULTIPLE_CHOICE else row_scores)
                prompts.append(row["question"])
                ids.append(f"{bench}-{split}-{i}")
                benchmarks.append(bench)
                splits.append(split)
    if not models:
        raise DatasetError(f"{root / 'routerdc_7model' / 'raw'}: no *.json.gz score files")
    prices = {m: (FLAT_PRICE_PER_MTOK, FLAT_PRICE_PER_MTOK) for m in models}
    return _build("routerdc_7model", models, ids, prompts, benchmarks, splits, scores, embedder, prices=prices)


# AlpacaEval has no costs. Historical list prices (USD per 1M input/output tokens) of the API models from its
# SOURCE.md and the providers' archived price pages; open models are priced by parameter count below.
ALPACAEVAL_API_PRICES = {
    "gpt4_1106_preview": (10.0, 30.0),
    "gpt4_0613_concise": (30.0, 60.0),
    "gpt-3.5-turbo-0301": (1.5, 2.0),
    "gpt-3.5-turbo-1106": (1.0, 2.0),
    "gpt-3.5-turbo-1106_concise": (1.0, 2.0),
    "gpt-3.5-turbo-1106_verbose": (1.0, 2.0),
    "gpt35_turbo_instruct": (1.5, 2.0),
    "text_davinci_001": (20.0, 20.0),
    "text_davinci_003": (20.0, 20.0),
    "claude": (8.0, 24.0),
    "claude-2": (8.0, 24.0),
    "claude-2.1": (8.0, 24.0),
    "claude-2.1_concise": (8.0, 24.0),
    "claude-instant-1.2": (0.8, 2.4),
    "jina-chat": (1.0, 2.0),
}
ALPACAEVAL_ATTACKS = {"NullModel", "gpt4_gamed"}
_PARAMS = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)b\b", re.IGNORECASE)


def open_model_price(name: str) -> tuple[float, float]:
    """A hosted-inference price tier by parameter count (USD per 1M tokens); 7B when the name gives none."""
    match = _PARAMS.search(name.replace("_", "-"))
    billions = (float(match[1] or 1) * float(match[2])) if match else (2.7 if "phi-2" in name else 7.0)
    for limit, price in ((4, 0.1), (9, 0.2), (16, 0.3), (41, 0.8), (80, 0.9)):
        if billions <= limit:
            return (price, price)
    return (1.2, 1.2)


def load_alpacaeval(root: Path, embedder: str) -> RoutingTable:
    """AlpacaEval 2.0 win probabilities against GPT-4-Turbo, 56 models (the two judge attacks excluded);
    output tokens are the answer's characters / 4. Open-ended chat: a held-out stress set, all "test"."""
    path = root / "alpacaeval2_58model" / "alpacaeval2_winrate_matrix.csv.gz"
    rows = _read_csv(path)
    with _parsing(path):
        models = [c for c in list(rows[0])[3:] if "|" not in c and c not in ALPACAEVAL_ATTACKS]
        rows = [r for r in rows if all(r[m].strip() for m in models)]
        output_tokens = np.array([[float(r[f"{m}|output_chars"] or 0) / 4 for m in models] for r in rows])
        columns = dict(
            ids=[f"alpacaeval-{i}" for i in range(len(rows))],
            prompts=[r["instruction"] for r in rows],
            benchmarks=[r["source_dataset"] for r in rows],
            splits=["test"] * len(rows),
            scores=[[float(r[m]) for m in models] for r in rows],
        )
    prices = {m: ALPACAEVAL_API_PRICES.get(m) or open_model_price(m) for m in models}
    return _build("alpacaeval2_58model", models, **columns, embedder=embedder, prices=prices, output_tokens=output_tokens)


BUILTIN_DATASETS: dict[str, Callable[[Path], RoutingTable]] = {
    "llmrouter_9model": load_llmrouter,
    "routerbench_partial": load_routerbench,
    "routerdc_7model": load_routerdc,
    "alpacaeval2_58model": load_alpacaeval,
}


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
        records = _read_jsonl(path)
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
    return _build(path.stem, models, ids, prompts, benchmarks, splits, scores, embedder, costs=costs,
                  responses=responses if with_responses else None)


def load_dataset(name_or_path: str, root: Path | None = None, embedder: str = DEFAULT_EMBEDDER) -> RoutingTable:
    """A built-in dataset by name (read from the data directory) or a user's JSONL/Parquet file by path; prompt
    tokens are counted with `embedder`'s tokenizer, the one the router will serve with."""
    if name_or_path in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name_or_path](Path(root) if root else data_dir(), embedder)
    if Path(name_or_path).suffix in (".jsonl", ".parquet", ".gz", ".json"):
        return load_user_dataset(name_or_path, embedder)
    raise DatasetError(f"unknown dataset {name_or_path!r}: use one of {sorted(BUILTIN_DATASETS)} or a .jsonl/.parquet path")
