"""RouterDC's 7 same-size models (`routerdc_7model`), scored as RouterDC scores them."""

from __future__ import annotations

import re
from pathlib import Path

from training.datasets.files import parsing, read_json
from training.datasets.table import DatasetError, RoutingTable, build_table

# A price for models of equal size where the data has none (routerdc_7model): quality-only routing.
FLAT_PRICE_PER_MTOK = 0.2

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
        with parsing(path):
            for i, row in enumerate(read_json(path)):
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
    return build_table("routerdc_7model", models, ids, prompts, benchmarks, splits, scores, embedder, prices=prices)
