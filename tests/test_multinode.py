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
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
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


class _ActorNodes(threading.Thread):
    """Watches which nodes the live actors of a class run on while a job runs."""

    def __init__(self, class_name: str):
        super().__init__(daemon=True)
        self.class_name, self.nodes, self.done = class_name, set(), threading.Event()

    def run(self):
        while not self.done.is_set():
            self.nodes |= {actor["node"] for actor in _live_actors(self.class_name)}
            time.sleep(0.2)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def test_knn_query_actors_spread_over_the_nodes_and_match_the_plain_search(cluster):
    from training.graph import knn

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((3000, 48)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    with _ActorNodes("IndexShard") as watcher:
        sharded = knn(embeddings, 10, block_size=250, use_ray=True)
    plain = knn(embeddings, 10, block_size=250)
    assert len(watcher.nodes) >= 2
    np.testing.assert_array_equal(sharded[0], plain[0])
    np.testing.assert_array_equal(sharded[1], plain[1])


def test_embedding_survives_a_node_removed_mid_job_with_a_complete_identical_result(cluster, tmp_path):
    """Last in this module: it takes a node away (and puts a fresh one back)."""
    from serve.encoder import DEFAULT_EMBEDDER, encode, load_encoder
    from training.embed import embed_texts

    head_and_workers, workers = cluster
    texts = [f"Question {i}: how would you {verb} a {thing} in {i % 7 + 2} steps?"
             for i, (verb, thing) in enumerate(zip(["sort", "explain", "prove", "draw"] * 500, ["list", "graph", "proof", "tree", "poem"] * 400))]
    removed = {}

    def remove_a_node_once_actors_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            nodes = {actor["node"] for actor in _live_actors("EncoderActor")}
            victim = next((w for w in workers if w.node_id in nodes), None)
            if victim is not None and len(nodes) >= 2:
                time.sleep(1)  # let them take a block or two
                head_and_workers.remove_node(victim)
                removed["nodes_before"] = nodes
                return
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_node_once_actors_run, daemon=True)
    remover.start()
    embeddings = embed_texts(texts, DEFAULT_EMBEDDER, batch_size=32, num_actors=2, cache_dir=tmp_path)
    remover.join(timeout=10)
    head_and_workers.add_node(num_cpus=1)
    assert len(removed.get("nodes_before", ())) >= 2  # the actors had spread, and one node went away mid-job
    expected = encode(load_encoder(DEFAULT_EMBEDDER, device="cpu"), texts)
    assert embeddings.shape == expected.shape
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
