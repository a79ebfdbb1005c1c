"""Cool-down of failing backends, as LiteLLM's `allowed_fails` / `cooldown_time`: a backend that keeps failing is
skipped for a while instead of making every request wait for its timeout again.

Kept per ingress replica (each replica learns from the failures it sees), per engine: the stand-in engine that
answers several pool models cools down for all of them at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ray.serve.metrics import Gauge

from serve.backends.backend_config import CooldownConfig

AVAILABLE, COOLING_DOWN, PROBING = "available", "cooling_down", "probing"


@dataclass
class _Engine:
    failures: deque = field(default_factory=deque)  # times of the recent failures
    cooled_until: float | None = None
    probe_started: float | None = None  # when the request that probes it after a cool-down was let through


class Cooldowns:
    def __init__(self, config: CooldownConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self.engines: dict[str, _Engine] = {}
        self.gauge = Gauge("finerouter_backend_cooling_down", description="1 while the backend is skipped after repeated failures.",
                           tag_keys=("backend",))

    def _engine(self, name: str) -> _Engine:
        return self.engines.setdefault(name, _Engine())

    def state(self, name: str) -> str:
        engine = self._engine(name)
        if engine.cooled_until is None:
            return AVAILABLE
        if self.clock() < engine.cooled_until:
            return COOLING_DOWN
        return PROBING

    def admit(self, name: str) -> bool:
        """Whether a request may go to the engine now: yes unless cooling down; after the cool-down, one request
        at a time (a probe that neither succeeds nor fails within another cool-down period is given up)."""
        engine, now = self._engine(name), self.clock()
        if engine.cooled_until is None:
            return True
        if now < engine.cooled_until:
            return False
        if engine.probe_started is not None and now - engine.probe_started < self.config.cooldown_s:
            return False
        engine.probe_started = now
        return True

    def succeeded(self, name: str) -> None:
        engine = self._engine(name)
        if engine.cooled_until is not None:
            self.gauge.set(0, tags={"backend": name})
        engine.failures.clear()
        engine.cooled_until = engine.probe_started = None

    def _recent_failures(self, engine: _Engine) -> int:
        while engine.failures and engine.failures[0] <= self.clock() - self.config.window_s:
            engine.failures.popleft()
        return len(engine.failures)

    def failed(self, name: str) -> None:
        engine, now = self._engine(name), self.clock()
        engine.failures.append(now)
        if engine.probe_started is not None or self._recent_failures(engine) >= self.config.allowed_fails:
            engine.cooled_until, engine.probe_started = now + self.config.cooldown_s, None
            engine.failures.clear()
            self.gauge.set(1, tags={"backend": name})

    def seconds_left(self, name: str) -> float:
        engine = self._engine(name)
        return max(0.0, (engine.cooled_until or 0.0) - self.clock())

    def status(self, name: str) -> dict:
        return {"state": self.state(name), "recent_failures": self._recent_failures(self._engine(name)),
                "cooldown_seconds_left": round(self.seconds_left(name), 3)}
