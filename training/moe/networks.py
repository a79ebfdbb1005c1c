"""Stage 2 and the task classifier as torch networks. They mirror `serve.core.artifact.RouterArtifact.predict`
exactly; `export_weights` writes their parameters under the artifact's array names, so serving needs NumPy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class NetworkConfig:
    hidden: int = 256
    classifier_hidden: int = 128
    epochs: int = 30  # phase 1: trunk + general heads (and the classifier)
    task_epochs: int = 15  # phase 2: task heads, shared part frozen
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    early_stopping: bool = True  # each phase keeps its epoch of lowest validation loss (a lever: benchmarks/levers.py)
    seed: int = 0


class TaskClassifier(nn.Module):
    def __init__(self, inputs: int, hidden: int, tasks: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, tasks))

    def forward(self, x):
        return self.layers(x)


class MixtureOfExperts(nn.Module):
    """Shared trunk, general heads for every model, task heads gated by p(task | prompt) on each task's
    candidate models. Outputs one quality logit per model."""

    def __init__(self, inputs: int, hidden: int, models: int, candidates: torch.Tensor, dropout: float):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.general = nn.Linear(hidden, models)
        tasks = candidates.shape[0]
        self.task_w = nn.Parameter(torch.zeros(tasks, hidden, models))
        self.task_b = nn.Parameter(torch.zeros(tasks, models))
        self.register_buffer("candidates", candidates.float())

    def forward(self, x, task_probabilities=None):
        hidden = self.trunk(x)
        logits = self.general(hidden)
        if task_probabilities is None:
            return logits
        task_logits = torch.einsum("nh,thm->ntm", hidden, self.task_w) + self.task_b
        return logits + torch.einsum("nt,ntm->nm", task_probabilities, task_logits * self.candidates)


def quality_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """BCE on soft scores: fits 0/1 and fractional scores alike."""
    return nn.functional.binary_cross_entropy_with_logits(logits, scores)


def export_weights(networks: dict) -> dict[str, np.ndarray]:
    """The artifact's arrays (serve.core.artifact.WEIGHT_ARRAYS) from the trained state dicts."""
    c, m = networks["classifier"], networks["moe"]

    def array(tensor):
        return tensor.numpy().astype(np.float32)

    return {
        "classifier_w1": array(c["layers.0.weight"].T),
        "classifier_b1": array(c["layers.0.bias"]),
        "classifier_w2": array(c["layers.3.weight"].T),
        "classifier_b2": array(c["layers.3.bias"]),
        "trunk_w": array(m["trunk.0.weight"].T),
        "trunk_b": array(m["trunk.0.bias"]),
        "general_w": array(m["general.weight"].T),
        "general_b": array(m["general.bias"]),
        "task_w": array(m["task_w"]),
        "task_b": array(m["task_b"]),
        "candidates": array(m["candidates"]),
    }
