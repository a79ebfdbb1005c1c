"""Shared test set-up: offline models, the project's cache, one Ray instance per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from training.settings import cache_dir, data_dir

os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray costs seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def shared_data():
    if not (data_dir() / "README.md").is_file():
        pytest.skip(f"routing datasets not found at {data_dir()} (set FINEROUTER_DATA_DIR)")
    return data_dir()
