"""The two-phase training of the classifier and the MoE, one epoch at a time and resumable from any epoch's
checkpoint: in-process as it is, or on each Ray Train worker (`training.moe.ray_trainer`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from training.moe.networks import (
    MixtureOfExperts,
    NetworkConfig,
    TaskClassifier,
    quality_loss,
)


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
