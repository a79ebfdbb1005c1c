"""Routing datasets (prompts x models -> score, cost) loaded into one canonical table (`table.RoutingTable`).

Every built-in loader follows its dataset's SOURCE.md: rows with empty scores are dropped, train prompts that
also occur in a test split are removed from train, and cost is the per-query USD cost where the data has it,
else price x (prompt tokens + estimated output tokens) / 1e6. A user's own file is read by `user`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from serve.core.encoder import DEFAULT_EMBEDDER
from serve.core.paths import data_dir
from training.datasets.alpacaeval import load_alpacaeval
from training.datasets.llmrouter import load_llmrouter
from training.datasets.routerbench import load_routerbench, routerbench_question
from training.datasets.routerdc import load_routerdc
from training.datasets.table import DatasetError, RoutingTable
from training.datasets.user import load_user_dataset, record_layout, user_record

__all__ = ["BUILTIN_DATASETS", "DatasetError", "RoutingTable", "load_dataset", "load_user_dataset", "record_layout",
           "routerbench_question", "user_record"]

BUILTIN_DATASETS: dict[str, Callable[[Path], RoutingTable]] = {
    "llmrouter_9model": load_llmrouter,
    "routerbench_partial": load_routerbench,
    "routerdc_7model": load_routerdc,
    "alpacaeval2_58model": load_alpacaeval,
}


def load_dataset(name_or_path: str, root: Path | None = None, embedder: str = DEFAULT_EMBEDDER) -> RoutingTable:
    """A built-in dataset by name (read from the data directory) or a user's JSONL/Parquet file by path; prompt
    tokens are counted with `embedder`'s tokenizer, the one the router will serve with."""
    if name_or_path in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name_or_path](Path(root) if root else data_dir(), embedder)
    if Path(name_or_path).suffix in (".jsonl", ".parquet", ".gz", ".json"):
        return load_user_dataset(name_or_path, embedder)
    raise DatasetError(f"unknown dataset {name_or_path!r}: use one of {sorted(BUILTIN_DATASETS)} or a .jsonl/.parquet path")
