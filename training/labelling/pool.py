"""The labelling job's configuration (`--pool FILE`, YAML): the pool to ask, its prices, and the judges.

    endpoint: http://127.0.0.1:8000/v1   # the running router app; answers the pool models of kind local or vllm
    max_tokens: 512                      # per answer
    models:
      gpt-4o:
        backend: {kind: openai, base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}
        price_in_per_mtok: 2.5           # USD per 1M prompt tokens
        price_out_per_mtok: 10.0         # USD per 1M answer tokens
        concurrency: 8                   # calls in flight to this backend
      llama-3-70b:
        backend: {kind: vllm, model_source: meta-llama/Meta-Llama-3-70B-Instruct}
        price_in_per_mtok: 0.9
        price_out_per_mtok: 0.9
    reference_judge: auto                # auto | choice | number | exact | code, for rows with a reference
    llm_judge:                           # optional: grades the answers to prompts without a reference
      base_url: https://api.openai.com/v1
      model: gpt-4o-mini
      api_key_env: OPENAI_API_KEY

A model's `backend` is the entry `serve.config` lists under `backends` (the same pydantic types): an `openai`
backend is called at its own `base_url` with its own retries; a `local` or `vllm` one lives in the Serve app, so
the job asks the app (`endpoint`) for that model by name, as any client of the app would.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import yaml
from pydantic import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from serve.backends.backend_config import (
    Backend,
    LocalBackend,
    OpenAIBackend,
    StrictConfig,
)
from serve.backends.retry import RetryPolicy
from serve.batch.answers import RETRY, answer_client, chat_completion
from serve.core.encoder import count_tokens
from serve.core.prompt_files import BatchInputError
from training.labelling.judges import (
    DEFAULT_GRADE_PATTERN,
    DEFAULT_RUBRIC,
    REFERENCE_JUDGES,
    Verdict,
    parse_grade,
)


class PoolModel(StrictConfig):
    backend: Backend = LocalBackend()
    price_in_per_mtok: NonNegativeFloat
    price_out_per_mtok: NonNegativeFloat
    concurrency: PositiveInt = 8


class LLMJudgeConfig(StrictConfig):
    """An OpenAI-compatible judge: `rubric` (with {prompt} and {answer}) in, a reply whose last match of
    `grade_pattern` (first group: a number in [0, scale]) is the grade."""

    base_url: str
    model: str
    api_key_env: str | None = None
    rubric: str = DEFAULT_RUBRIC
    grade_pattern: str = DEFAULT_GRADE_PATTERN
    scale: PositiveFloat = 10.0
    max_tokens: PositiveInt = 256
    timeout_s: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 3
    retry_backoff_s: NonNegativeFloat = 0.5
    concurrency: PositiveInt = 4

    @model_validator(mode="after")
    def _rubric_has_fields(self):
        for field in ("{prompt}", "{answer}"):
            if field not in self.rubric:
                raise ValueError(f"rubric: must contain {field}")
        return self


class LabelPoolConfig(StrictConfig):
    models: dict[str, PoolModel]
    endpoint: str | None = None
    max_tokens: PositiveInt = 512
    temperature: NonNegativeFloat = 0.0
    reference_judge: str = "auto"
    code_time_limit_s: PositiveFloat = 10.0
    llm_judge: LLMJudgeConfig | None = None

    @model_validator(mode="after")
    def _checked(self):
        if not self.models:
            raise ValueError("models: name at least one pool model")
        if self.reference_judge not in REFERENCE_JUDGES:
            raise ValueError(f"reference_judge: {self.reference_judge!r} is not one of {REFERENCE_JUDGES}")
        served = sorted(name for name, model in self.models.items() if not isinstance(model.backend, OpenAIBackend))
        if served and not self.endpoint:
            raise ValueError(f"models {served} are answered by the Serve app (kind local or vllm): set `endpoint` to the "
                             "app's API root, e.g. http://127.0.0.1:8000/v1")
        return self


def load_pool(path: str | Path) -> LabelPoolConfig:
    """The checked pool file; BatchInputError names the file and the bad field."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"--pool {path}: no such file")
    try:
        config = LabelPoolConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        raise BatchInputError(f"--pool {path}: not YAML ({error})") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise BatchInputError(f"--pool {path}: {problems}") from None
    keys = [env for env in (*(m.backend.api_key_env for m in config.models.values() if isinstance(m.backend, OpenAIBackend)),
                            config.llm_judge and config.llm_judge.api_key_env) if env]
    missing = sorted({env for env in keys if env not in os.environ})
    if missing:
        raise BatchInputError(f"--pool {path}: environment variable(s) {missing} named by api_key_env are not set")
    return config


def model_route(config: LabelPoolConfig, name: str) -> dict:
    """Where and how the job asks pool model `name`: endpoint, the endpoint's name for it, key, timeout, retries."""
    backend = config.models[name].backend
    if isinstance(backend, OpenAIBackend):
        return {"endpoint": backend.base_url, "served_name": backend.model or name, "api_key_env": backend.api_key_env,
                "timeout_s": backend.timeout_s, "retry": RetryPolicy(backend.max_retries, backend.retry_backoff_s)}
    return {"endpoint": config.endpoint, "served_name": name, "api_key_env": None,
            "timeout_s": getattr(backend, "timeout_s", 120.0), "retry": RETRY}


def usage_cost(completion: dict, prompt: str, answer: str, price_in: float, price_out: float) -> float:
    """USD of one call: the completion's reported usage x the prices (per 1M tokens); where the server reports no
    usage, the tokens are counted with the router's tokenizer, as the datasets' costs are."""
    usage = completion.get("usage") or {}
    prompt_tokens, answer_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if prompt_tokens is None or answer_tokens is None:
        prompt_tokens, answer_tokens = (int(n) for n in count_tokens([prompt, answer]))
    return (prompt_tokens * price_in + answer_tokens * price_out) / 1e6


class PoolAnswerer:
    """Ray Data actor: one pool model's answer and cost for each row, `concurrency` calls at a time."""

    def __init__(self, config: dict, model: str, column: int):
        from concurrent.futures import ThreadPoolExecutor

        self.config = LabelPoolConfig.model_validate(config)
        self.model, self.column = model, column
        self.route = model_route(self.config, model)
        concurrency = self.config.models[model].concurrency
        self.client = answer_client(self.route["endpoint"], concurrency, self.route["timeout_s"], self.route["api_key_env"])
        self.threads = ThreadPoolExecutor(concurrency)

    def _answer(self, prompt) -> tuple[str | None, float | None, str | None]:
        if not isinstance(prompt, str) or not prompt.strip():
            return None, None, "no prompt"
        body = {"model": self.route["served_name"], "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.config.max_tokens, "temperature": self.config.temperature}
        completion, error = chat_completion(self.client, body, self.route["retry"])
        if completion is None:
            return None, None, f"answer: {error}"
        text = completion["choices"][0]["message"]["content"]
        prices = self.config.models[self.model]
        return text, usage_cost(completion, prompt, text, prices.price_in_per_mtok, prices.price_out_per_mtok), None

    def __call__(self, batch):
        import pandas as pd

        results = list(self.threads.map(self._answer, batch["prompt"]))
        texts, costs, failures = zip(*results) if results else ((), (), ())
        return batch.assign(**{f"answer_{self.column}": pd.Series(texts, index=batch.index, dtype=object),
                               f"cost_{self.column}": pd.Series(costs, index=batch.index, dtype=float),
                               f"failure_{self.column}": pd.Series(failures, index=batch.index, dtype=object)})

    def __del__(self):
        self.threads.shutdown(wait=True)
        self.client.close()


def ask_llm_judge(client: httpx.Client, config: LLMJudgeConfig, prompt: str, answer: str) -> Verdict:
    """The judge's grade of `answer`, or a failure: the call failed, or its reply holds no readable grade."""
    body = {"model": config.model, "max_tokens": config.max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": config.rubric.replace("{prompt}", prompt).replace("{answer}", answer)}]}
    completion, error = chat_completion(client, body, RetryPolicy(config.max_retries, config.retry_backoff_s))
    if completion is None:
        return Verdict(None, "llm", f"judge call: {error}")
    return parse_grade(completion["choices"][0]["message"]["content"], config.grade_pattern, config.scale)


def judge_client(config: LLMJudgeConfig) -> httpx.Client:
    return answer_client(config.base_url, config.concurrency, config.timeout_s, config.api_key_env)

