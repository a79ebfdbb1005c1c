"""Which post-hoc features earn their place, measured on validation, never on test: for each seed, hold out a
slice of the training split, build `cascade` on the rest (FineRouter and the post-hoc estimator, which splits
again for its own fit and calibration) with every feature group, and with each group left out, and score the
held-out slice: the cascade's AIQ (beside route-only FineRouter's), and the log loss of the post-hoc estimates (each answer judged against a
random set of the others). Differences are paired by seed, as in `levers.py`.

    python benchmarks/posthoc_features.py --dataset routerbench_partial --seeds 3
"""

from __future__ import annotations

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve.core.answer_facts import AnswerFacts, agreement
from serve.core.posthoc import FEATURE_GROUPS
from training.answers import embed_answers
from training.datasets import load_dataset
from training.embed import embed_texts
from training.metrics import curve_aiq
from training.routers.base import ArtifactRouter, TrainingSet, validation_score
from training.routers.cascade import DEFAULT_GROUPS, CascadeRouter
from training.routers.finerouter import evaluation_fit
from training.splits import training_rows


def log_loss(policy: CascadeRouter, held_out: TrainingSet, seed: int) -> float:
    scores = held_out.table.scores
    seen = np.random.default_rng(seed).random(scores.shape) < 0.3
    ex_ante = policy.predict_quality(held_out.embeddings, held_out.table.prompts)
    estimate = np.clip(policy.estimator.estimate(ex_ante, held_out.answers, agreement(held_out.answers), seen), 1e-6, 1 - 1e-6)
    return float(-(scores * np.log(estimate) + (1 - scores) * np.log(1 - estimate)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="routerbench_partial")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    table = load_dataset(args.dataset)
    if table.responses is None:
        raise SystemExit(f"{args.dataset} has no recorded answers")
    rows = training_rows(table)
    answers = AnswerFacts.of(table.responses, embed_answers(table.responses)).subset(rows)
    data = TrainingSet(table.subset(rows), embed_texts(table.prompts)[rows], answers)
    variants = {"all": FEATURE_GROUPS, **{f"no_{g}": tuple(x for x in FEATURE_GROUPS if x != g) for g in FEATURE_GROUPS},
                "kept": DEFAULT_GROUPS}
    results = {name: ([], []) for name in variants}
    routed = []
    for seed in range(args.seeds):
        development, held_out = data.validation_split(seed + 1000)
        routed.append(validation_score(ArtifactRouter(evaluation_fit(development, seed)), development, held_out))
        for name, groups in variants.items():
            policy = CascadeRouter(development, seed, groups)  # FineRouter is fitted once per seed and shared
            results[name][0].append(curve_aiq(policy.curve(development, held_out), held_out.table.costs))
            results[name][1].append(log_loss(policy, held_out, seed))
            print(f"seed {seed} {name}: AIQ {results[name][0][-1]:.4f}, log loss {results[name][1][-1]:.4f}", flush=True)
    print(f"| features ({args.dataset}, held-out slice of train) | cascade AIQ, mean ± std over {args.seeds} seeds "
          "| paired AIQ difference from all | post-hoc log loss | paired log-loss difference from all |")
    print("|---|---|---|---|---|")
    print(f"| route only (FineRouter) | {np.mean(routed):.4f} ± {np.std(routed):.4f} | | | |")
    base_aiq, base_loss = (np.array(v) for v in results["all"])
    for name, (aiqs, losses) in results.items():
        aiqs, losses = np.array(aiqs), np.array(losses)
        print(f"| {name} | {aiqs.mean():.4f} ± {aiqs.std():.4f} | {(aiqs - base_aiq).mean():+.4f} ± {(aiqs - base_aiq).std():.4f} "
              f"| {losses.mean():.4f} | {(losses - base_loss).mean():+.4f} ± {(losses - base_loss).std():.4f} |")


if __name__ == "__main__":
    main()
