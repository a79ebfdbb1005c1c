"""Train/test protocols: which rows train a router and which rows judge it.

`standard` uses the dataset's own split, `cv` is 5-fold cross-validation over all prompts (one AIQ on a single
test split is too noisy to compare routers by, so headline comparisons use it; docs/evaluation.md), `lobo` holds
out one benchmark at a time, and `ood` trains on the train split and tests on the dataset's out-of-distribution
files. Duplicate prompts always land on one side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.datasets import RoutingTable

PROTOCOLS = ("standard", "cv", "lobo", "ood")
CV_FOLDS = 5
STANDARD_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Fold:
    name: str
    train: np.ndarray  # row indices
    test: np.ndarray


def _prompt_groups(table: RoutingTable) -> np.ndarray:
    """A group id per row; rows with the same prompt text share one."""
    _, group = np.unique(np.asarray(table.prompts, dtype=object), return_inverse=True)
    return group


def _held_out_groups(table: RoutingTable, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded choice of `rows` to hold out, about `fraction` of them, whole prompt groups at a time."""
    group = _prompt_groups(table)
    held = np.random.default_rng(seed).random(group.max() + 1) < fraction
    return held[group[rows]]


def training_rows(table: RoutingTable, holdout: float = 0.0, seed: int = 0) -> np.ndarray:
    """The rows a production fit trains on: every row but the dataset's own test and ood rows, less a seeded
    `holdout` fraction where one is asked for."""
    rows = np.flatnonzero(table.splits == "train")
    if not len(rows):
        rows = np.arange(len(table))  # a dataset that is all test (AlpacaEval): every row
    return rows[~_held_out_groups(table, rows, holdout, seed)] if holdout else rows


def folds(table: RoutingTable, protocol: str, seed: int = 0) -> list[Fold]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")
    splits = table.splits
    if protocol == "standard":
        train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
        if len(train) and len(test):
            return [Fold("test", train, test)]
        held = _held_out_groups(table, np.arange(len(table)), STANDARD_TEST_FRACTION, seed)  # no split of its own: 70/30
        return [Fold("test", np.flatnonzero(~held), np.flatnonzero(held))]
    if protocol == "ood":
        ood = np.flatnonzero(splits == "ood")
        if not len(ood):
            raise ValueError(f"{table.name} has no out-of-distribution rows; the ood protocol does not apply")
        return [Fold("ood", np.flatnonzero(splits == "train"), ood)]
    if protocol == "cv":
        group = _prompt_groups(table)
        fold_of_group = np.random.default_rng(seed).permutation(group.max() + 1) % CV_FOLDS
        fold_of_row = fold_of_group[group]
        return [Fold(f"fold{k}", np.flatnonzero(fold_of_row != k), np.flatnonzero(fold_of_row == k)) for k in range(CV_FOLDS)]
    benchmarks = sorted(set(table.benchmarks))
    if len(benchmarks) < 2:
        raise ValueError(f"{table.name} has one benchmark; leave-one-benchmark-out needs two or more")
    result = []
    for held_out in benchmarks:
        test = np.flatnonzero(table.benchmarks == held_out)
        test_prompts = {table.prompts[i] for i in test}
        train = np.array([i for i in np.flatnonzero(table.benchmarks != held_out) if table.prompts[i] not in test_prompts])
        result.append(Fold(held_out, train, test))
    return result
