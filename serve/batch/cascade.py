"""The cascade stage (`--policy cascade`): a Ray Data actor that plays cascade routing on each batch of prompts,
asking an OpenAI-compatible endpoint for each answer the rule wants.

It runs `serve.core.cascade.play_cascade`, the loop the evaluation plays on recorded answers, whose every step is the
one the Ranker deployment takes for a served request; answers are embedded with the router's encoder, as the
Embedder deployment embeds them. A model whose call fails is not asked again for that prompt, and the row's
`error` says what failed; a row no model answered has no answer.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serve.batch.answers import Answerer, answer
from serve.batch.ranking import BatchRanker
from serve.core.answer_facts import answer_opening
from serve.core.cascade import judged_answers, play_cascade

# Nullable dtypes, so a batch with missing prompts writes the same schema as one without.
CASCADE_DTYPES = {"answer": "string", "answered_by": "string", "cascade_models": "object", "cascade_posthoc_quality": "object",
                  "cascade_estimated_cost_usd": "object", "estimated_cost_usd": "Float64", "task": "Int64",
                  "task_probability": "Float64", "error": "string"}
CASCADE_COLUMNS = tuple(CASCADE_DTYPES)


class EndpointAnswers:
    """`play_cascade`'s answer source for the batch: each answer asked of the endpoint when the cascade wants it
    (`concurrency` calls at a time), its opening embedded by `embed`; estimated costs stand for the spent ones."""

    def __init__(self, prompts: list[str], models: list[str], ask: Callable[[str, str], tuple], threads: ThreadPoolExecutor,
                 embed: Callable[[list[str]], np.ndarray], estimated_cost: np.ndarray, dimension: int):
        self.prompts, self.models, self.ask, self.threads, self.embed = prompts, models, ask, threads, embed
        self.estimated_cost = estimated_cost
        self.responses = np.full(estimated_cost.shape, "", dtype=object)
        self.embeddings = np.zeros((*estimated_cost.shape, dimension), np.float32)
        self.errors: list[list[str]] = [[] for _ in prompts]

    def obtain(self, rows, models):
        results = list(self.threads.map(lambda row, model: self.ask(self.models[model], self.prompts[row]), rows, models))
        obtained = np.array([error is None for _, _, error in results], bool)
        for row, model, (_, _, error) in zip(rows, models, results):
            if error is not None:
                self.errors[row].append(f"{self.models[model]}: {error}")
        texts = [text or "" for text, _, error in results if error is None]
        for row, model, text in zip(rows[obtained], models[obtained], texts):
            self.responses[row, model] = text
        if texts:
            self.embeddings[rows[obtained], models[obtained]] = self.embed([answer_opening(text) for text in texts])
        return obtained, self.estimated_cost[rows, models]

    def judged(self, rows):
        return judged_answers(self.responses[rows], self.embeddings[rows])


class BatchCascade(BatchRanker):
    """Ray Data actor: the routing stage's artifact and encoder, with the answering stage's endpoint client."""

    dtypes = CASCADE_DTYPES

    def __init__(self, artifact_dir: str, prompt_column: str, cost_weight: float, allowed: np.ndarray | None,
                 cost_cap: float | None, device: str, threads: int, endpoint: str, max_tokens: int, concurrency: int, timeout_s: float,
                 api_key_env: str | None):
        super().__init__(artifact_dir, prompt_column, cost_weight, allowed, cost_cap, device, threads)
        self.answerer = Answerer(endpoint, prompt_column, max_tokens, concurrency, timeout_s, api_key_env)

    def decide(self, texts: list[str]) -> dict[str, list]:
        from serve.core.encoder import encode

        artifact, models = self.artifact, np.asarray(self.artifact.models, dtype=object)
        embeddings, tokens = self.embed(texts)
        ex_ante, tasks = artifact.predict(embeddings, texts)
        estimated = artifact.cost_model.estimate(tokens)
        source = EndpointAnswers(texts, artifact.models, lambda model, prompt: answer(self.answerer.client, model, prompt, self.answerer.max_tokens),
                                 self.answerer.threads, lambda openings: encode(self.encoder, openings), estimated, artifact.embedding_dimension)
        play = play_cascade(artifact.posthoc, ex_ante, estimated, source, self.cost_weight, artifact.cost_scale, allowed=self.allowed,
                            cost_cap=self.cost_cap)
        runs = [run[run >= 0] for run in play.runs]
        rows = np.arange(len(texts))
        return {
            "answer": [source.responses[row, model] if model >= 0 else None for row, model in zip(rows, play.answer)],
            "answered_by": [models[model] if model >= 0 else None for model in play.answer],
            "cascade_models": [models[run].tolist() for run in runs],
            "cascade_posthoc_quality": [play.quality[row, run].tolist() for row, run in zip(rows, runs)],
            "cascade_estimated_cost_usd": [play.cost[row, run].tolist() for row, run in zip(rows, runs)],
            "estimated_cost_usd": [float(play.cost[row, run].sum()) for row, run in zip(rows, runs)],
            "task": tasks.argmax(axis=1).tolist(),
            "task_probability": tasks.max(axis=1).astype(float).tolist(),
            "error": ["; ".join(errors) or None for errors in source.errors],
        }
