"""How the training jobs size their Ray tasks and actors by the cluster's CPUs (one place for the arithmetic)."""

from __future__ import annotations


def largest_node_cpus() -> int:
    """The CPUs of the cluster's largest live node: the most one task or actor can ask for and still be placed."""
    import ray

    return max(1, int(max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])))


def cpus_per_actor(num_actors: int) -> int:
    """Share the CPUs free now among `num_actors` actors, at most one node's worth each, so that every actor fits
    beside what already holds CPUs (a Serve app on the same cluster: the labelling job embeds there).

    Ray sets OMP_NUM_THREADS to an actor's CPU count, so this is also how many threads torch uses there.
    """
    import ray

    return max(1, int(min(largest_node_cpus(), ray.available_resources().get("CPU", 1) / num_actors)))


def use_assigned_cpus() -> None:
    """Give faiss's OpenMP threads the CPUs Ray assigned to this task or actor: Ray starts its workers with one
    OpenMP thread, which would leave a multi-CPU graph build on one core."""
    import faiss
    import ray

    faiss.omp_set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def whole_node_task(function, memory: int):
    """`function` as a Ray task that takes the largest node's CPUs (and one GPU where the cluster has any), with
    `memory` bytes reserved: a job that wants one node to itself, such as the kNN graph or Leiden."""
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return ray.remote(num_cpus=largest_node_cpus(), num_gpus=gpus, memory=memory)(function)
