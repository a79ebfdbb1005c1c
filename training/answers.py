"""The recorded answers' embeddings, cached like the prompts'; what an answer says is `serve.core.answer_facts`."""

from __future__ import annotations

import numpy as np

from serve.core.answer_facts import answer_opening
from serve.core.encoder import DEFAULT_EMBEDDER
from training.embed import embed_texts


def embed_answers(responses: np.ndarray, model: str = DEFAULT_EMBEDDER) -> np.ndarray:
    """[N, M, D] embeddings of every answer's opening (`serve.core.answer_facts.answer_opening`), with the prompt
    encoder; each distinct text is embedded once and cached on disk (`training.embed.embed_texts`)."""
    openings = np.array([answer_opening(text) for text in responses.ravel()], dtype=str)
    unique, index = np.unique(openings, return_inverse=True)
    vectors = embed_texts(list(unique), model, use_ray=False)
    return vectors[index].reshape(*responses.shape, vectors.shape[1])
