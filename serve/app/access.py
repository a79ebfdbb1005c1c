"""Who may call the app, and how much each API key may spend.

The keys stay out of the config, the logs and the responses: they are read where the ingress runs (an
environment variable or a mounted file), compared in constant time, and known elsewhere only by a short
digest (`key_id`), which is what the spend ledger counts under.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from pathlib import Path

from ray import serve

from serve.app.app_config import AccessConfig


def key_id(key: str) -> str:
    """A name for a key that does not reveal it: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_api_keys(config: AccessConfig) -> list[str]:
    """The configured keys (none: the app is open); raises naming the variable or file that holds none."""
    sources = []
    if config.api_keys_env:
        value = os.environ.get(config.api_keys_env)
        if value is None:
            raise RuntimeError(f"access.api_keys_env: the environment variable {config.api_keys_env} (the app's API keys) "
                               "is not set where the ingress runs")
        sources.append((f"environment variable {config.api_keys_env}", value))
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if not path.is_file():
            raise RuntimeError(f"access.api_keys_file: {path} (the app's API keys, one per line) is not a file")
        sources.append((str(path), path.read_text()))
    keys = []
    for where, text in sources:
        found = [key.strip() for key in re.split(r"[,\n]", text) if key.strip()]
        if not found:
            raise RuntimeError(f"{where} holds no API key (expected keys separated by commas or newlines)")
        keys += found
    return keys


class KeyRing:
    """The accepted keys; `match` compares with every one of them in constant time."""

    def __init__(self, keys: list[str]):
        self._keys = [(key.encode(), key_id(key)) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, authorization: str | None) -> str | None:
        """The key id of a valid `Authorization: Bearer <key>` header, else None."""
        scheme, _, presented = (authorization or "").partition(" ")
        presented_bytes = presented.strip().encode()
        found = None
        for key, name in self._keys:  # no early exit: the time taken does not say which key came close
            if hmac.compare_digest(presented_bytes, key) and scheme.lower() == "bearer":
                found = name
        return found


@serve.deployment(name="SpendLedger", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1024, max_queued_requests=1024)
class SpendLedger:
    """The estimated spend of each key in the current period, one place for every ingress replica.

    Periods are fixed windows of `period_s` seconds since the epoch. The counts live in memory: a restarted
    replica starts the period from zero."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.period, self.spent = self._current_period(), {}

    def _current_period(self) -> int:
        return int(time.time() // self.period_s)

    def _roll_over(self) -> None:
        if self._current_period() != self.period:
            self.period, self.spent = self._current_period(), {}

    async def spent_usd(self, key: str) -> float:
        self._roll_over()
        return self.spent.get(key, 0.0)

    async def charge(self, key: str, usd: float) -> float:
        """Add `usd` to the key's spend; its spend in the period after the charge."""
        self._roll_over()
        self.spent[key] = self.spent.get(key, 0.0) + usd
        return self.spent[key]

    async def seconds_left_in_period(self) -> float:
        return (self._current_period() + 1) * self.period_s - time.time()
