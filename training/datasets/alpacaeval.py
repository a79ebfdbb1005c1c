"""AlpacaEval 2.0's win-rate matrix (`alpacaeval2_58model`), priced from historical list prices."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from training.datasets.files import parsing, read_csv
from training.datasets.table import RoutingTable, build_table

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
    rows = read_csv(path)
    with parsing(path):
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
    return build_table("alpacaeval2_58model", models, **columns, embedder=embedder, prices=prices, output_tokens=output_tokens)
