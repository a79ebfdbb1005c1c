"""The training corpus's embeddings: a Ray Data job over an actor pool of encoders, with an on-disk cache.

The encoder itself (`serve.core.encoder`) belongs to serving, so the vectors trained on are the vectors served.
Ray is imported lazily, so the cache can be read without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serve.core.atomic import atomic_file
from serve.core.encoder import (
    DEFAULT_EMBEDDER,
    encode,
    load_encoder,
    offline_name,
    split_backend,
)
from serve.core.onnx_encoder import TORCH_BACKEND
from serve.core.paths import cache_dir as cache_root
from training.cluster import cpus_per_actor

logger = logging.getLogger(__name__)

# Part of the cache key: bump when `encode` changes what it returns (dtype, normalisation).
EMBEDDING_FORMAT = "float32-l2normalised-v1"


def canonical_model_name(name: str) -> str:
    """One cache identity per model and encoder backend, whichever alias or relative path named the model."""
    model, backend = split_backend(name)
    canonical = offline_name(model) or (str(Path(model).resolve()) if os.path.isdir(model) else model)
    return canonical if backend == TORCH_BACKEND else f"{canonical}@{backend}"


def _cache_path(texts: Sequence[str], model: str, cache_dir: Path) -> Path:
    """The .npy file for (model, texts, embedding format); the model name implies the dimension."""
    texts_digest = hashlib.sha256()
    for text in texts:
        texts_digest.update(text.encode("utf-8"))
        texts_digest.update(b"\x00")  # separator, so ["ab", "c"] and ["a", "bc"] differ
    canonical_name = canonical_model_name(model)
    key = json.dumps({"model": canonical_name, "texts_sha256": texts_digest.hexdigest(),
                      "count": len(texts), "format": EMBEDDING_FORMAT}, sort_keys=True)
    readable_model = canonical_name.strip("/").replace("/", "--")[-60:]
    return cache_dir / f"{readable_model}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


class _EncoderActor:
    """Ray Data actor: loads the encoder once, then embeds each batch of {row, text}."""

    def __init__(self, model: str, device: str):
        self.encoder = load_encoder(model, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeddings = encode(self.encoder, batch["text"].tolist())
        return {"row": batch["row"], "embedding": embeddings}


def _embed_with_ray_data(texts: Sequence[str], model: str, batch_size: int, num_actors: int,
                         num_gpus: float) -> np.ndarray:
    """Embed on an actor pool of `num_actors` encoders and put the rows back in input order."""
    import pandas as pd
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)  # joins the machine's running cluster if there is one, else starts one
    try:
        # Several blocks per actor balance the load; blocks of a few batches keep progress updates frequent.
        block_rows = max(batch_size, min(math.ceil(len(texts) / (4 * num_actors)), 16 * batch_size))
        frame = pd.DataFrame({"row": np.arange(len(texts)), "text": list(texts)})
        blocks = [frame.iloc[start:start + block_rows] for start in range(0, len(frame), block_rows)]
        embedded = ray.data.from_pandas(blocks).map_batches(
            _EncoderActor,
            fn_constructor_kwargs={"model": model, "device": "cuda" if num_gpus > 0 else "cpu"},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=1 if num_gpus > 0 else cpus_per_actor(num_actors),
            num_gpus=num_gpus or None,
        )
        in_input_order: np.ndarray | None = None
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            if in_input_order is None:
                in_input_order = np.empty((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
            in_input_order[batch["row"]] = batch["embedding"]
        return in_input_order
    finally:
        if started_ray:
            ray.shutdown()


def embed_texts(texts: Sequence[str], model: str = DEFAULT_EMBEDDER, *, batch_size: int = 256,
                num_actors: int = 1, num_gpus: float = 0.0, cache_dir: Path | None = None,
                use_ray: bool = True) -> np.ndarray:
    """Embed a training corpus once: the cached .npy if these texts were embedded before, else compute.

    `use_ray=True` runs a Ray Data job on `num_actors` encoder actors (`num_gpus` each), `batch_size` prompts
    per actor call (sorted by length there, then encoded `forward_batch_size` at a time); `use_ray=False`
    encodes in this process. Both return the same float32, L2-normalised rows in input order.
    The cache lives in `cache_dir`, by default `$FINEROUTER_CACHE/embeddings` (`<repo>/.cache/embeddings`).
    """
    cache_path = _cache_path(texts, model, cache_root() / "embeddings" if cache_dir is None else Path(cache_dir))
    if cache_path.exists():
        logger.info("Embeddings cache hit: %s", cache_path)
        return np.load(cache_path)
    logger.info("Embedding %d texts with %s (%s)", len(texts), model, "Ray Data" if use_ray else "in process")
    if use_ray and len(texts) > 0:
        embeddings = _embed_with_ray_data(texts, model, batch_size, num_actors, num_gpus)
    else:
        embeddings = encode(load_encoder(model), texts, show_progress=len(texts) > 10 * batch_size)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache_path) as handle:
        np.save(handle, embeddings)
    return embeddings
