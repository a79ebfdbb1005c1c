"""Measure FineRouter's levers on validation, never on test: for each seed, fit on the training split's
fit part and score the validation slice (AIQ; routed quality where costs are flat).

    python benchmarks/levers.py --dataset llmrouter_9model --seeds 3
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training.datasets import load_dataset
from training.embed import embed_texts
from training.fit import FitConfig, fit_router
from training.moe import NetworkConfig
from training.protocols import folds
from training.routers import TrainingSet

BASE = FitConfig(trainer="local")
LEVERS = {
    "default": BASE,
    "no_prompt_features": replace(BASE, prompt_features=False),
    "pairwise_loss": replace(BASE, network=NetworkConfig(pairwise_weight=0.5)),
    "per_task_blend": replace(BASE, per_task_blend=True),
    "semantic_graph": replace(BASE, mixes=(0.0,)),
    "performance_graph": replace(BASE, mixes=(0.5, 0.8)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="llmrouter_9model")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS))
    args = parser.parse_args()
    table = load_dataset(args.dataset)
    embeddings = embed_texts(table.prompts)
    rows = folds(table, "standard")[0].train
    data = TrainingSet(table.subset(rows), embeddings[rows])
    print(f"| lever ({args.dataset}, validation slice of train) | validation score, mean ± std over {args.seeds} seeds | blend chosen |")
    print("|---|---|---|")
    for name in args.levers:
        scores, blends = [], []
        for seed in range(args.seeds):
            artifact = fit_router(data, replace(LEVERS[name], seed=seed), log=lambda message: None)
            scores.append(artifact.manifest["validation"]["score"])
            blends.append(sorted(set(np.round(artifact.weights["blend"], 2).tolist())))
        print(f"| {name} | {np.mean(scores):.4f} ± {np.std(scores):.4f} | {blends} |", flush=True)


if __name__ == "__main__":
    main()
