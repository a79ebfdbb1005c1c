"""Measure FineRouter's levers on validation, never on test: for each seed, hold out a slice of the training
split, fit on the rest (which `fit_router` splits again for its own choices: graph, early stopping, blend)
and score the held-out slice (AIQ; routed quality where costs are flat). The slice that scores a
lever never chose anything, so levers that tune on validation are not flattered.

    python benchmarks/levers.py --dataset llmrouter_9model --seeds 3
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve.core.mpnet import MPNET_EMBEDDER
from training.datasets import load_dataset
from training.embed import embed_texts
from training.fit import FitConfig, fit_router
from training.moe import NetworkConfig
from training.routers.base import ArtifactRouter, TrainingSet, validation_score
from training.splits import training_rows

BASE = FitConfig(trainer="local")
LEVERS = {
    "default": BASE,
    "no_prompt_features": replace(BASE, prompt_features=False),
    "no_early_stopping": replace(BASE, network=NetworkConfig(early_stopping=False)),
    "semantic_graph": replace(BASE, mixes=(0.0,)),
    "performance_graph": replace(BASE, mixes=(0.5, 0.8)),
    "mpnet_encoder": replace(BASE, embedder=MPNET_EMBEDDER),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="llmrouter_9model")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS), help="default always runs, as the reference")
    args = parser.parse_args()
    table = load_dataset(args.dataset)
    rows = training_rows(table)
    data_by_embedder = {}
    print(f"| lever ({args.dataset}, held-out slice of train) | held-out score, mean ± std over {args.seeds} seeds "
          f"| paired difference from default, mean ± std | blend chosen |")
    print("|---|---|---|---|")
    baseline = None
    for name in ["default", *(lever for lever in args.levers if lever != "default")]:
        config = LEVERS[name]
        if config.embedder not in data_by_embedder:
            embeddings = embed_texts(table.prompts, config.embedder, use_ray=False)
            data_by_embedder[config.embedder] = TrainingSet(table.subset(rows), embeddings[rows])
        data = data_by_embedder[config.embedder]
        scores, blends = [], []
        for seed in range(args.seeds):
            development, held_out = data.validation_split(seed + 1000)
            artifact = fit_router(development, replace(config, seed=seed), log=lambda message: None)
            scores.append(validation_score(ArtifactRouter(artifact), development, held_out))
            blends.append(round(float(artifact.weights["blend"]), 2))
        scores = np.array(scores)
        baseline = scores if baseline is None else baseline
        difference = scores - baseline
        print(f"| {name} | {scores.mean():.4f} ± {scores.std():.4f} | {difference.mean():+.4f} ± {difference.std():.4f} | {blends} |", flush=True)


if __name__ == "__main__":
    main()
