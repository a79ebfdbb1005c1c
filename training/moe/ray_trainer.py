"""Training the networks with Ray Train's TorchTrainer on Ray Data datasets: data-parallel workers, a checkpoint
every few epochs, and a failed worker's group resumed from the latest one."""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from training.moe.networks import NetworkConfig
from training.moe.two_phase import train_networks


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
