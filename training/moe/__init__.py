"""Stage 2 (the mixture of experts) and the task classifier: the networks (`networks`), their two-phase training
loop (`two_phase`), and that loop on Ray Train (`ray_trainer`)."""

from __future__ import annotations

from training.moe.networks import NetworkConfig, export_weights
from training.moe.ray_trainer import array_dataset, in_memory_datasets, train_with_ray
from training.moe.two_phase import single_threaded, train_networks

__all__ = ["NetworkConfig", "array_dataset", "export_weights", "in_memory_datasets", "single_threaded", "train_networks",
           "train_with_ray"]
