"""LLMRouter's DCRouter data (`llmrouter_9model`), as its SOURCE.md describes it."""

from __future__ import annotations

from pathlib import Path

from training.datasets.files import parsing, read_json, read_jsonl
from training.datasets.table import RoutingTable, build_table


def load_llmrouter(root: Path, embedder: str) -> RoutingTable:
    """LLMRouter's DCRouter data: 14 tasks, 9 NIM models, list prices, no token counts (256 output tokens assumed)."""
    folder = root / "llmrouter_9model"
    path, prices_path = folder / "llmrouter_dcrouter_merged.jsonl.gz", folder / "raw" / "default_llm.json"
    rows, llms = read_jsonl(path), read_json(prices_path)
    with parsing(path):
        models = list(rows[0]["scores"])
        columns = dict(
            ids=[f"{r['split']}-{i}" for i, r in enumerate(rows)],
            prompts=[r["query"] for r in rows],
            benchmarks=[r["task_name"] for r in rows],
            splits=[r["split"] for r in rows],
            scores=[[float(r["scores"][m]) for m in models] for r in rows],
        )
    with parsing(prices_path):
        prices = {m: (float(llms[m]["input_price"]), float(llms[m]["output_price"])) for m in models}
    return build_table("llmrouter_9model", models, **columns, embedder=embedder, prices=prices)
