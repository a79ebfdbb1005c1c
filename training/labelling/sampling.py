"""Which prompts to label: uniform, or stratified over a trained router's latent tasks (Stage 1's tasks are the
sampling frame), and k per task for onboarding a model. Seeded, NumPy only; each returns sorted row indices."""

from __future__ import annotations

import numpy as np


def uniform_sample(rows: int, budget: int, seed: int = 0) -> np.ndarray:
    """`budget` of `rows` rows (all of them where the budget is larger), uniformly without replacement."""
    return np.sort(np.random.default_rng(seed).choice(rows, min(budget, rows), replace=False))


def latent_tasks(artifact, embeddings: np.ndarray, prompts: list[str]) -> np.ndarray:
    """[N] each prompt's most probable latent task under `artifact` (a `RouterArtifact`)."""
    return artifact.task_probabilities(artifact.inputs(embeddings, prompts)).argmax(axis=1)


def task_quotas(counts: np.ndarray, budget: int, floor: int) -> np.ndarray:
    """Labels per task: in proportion to each task's traffic (`counts`), at least `floor` (or all its rows where it
    has fewer), never more than it has, `budget` in all (less only where there are fewer rows)."""
    counts = np.asarray(counts, dtype=np.int64)
    budget = min(budget, int(counts.sum()))
    quotas = np.minimum(counts, floor)
    while quotas.sum() > budget:  # floors alone overrun the budget: trim the largest quotas first
        quotas[np.argmax(quotas)] -= 1
    spare = budget - quotas.sum()
    while spare > 0:
        room = counts - quotas
        share = np.where(room > 0, counts, 0).astype(float)
        wanted = np.minimum(room, np.floor(spare * share / share.sum()).astype(np.int64))
        if wanted.sum() == 0:  # hand what rounding left to the busiest tasks with room, one each
            wanted = np.zeros_like(quotas)
            wanted[np.argsort(-share, kind="stable")[:spare]] = 1
            wanted = np.minimum(wanted, room)
        quotas += wanted
        spare = budget - quotas.sum()
    return quotas


def stratified_sample(tasks: np.ndarray, budget: int, floor: int = 1, seed: int = 0) -> np.ndarray:
    """`budget` rows drawn task by task, each task's share given by `task_quotas`."""
    tasks = np.asarray(tasks)
    labels, counts = np.unique(tasks, return_counts=True)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(tasks == label), quota, replace=False)
              for label, quota in zip(labels, task_quotas(counts, budget, floor))]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def sample_per_task(tasks: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """`k` rows of every latent task (all of a task's rows where it has fewer): the prompts to label when a model
    joins a trained router."""
    tasks = np.asarray(tasks)
    counts = np.unique(tasks, return_counts=True)[1]
    return stratified_sample(tasks, int(np.minimum(counts, k).sum()), floor=k, seed=seed)
