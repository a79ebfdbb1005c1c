"""The Embedder deployment: the expensive, batchable step of a routing decision, and the one that wants a GPU.

It scales on its own, apart from the ingress, which makes the decision itself (`serve.app.ranker`: a few matrix
products on the artifact). It batches prompts itself rather than with `@serve.batch`: Ray Serve forms a batch from
the requests there are when they arrive, and then queues it for the encoder, so while one batch encodes, the
requests that come in meanwhile become batches of one each. Here the encoder takes everything that waits, up to a
batch, each time it is free. It encodes in a thread, so that a long batch never holds up the replica's event loop.
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
        self.name, self.config = embedder, config
        self.encoder = load_encoder(embedder, device=config.device)
        count_tokens(["warm-up"], embedder)  # load the tokenizer now, not on the first request
        self.waiting: asyncio.Queue[tuple[str, asyncio.Future]] | None = None  # made on the replica's event loop
        self.encoding: asyncio.Task | None = None

    async def embed(self, text: str) -> tuple[np.ndarray, int]:
        """A prompt's embedding and token count, encoded in a batch with the prompts waiting beside it."""
        if self.waiting is None:
            self.waiting = asyncio.Queue()
            self.encoding = asyncio.create_task(self._encode_batches())
        result = asyncio.get_running_loop().create_future()
        self.waiting.put_nowait((text, result))
        return await result

    async def _encode_batches(self) -> None:
        """Each time the encoder is free, everything waiting (up to a batch) is encoded together; with less than a
        batch waiting it first waits `batch_wait_timeout_s` for more."""
        while True:
            batch = [await self.waiting.get()]
            if self.config.batch_wait_timeout_s and self.waiting.qsize() < self.config.max_batch_size - 1:
                await asyncio.sleep(self.config.batch_wait_timeout_s)
            while len(batch) < self.config.max_batch_size and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            batch = [(text, result) for text, result in batch if not result.done()]  # callers that gave up
            try:
                embeddings, tokens = await asyncio.to_thread(self._embed, [text for text, _ in batch])
            except Exception as error:  # every caller of the batch gets the error
                for _, result in batch:
                    if not result.done():
                        result.set_exception(error)
                continue
            for (_, result), embedding, count in zip(batch, embeddings, tokens.tolist()):
                if not result.done():
                    result.set_result((embedding, count))

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode(self.encoder, [text[:WINDOW_CHARS] for text in texts]), count_tokens(texts, self.name)
