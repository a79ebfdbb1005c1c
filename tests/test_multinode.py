"""Multi-node behaviour on one machine: a `ray.cluster_utils.Cluster` of three raylets, one CPU each, so that
work must spread over nodes, and nodes and workers can be taken away mid-job."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import stage2_data, start_local_ray, synthetic_routing_set

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, workers
    finally:  # the session's Ray comes back even when the cluster failed to start
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            start_local_ray()


def _live_actors(class_name: str) -> list[dict]:
    """(pid, node id) of the live actors whose class name contains `class_name`, from the GCS actor table (the
    state API would need the dashboard)."""
    from ray._private.state import state

    return [{"pid": actor["Pid"], "node": actor["Address"]["NodeID"]} for actor in state.actor_table(None).values()
            if actor["State"] == "ALIVE" and class_name in actor["ActorClassName"]]


def test_ray_train_on_two_nodes_resumes_from_its_checkpoint_after_a_worker_is_killed(cluster, tmp_path):
    from training.moe import NetworkConfig, in_memory_datasets, train_with_ray

    inputs = stage2_data(synthetic_routing_set())
    config = NetworkConfig(epochs=12, task_epochs=4)
    seen = {}

    def kill_a_worker_after_the_first_checkpoints():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(tmp_path.glob("*/checkpoint_*"))) < 3:
            time.sleep(0.2)
        workers = _live_actors("RayTrainWorker")
        seen["nodes"] = {w["node"] for w in workers}
        os.kill(workers[-1]["pid"], signal.SIGKILL)
        seen["killed"] = True

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoints, daemon=True)
    killer.start()
    networks = train_with_ray(in_memory_datasets(inputs), inputs["candidates"], config, num_workers=2, placement_strategy="SPREAD", max_failures=2, checkpoint_every=1,
                              storage_path=str(tmp_path))
    killer.join(timeout=10)
    assert seen.get("killed") and len(seen["nodes"]) == 2  # one worker per node, and one of them died
    history = networks["history"]
    assert len(history["resumed_at_epoch"]) == 1 and 0 < history["resumed_at_epoch"][0] < config.epochs + config.task_epochs
    assert len(history["phase1_loss"]) == config.epochs and len(history["phase2_loss"]) == config.task_epochs


def _streamed_corpus(folder, texts: list[str], workspace: str, num_actors: int, rows_per_shard: int):
    """`texts` as a user's JSON Lines file (two models, made-up scores), embedded by the streamed fit's first step."""
    import json

    from serve.core.encoder import DEFAULT_EMBEDDER
    from training.corpus import embed_corpus

    folder.mkdir()
    with open(folder / "prompts.jsonl", "w") as handle:
        handle.writelines(json.dumps({"prompt": t, "scores": {"a": i % 2, "b": (i // 2) % 2}}) + "\n" for i, t in enumerate(texts))
    return embed_corpus(str(folder), DEFAULT_EMBEDDER, workspace=workspace, num_actors=num_actors, rows_per_shard=rows_per_shard,
                        log=lambda message: None)


def _texts(count: int) -> list[str]:
    verbs, things = ["sort", "explain", "prove", "draw"], ["list", "graph", "proof", "tree", "poem"]
    return [f"Question {i}: how would you {verbs[i % 4]} a {things[i % 5]} in {i % 7 + 2} steps?" for i in range(count)]


def test_streamed_knn_on_a_cluster_of_nodes_matches_the_in_memory_search(cluster, tmp_path):
    """Shards written by encoders on several nodes, the graph built by one task on one of them."""
    from training.neighbours import knn
    from training.streamed_tasks import knn_edges, read_edges

    corpus = _streamed_corpus(tmp_path / "input", _texts(1200), str(tmp_path / "workspace"), num_actors=3, rows_per_shard=100)
    embeddings = np.concatenate([corpus.read(s, ["embedding"])["embedding"] for s in range(len(corpus.shards))])
    neighbours, _ = read_edges(corpus, knn_edges(corpus, 10, method="exact"))
    np.testing.assert_array_equal(neighbours, knn(embeddings, 10, method="exact")[0])


def test_streamed_embedding_survives_a_node_removed_mid_job_with_complete_identical_shards(cluster, tmp_path):
    """Last in this module: it takes a node away (and puts a fresh one back)."""
    from serve.core.encoder import encode, load_encoder

    head_and_workers, workers = cluster
    texts = _texts(2000)
    removed = {}

    def remove_a_node_once_actors_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            nodes = {actor["node"] for actor in _live_actors("ShardEncoder")}
            victim = next((w for w in workers if w.node_id in nodes), None)
            if victim is not None and len(nodes) >= 2:
                time.sleep(1)  # let them take a shard or two
                head_and_workers.remove_node(victim)
                removed["nodes_before"] = nodes
                return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_node_once_actors_run, daemon=True)
    remover.start()
    corpus = _streamed_corpus(tmp_path / "input", texts, str(tmp_path / "workspace"), num_actors=3, rows_per_shard=100)
    remover.join(timeout=10)
    head_and_workers.add_node(num_cpus=1)
    assert len(removed.get("nodes_before", ())) >= 2  # the actors had spread, and one node went away mid-job
    parts = [corpus.read(s, ["prompt", "embedding"], part) for s in range(len(corpus.shards)) for part in ("train", "validation")]
    prompts = [p for part in parts for p in part["prompt"]]
    assert sorted(prompts) == sorted(texts)  # every row once
    expected = encode(load_encoder(corpus.embedder, device="cpu"), prompts)
    np.testing.assert_allclose(np.concatenate([part["embedding"] for part in parts]), expected, atol=1e-5)
