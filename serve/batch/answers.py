"""The answering stage: a Ray Data actor that asks an OpenAI-compatible endpoint for each row's answer.

Calls follow the project's one retry policy (`serve.backends.retry`); a call that still fails fills the row's
`error`, so one bad row never fails the job.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd

from serve.backends.retry import TRANSIENT_ERRORS, RetryPolicy

ANSWER_COLUMNS = ("answer", "answered_by", "error")
RETRY = RetryPolicy(retries=3, backoff_s=0.5)
ERROR_BODY_CHARS = 300


def chat_completion(client: httpx.Client, body: dict, retry: RetryPolicy = RETRY) -> tuple[dict | None, str | None]:
    """(the completion, None), or (None, error) once the call has failed `retry.attempts` times or failed for good
    (a status that another try would not change, or a body that is not a chat completion)."""
    attempt = 0
    while True:
        time.sleep(retry.delay_s(attempt))
        try:
            response = client.post("chat/completions", json=body)
        except TRANSIENT_ERRORS as error:
            if not retry.retry_error(attempt):
                return None, f"{type(error).__name__}: {error} (after {attempt + 1} attempts)"
            attempt += 1
            continue
        if response.status_code >= 400:
            if not retry.retry_status(response.status_code, attempt):
                return None, f"HTTP {response.status_code}: {response.text[:ERROR_BODY_CHARS]}"
            attempt += 1
            continue
        try:
            completion = response.json()
            if isinstance(completion["choices"][0]["message"]["content"], str):
                return completion, None
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        return None, f"not a chat completion: {response.text[:ERROR_BODY_CHARS]}"


def answer(client: httpx.Client, model: str, prompt: str, max_tokens: int,
           retry: RetryPolicy = RETRY) -> tuple[str | None, str | None, str | None]:
    """(answer, answering model, None), or (None, None, error) where `chat_completion` fails."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    completion, error = chat_completion(client, body, retry)
    if completion is None:
        return None, None, error
    return completion["choices"][0]["message"]["content"], completion.get("model"), None


def answer_client(endpoint: str, concurrency: int, timeout_s: float, api_key_env: str | None) -> httpx.Client:
    """A pooled client for `endpoint` (the API root, e.g. http://127.0.0.1:8000/v1)."""
    headers = {"Authorization": f"Bearer {os.environ[api_key_env]}"} if api_key_env else None
    return httpx.Client(base_url=endpoint.rstrip("/") + "/", headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0),
                        limits=httpx.Limits(max_connections=concurrency))


class Answerer:
    """Ray Data actor: answers each row's prompt with its routed model, `concurrency` calls at a time."""

    def __init__(self, endpoint: str, prompt_column: str, max_tokens: int, concurrency: int, timeout_s: float,
                 api_key_env: str | None):
        self.client = answer_client(endpoint, concurrency, timeout_s, api_key_env)
        self.threads = ThreadPoolExecutor(concurrency)
        self.prompt_column, self.max_tokens = prompt_column, max_tokens

    def _answer(self, model, prompt) -> tuple[str | None, str | None, str | None]:
        if pd.isna(model):
            return None, None, f"no {self.prompt_column!r} value, so no routed model"
        return answer(self.client, model, prompt, self.max_tokens)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        results = list(self.threads.map(self._answer, batch["routed_model"], batch[self.prompt_column]))
        return batch.assign(**{name: pd.Series(values, index=batch.index, dtype="string")
                               for name, values in zip(ANSWER_COLUMNS, zip(*results))})

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.client.close()

    def __del__(self):
        """Ray Data deletes the actor's UDF when the actor pool shuts down gracefully."""
        self.close()
