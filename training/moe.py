"""Stage 2 and the task classifier as torch networks, and the training loop Ray Train runs on each worker.

The networks mirror `serve.core.artifact.RouterArtifact.predict` exactly; `export_weights` writes their
parameters under the artifact's array names, so serving needs NumPy only.
"""

from __future__ import annotations

import tempfile
import uuid
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
    on each other and an epoch runs far slower (docs/evaluation.md, "Training speed")."""
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


class _TwoPhaseTraining:
    """The classifier and the MoE trained in two phases, one epoch at a time, with everything an epoch changes
    (weights, optimiser, random generators, best epoch so far, history) in one state that a checkpoint holds,
    so that a run resumed from any epoch's checkpoint continues exactly as the uninterrupted run would.

    Phase 1 (`config.epochs`): trunk, general heads and classifier. Phase 2 (`config.task_epochs`): the task
    heads alone, on top of the frozen rest, gated by the classifier. With validation data and early stopping
    each phase ends on its epoch of lowest validation quality loss.
    """

    def __init__(self, data: dict, config: NetworkConfig, prepare, device: str):
        torch.manual_seed(config.seed)
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.x, self.y, self.t = (torch.as_tensor(data[key], dtype=dtype).to(device) for key, dtype in
                                  (("inputs", torch.float32), ("scores", torch.float32), ("tasks", torch.long)))
        self.has_validation = "validation_inputs" in data
        if self.has_validation:
            self.xv = torch.as_tensor(data["validation_inputs"], dtype=torch.float32).to(device)
            self.yv = torch.as_tensor(data["validation_scores"], dtype=torch.float32).to(device)
        candidates = torch.as_tensor(data["candidates"])
        self.classifier = prepare(TaskClassifier(self.x.shape[1], config.classifier_hidden, candidates.shape[0], config.dropout))
        self.moe = prepare(MixtureOfExperts(self.x.shape[1], config.hidden, self.y.shape[1], candidates, config.dropout))
        self.plain_moe = getattr(self.moe, "module", self.moe)
        self.plain_classifier = getattr(self.classifier, "module", self.classifier)
        shared = [*self.plain_moe.trunk.parameters(), *self.plain_moe.general.parameters(), *self.plain_classifier.parameters()]
        self.optimiser = torch.optim.AdamW(shared, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.history = {"phase1_loss": [], "classifier_loss": [], "phase2_loss": [], "phase1_validation": [], "phase2_validation": [],
                        "resumed_at_epoch": []}
        self.best: tuple[float, list | None] = (float("inf"), None)
        self.epoch, self.gate = 0, None  # gate: set when phase 2 starts

    @property
    def epochs(self) -> int:
        return self.config.epochs + self.config.task_epochs

    def _validation_loss(self, with_tasks: bool) -> float:
        self.plain_moe.eval()
        self.plain_classifier.eval()
        with torch.no_grad():
            gate = torch.softmax(self.plain_classifier(self.xv), dim=1) if with_tasks else None
            return quality_loss(self.plain_moe(self.xv, gate), self.yv).item()

    def _keep_if_best(self, loss: float, *modules: nn.Module) -> None:
        if self.config.early_stopping and loss < self.best[0]:
            self.best = (loss, _snapshot(*modules))

    def _freeze_for_phase2(self) -> None:
        """Everything but the task heads frozen; the classifier's gate fixed; the task heads' own optimiser."""
        self.classifier.eval()
        self.plain_moe.trunk.eval()
        with torch.no_grad():
            self.gate = torch.softmax(self.classifier(self.x), dim=1)
        self.optimiser = torch.optim.AdamW([self.plain_moe.task_w, self.plain_moe.task_b], lr=self.config.learning_rate,
                                           weight_decay=self.config.weight_decay)

    def _start_phase2(self) -> None:
        if self.best[1] is not None:
            _restore((self.plain_moe, self.plain_classifier), self.best[1])  # phase 1's best epoch
        self._freeze_for_phase2()
        self.best = (float("inf"), None)
        if self.has_validation:
            self._keep_if_best(self._validation_loss(with_tasks=True), self.plain_moe)

    def train_epoch(self) -> None:
        phase1 = self.epoch < self.config.epochs
        if not phase1 and self.gate is None:
            self._start_phase2()
        if phase1:
            self.moe.train()
            self.classifier.train()
        quality_total = task_total = 0.0
        for batch in _batches(len(self.x), self.config.batch_size, self.generator):
            self.optimiser.zero_grad()
            quality = quality_loss(self.moe(self.x[batch], None if phase1 else self.gate[batch]), self.y[batch])
            loss = quality
            if phase1:
                task = nn.functional.cross_entropy(self.classifier(self.x[batch]), self.t[batch])
                loss = quality + task
                task_total += task.item() * len(batch)
            loss.backward()
            self.optimiser.step()
            quality_total += quality.item() * len(batch)
        phase = "phase1" if phase1 else "phase2"
        self.history[f"{phase}_loss"].append(quality_total / len(self.x))
        if phase1:
            self.history["classifier_loss"].append(task_total / len(self.x))
        if self.has_validation:
            self.history[f"{phase}_validation"].append(self._validation_loss(with_tasks=not phase1))
            self._keep_if_best(self.history[f"{phase}_validation"][-1],
                               *((self.plain_moe, self.plain_classifier) if phase1 else (self.plain_moe,)))
        self.epoch += 1

    def finish(self) -> dict:
        if self.gate is None:
            self._start_phase2()  # no task epochs: phase 1's best epoch is still to be restored
        if self.best[1] is not None:
            _restore((self.plain_moe,), self.best[1])
        return {
            "classifier": {k: v.detach().cpu() for k, v in self.plain_classifier.state_dict().items()},
            "moe": {k: v.detach().cpu() for k, v in self.plain_moe.state_dict().items()},
            "history": self.history,
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "moe": self.plain_moe.state_dict(), "classifier": self.plain_classifier.state_dict(),
                "optimiser": self.optimiser.state_dict(), "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "best": self.best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.plain_moe.load_state_dict(state["moe"])
        self.plain_classifier.load_state_dict(state["classifier"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        if self.epoch > self.config.epochs:  # mid phase 2: its optimiser, on the frozen phase 1 result
            self._freeze_for_phase2()
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history["resumed_at_epoch"].append(self.epoch)


@single_threaded()
def train_networks(data: dict, config: NetworkConfig, prepare=lambda model: model, *, device: str = "cpu",
                   checkpoint=None, resume: dict | None = None) -> dict:
    """Fit the classifier and the MoE (`_TwoPhaseTraining`) on `data` = {inputs [N, D], scores [N, M], tasks [N],
    candidates [T, M], and optionally validation_inputs / validation_scores}. `prepare` lets Ray Train wrap the
    models for data-parallel workers; `checkpoint(state)` is called after every epoch, and `resume` (such a
    state) continues a run from its epoch. Returns the models' state dicts and the loss history."""
    training = _TwoPhaseTraining(data, config, prepare, device)
    if resume is not None:
        training.load_state_dict(resume)
    while training.epoch < training.epochs:
        training.train_epoch()
        if checkpoint is not None:
            checkpoint(training.state_dict())
    return training.finish()


def _shard_arrays(name: str) -> dict[str, np.ndarray]:
    """This worker's shard of a Ray Train dataset, in its order, as arrays."""
    import ray.train

    batches = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="numpy"))
    return {column: np.concatenate([batch[column] for batch in batches]) for column in batches[0]}


def _ray_train_loop(loop_config: dict) -> None:
    """Runs on each Ray Train worker: its shard of the training rows (and all the validation rows) from Ray Data,
    data-parallel training with a checkpoint after every epoch, resumed from the latest one after a failure."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    train = _shard_arrays("train")
    data = {"inputs": train["inputs"], "scores": train["scores"], "tasks": train["tasks"], "candidates": loop_config["candidates"]}
    if loop_config["has_validation"]:
        validation = _shard_arrays("validation")
        data |= {"validation_inputs": validation["inputs"], "validation_scores": validation["scores"]}
    resume = None
    if (latest := ray.train.get_checkpoint()) is not None:
        with latest.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", weights_only=False)

    def report(state: dict, networks: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:  # the replicas agree after every all-reduce: one copy is the checkpoint
                torch.save(state, Path(folder) / "state.pt")
                if networks is not None:
                    torch.save(networks, Path(folder) / "networks.pt")
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"epoch": state["epoch"], "done": networks is not None}, checkpoint=checkpoint)

    latest_state: list[dict] = []  # the last epoch's state, for the final checkpoint

    def checkpoint_epoch(state: dict) -> None:
        latest_state[:] = [state]
        if state["epoch"] % loop_config["checkpoint_every"] == 0:  # the same epochs on every rank: report is collective
            report(state)

    networks = train_networks(
        data,
        NetworkConfig(**loop_config["network"]),
        # Task heads sit unused in phase 1, so DDP must tolerate unused parameters.
        prepare=lambda model: ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if workers > 1 else model,
        device=str(ray.train.torch.get_device()),
        checkpoint=checkpoint_epoch,
        resume=resume,
    )
    report(latest_state[0] if latest_state else resume, networks)


def array_dataset(columns: dict[str, np.ndarray]):
    """A Ray Dataset from in-memory arrays (rows of vectors as tensor columns)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    return ray.data.from_arrow(pa.table({name: ArrowTensorArray.from_numpy(values) if values.ndim > 1 else values
                                         for name, values in columns.items()}))


def in_memory_datasets(data: dict) -> dict:
    """`train_with_ray`'s datasets from the arrays `train_networks` takes."""
    datasets = {"train": array_dataset({"inputs": data["inputs"], "scores": data["scores"], "tasks": data["tasks"]})}
    if "validation_inputs" in data:
        datasets["validation"] = array_dataset({"inputs": data["validation_inputs"], "scores": data["validation_scores"]})
    return datasets


def train_with_ray(datasets: dict, candidates: np.ndarray, config: NetworkConfig, *, num_workers: int = 1, use_gpu: bool = False,
                   max_failures: int = 3, checkpoint_every: int = 5, placement_strategy: str = "PACK",
                   storage_path: str | None = None) -> dict:
    """Fit with Ray Train's TorchTrainer on Ray Data datasets: "train" (columns inputs, scores, tasks) split evenly
    over `num_workers` workers (equal shards, as DDP's all-reduce needs), "validation" (inputs, scores; optional)
    whole on each. A checkpoint is written every `checkpoint_every` epochs (each one costs a write to
    `storage_path`: on small data more than the epoch itself), and a failed worker restarts the group from the
    latest one, up to `max_failures` times.
    `storage_path` (checkpoints) must be reachable from every node on a cluster: a shared file system or
    object storage."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"candidates": candidates, "network": asdict(config), "has_validation": "validation" in datasets,
                           "checkpoint_every": checkpoint_every},
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            storage_path=storage_path or str(Path(tempfile.gettempdir()) / "finerouter-train"),
            name=f"finerouter-seed{config.seed}-{uuid.uuid4().hex[:8]}",
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with trainer.fit().checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "networks.pt", weights_only=False)


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
