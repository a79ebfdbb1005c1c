"""The encoder on ONNX Runtime (`name@onnx`, `name@onnx-int8`): its embeddings agree with PyTorch's, it has a
cache identity of its own, and a missing export or extra says what to run."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest

from serve.core import onnx_encoder
from serve.core.encoder import (
    DEFAULT_EMBEDDER,
    count_tokens,
    encode,
    load_encoder,
    split_backend,
)
from serve.core.onnx_encoder import MissingExportError, prepare_onnx
from training.embed import _cache_path, canonical_model_name

PROMPTS = [
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Write a Python function that returns the n-th Fibonacci number using memoisation.",
    "Solve for x: 3x + 7 = 22. Show each step.",
    "Summarise the causes of the French revolution in three sentences.",
    "Which of the following is a prime number? (A) 21 (B) 27 (C) 29 (D) 33",
    "Translate into German: the meeting has been moved to Thursday afternoon.",
]

needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                       reason="onnxruntime is not installed (the `onnx` extra)")


@pytest.fixture(scope="module")
def exported_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding a fresh export of the default encoder, made by the set-up's own function."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINEROUTER_CACHE", str(root))
        prepare_onnx(DEFAULT_EMBEDDER)
    return root


def test_backend_suffix_names_the_backend_and_keeps_a_cache_identity_of_its_own(tmp_path: Path):
    assert split_backend(DEFAULT_EMBEDDER) == (DEFAULT_EMBEDDER, "torch")
    assert split_backend(f"{DEFAULT_EMBEDDER}@onnx-int8") == (DEFAULT_EMBEDDER, "onnx-int8")
    assert canonical_model_name(f"sentence-transformers/{DEFAULT_EMBEDDER}@onnx-int8") == f"{DEFAULT_EMBEDDER}@onnx-int8"
    keys = {_cache_path(PROMPTS, name, tmp_path) for name in (DEFAULT_EMBEDDER, f"{DEFAULT_EMBEDDER}@onnx", f"{DEFAULT_EMBEDDER}@onnx-int8")}
    assert len(keys) == 3
    with pytest.raises(ValueError, match=r"unknown encoder backend 'int4'.*onnx-int8"):
        load_encoder(f"{DEFAULT_EMBEDDER}@int4")
    assert count_tokens(PROMPTS, f"{DEFAULT_EMBEDDER}@onnx-int8").tolist() == count_tokens(PROMPTS, DEFAULT_EMBEDDER).tolist()


@needs_onnxruntime
def test_missing_export_fails_naming_the_command_that_makes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FINEROUTER_CACHE", str(tmp_path))
    with pytest.raises(MissingExportError, match=rf"not made: run python -m serve\.core\.onnx_encoder {DEFAULT_EMBEDDER}"):
        load_encoder(f"{DEFAULT_EMBEDDER}@onnx-int8")


def test_missing_onnxruntime_fails_naming_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(onnx_encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExportError, match=r"extra `onnx` \(onnxruntime is not installed\)"):
        load_encoder(f"{DEFAULT_EMBEDDER}@onnx-int8")


@needs_onnxruntime
@pytest.mark.parametrize(("backend", "mean_bar", "each_bar"), [("onnx", 0.9999, 0.9999), ("onnx-int8", 0.99, 0.98)])
def test_onnx_embeddings_agree_with_pytorch(exported_cache: Path, monkeypatch: pytest.MonkeyPatch, backend: str,
                                            mean_bar: float, each_bar: float):
    monkeypatch.setenv("FINEROUTER_CACHE", str(exported_cache))
    reference = encode(load_encoder(DEFAULT_EMBEDDER, device="cpu"), PROMPTS)
    encoder = load_encoder(f"{DEFAULT_EMBEDDER}@{backend}")
    for batch_size in (1, 4):  # alone and padded beside longer prompts
        vectors = encode(encoder, PROMPTS, batch_size)
        assert vectors.shape == reference.shape and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cosines = np.einsum("ij,ij->i", reference, vectors)
        assert cosines.mean() >= mean_bar and cosines.min() >= each_bar, cosines


@needs_onnxruntime
def test_onnx_backend_runs_on_the_cpu_only(exported_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FINEROUTER_CACHE", str(exported_cache))
    with pytest.raises(ValueError, match=r"CPU provider: set its device to cpu, not 'cuda'"):
        load_encoder(f"{DEFAULT_EMBEDDER}@onnx-int8", device="cuda")
