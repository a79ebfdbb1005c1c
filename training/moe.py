"""Stage 2 and the task classifier as torch networks, and the training loop Ray Train runs on each worker.

The networks mirror `serve.artifact.RouterArtifact.predict` exactly; `export_weights` writes their
parameters under the artifact's array names, so serving needs NumPy only.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

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


@contextmanager
def single_threaded():
    """Small networks train fastest on one thread: with two on a busy 2-core machine, torch's threads wait
    on each other and an epoch runs ~30x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(rows: int, batch_size: int, generator: torch.Generator):
    return torch.randperm(rows, generator=generator).split(batch_size)


def _snapshot(*modules: nn.Module) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _restore(modules, states) -> None:
    for module, state in zip(modules, states):
        module.load_state_dict(state)


@single_threaded()
def train_networks(data: dict, config: NetworkConfig, prepare=lambda model: model, shard=lambda n: np.arange(n)) -> dict:
    """Fit the classifier and the MoE (two phases) on `data` = {inputs [N, D], scores [N, M], tasks [N],
    candidates [T, M], and optionally validation_inputs / validation_scores}. With validation data and
    `early_stopping`, each phase keeps its epoch of lowest validation quality loss. `prepare` and `shard` let Ray Train
    wrap the models for data-parallel workers; the defaults train in-process. Returns the models' state
    dicts and the loss history."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rows = shard(len(data["inputs"]))
    x = torch.as_tensor(data["inputs"][rows], dtype=torch.float32)
    y = torch.as_tensor(data["scores"][rows], dtype=torch.float32)
    t = torch.as_tensor(data["tasks"][rows], dtype=torch.long)
    has_validation = "validation_inputs" in data
    if has_validation:
        xv = torch.as_tensor(data["validation_inputs"], dtype=torch.float32)
        yv = torch.as_tensor(data["validation_scores"], dtype=torch.float32)
    candidates = torch.as_tensor(data["candidates"])
    classifier = prepare(TaskClassifier(x.shape[1], config.classifier_hidden, candidates.shape[0], config.dropout))
    moe = prepare(MixtureOfExperts(x.shape[1], config.hidden, y.shape[1], candidates, config.dropout))
    plain_moe = getattr(moe, "module", moe)
    plain_classifier = getattr(classifier, "module", classifier)

    def validation_loss(with_tasks: bool) -> float:
        plain_moe.eval()
        plain_classifier.eval()
        with torch.no_grad():
            gate = torch.softmax(plain_classifier(xv), dim=1) if with_tasks else None
            return quality_loss(plain_moe(xv, gate), yv).item()

    shared = [*plain_moe.trunk.parameters(), *plain_moe.general.parameters(), *classifier.parameters()]
    optimiser = torch.optim.AdamW(shared, lr=config.learning_rate, weight_decay=config.weight_decay)
    history = {"phase1_loss": [], "classifier_loss": [], "phase2_loss": [], "phase1_validation": [], "phase2_validation": []}
    best = (float("inf"), None)
    for _ in range(config.epochs):
        moe.train()
        classifier.train()
        quality_total = task_total = 0.0
        for batch in _batches(len(x), config.batch_size, generator):
            optimiser.zero_grad()
            quality = quality_loss(moe(x[batch]), y[batch])
            task = nn.functional.cross_entropy(classifier(x[batch]), t[batch])
            (quality + task).backward()
            optimiser.step()
            quality_total += quality.item() * len(batch)
            task_total += task.item() * len(batch)
        history["phase1_loss"].append(quality_total / len(x))
        history["classifier_loss"].append(task_total / len(x))
        if has_validation:
            history["phase1_validation"].append(validation_loss(with_tasks=False))
            if config.early_stopping and history["phase1_validation"][-1] < best[0]:
                best = (history["phase1_validation"][-1], _snapshot(plain_moe, plain_classifier))
    if best[1] is not None:
        _restore((plain_moe, plain_classifier), best[1])

    # Phase 2: only the task heads learn, on top of the frozen trunk, general heads and classifier.
    classifier.eval()
    plain_moe.trunk.eval()
    with torch.no_grad():
        gate = torch.softmax(classifier(x), dim=1)
    optimiser = torch.optim.AdamW([plain_moe.task_w, plain_moe.task_b], lr=config.learning_rate, weight_decay=config.weight_decay)
    best = (validation_loss(with_tasks=True), _snapshot(plain_moe)) if has_validation and config.early_stopping else (float("inf"), None)
    for _ in range(config.task_epochs):
        total = 0.0
        for batch in _batches(len(x), config.batch_size, generator):
            optimiser.zero_grad()
            loss = quality_loss(moe(x[batch], gate[batch]), y[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        history["phase2_loss"].append(total / len(x))
        if has_validation:
            history["phase2_validation"].append(validation_loss(with_tasks=True))
            if config.early_stopping and history["phase2_validation"][-1] < best[0]:
                best = (history["phase2_validation"][-1], _snapshot(plain_moe))
    if best[1] is not None:
        _restore((plain_moe,), best[1])
    return {
        "classifier": {k: v.detach().cpu() for k, v in plain_classifier.state_dict().items()},
        "moe": {k: v.detach().cpu() for k, v in plain_moe.state_dict().items()},
        "history": history,
    }


def _ray_train_loop(loop_config: dict) -> None:
    """Runs on each Ray Train worker: data-parallel training, then a checkpoint from rank 0."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    result = train_networks(
        loop_config["data"],
        NetworkConfig(**loop_config["network"]),
        # Task heads sit unused in phase 1, so DDP must tolerate unused parameters.
        prepare=lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if workers > 1 else model,
        # Equal shards: every worker must run the same number of batches for DDP's all-reduce.
        shard=lambda n: np.arange(n - n % workers)[rank::workers],
    )
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save(result, Path(folder) / "networks.pt")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"phase1_loss": result["history"]["phase1_loss"][-1], "phase2_loss": result["history"]["phase2_loss"][-1]}, checkpoint=checkpoint)


def train_with_ray(data: dict, config: NetworkConfig, *, num_workers: int = 1, use_gpu: bool = False) -> dict:
    """Fit with Ray Train's TorchTrainer (ScalingConfig from arguments) and return the checkpointed result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"data": data, "network": asdict(config)},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(storage_path=str(Path(tempfile.gettempdir()) / "finerouter-train"), name=f"finerouter-seed{config.seed}"),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "networks.pt", weights_only=False)


def export_weights(networks: dict) -> dict[str, np.ndarray]:
    """The artifact's arrays (serve.artifact.WEIGHT_ARRAYS) from the trained state dicts."""
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
