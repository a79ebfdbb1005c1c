"""RouterBench's 0-shot subset (`routerbench_partial`) with each model's recorded answer, as its SOURCE.md
describes it."""

from __future__ import annotations

import ast
from pathlib import Path

from training.datasets.files import parsing, read_csv
from training.datasets.table import DatasetError, RoutingTable, build_table


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
        with parsing(path):
            for raw in read_csv(path):
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
    rows = read_csv(path)
    with parsing(path):
        models = [c for c in rows[0] if "|" not in c and c not in {"split", "sample_id", "eval_name", "prompt", "oracle_model_to_route_to"}]
    matched = _routerbench_responses(folder, rows, models)
    with parsing(path):
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
    return build_table("routerbench_partial", models, **columns, embedder=embedder, responses=responses)
