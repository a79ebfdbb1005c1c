"""The Embedder deployment: the expensive, batchable step of a routing decision, and the one that wants a GPU.

It scales on its own, apart from the ingress, which makes the decision itself (`serve.app.ranker`: a few matrix
products on the artifact). It encodes in a thread, so that a long batch never holds up the replica's event loop
(and with it the queueing of the next batch).
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from serve.app.app_config import EmbedderConfig
from serve.core.encoder import count_tokens, encode, load_encoder
from serve.core.features import WINDOW_CHARS


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, max_queued_requests=32)
class Embedder:
    """Prompt -> (embedding, prompt tokens), with the same encoder and token counts as training.

    The encoder reads the first few hundred tokens only, so it is given the first WINDOW_CHARS characters:
    the same embedding for any prompt whose first WINDOW_CHARS characters hold that many tokens, and a bounded
    cost for a prompt of any size. The token count (for the cost estimate) covers the whole prompt."""

    def __init__(self, embedder: str, config: EmbedderConfig):
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        self.name = embedder
        self.encoder = load_encoder(embedder, device=config.device)
        count_tokens(["warm-up"], embedder)  # load the tokenizer now, not on the first request
        self.embed.set_max_batch_size(config.max_batch_size)
        self.embed.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch
    async def embed(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        # In a thread, so that the replica keeps queueing the next batch while this one encodes.
        embeddings, tokens = await asyncio.to_thread(self._embed, texts)
        return list(zip(embeddings, tokens.tolist()))

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode(self.encoder, [text[:WINDOW_CHARS] for text in texts]), count_tokens(texts, self.name)
