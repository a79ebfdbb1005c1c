"""Cool-down of failing backends, as LiteLLM's `allowed_fails` / `cooldown_time`: a backend that keeps failing is
skipped for a while instead of making every request wait for its timeout again.

Kept per ingress replica (each replica learns from the failures it sees), per backend id: the stand-in backend
that answers several pool models cools down for all of them at once.
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
class _BackendState:
    failures: deque = field(default_factory=deque)  # times of the recent failures
    cooled_until: float | None = None
    probe_started: float | None = None  # when the request that probes it after a cool-down was let through


class Cooldowns:
    def __init__(self, config: CooldownConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self.states: dict[str, _BackendState] = {}
        self.gauge = Gauge("finerouter_backend_cooling_down", description="1 while the backend is skipped after repeated failures.",
                           tag_keys=("backend",))

    def _tracked(self, name: str) -> _BackendState:
        return self.states.setdefault(name, _BackendState())

    def state(self, name: str) -> str:
        tracked = self._tracked(name)
        if tracked.cooled_until is None:
            return AVAILABLE
        if self.clock() < tracked.cooled_until:
            return COOLING_DOWN
        return PROBING

    def admit(self, name: str) -> bool:
        """Whether a request may go to the backend now: yes unless cooling down; after the cool-down, one request
        at a time (a probe that neither succeeds nor fails within another cool-down period is given up)."""
        tracked, now = self._tracked(name), self.clock()
        if tracked.cooled_until is None:
            return True
        if now < tracked.cooled_until:
            return False
        if tracked.probe_started is not None and now - tracked.probe_started < self.config.cooldown_s:
            return False
        tracked.probe_started = now
        return True

    def succeeded(self, name: str) -> None:
        tracked = self._tracked(name)
        if tracked.cooled_until is not None:
            self.gauge.set(0, tags={"backend": name})
        tracked.failures.clear()
        tracked.cooled_until = tracked.probe_started = None

    def _recent_failures(self, tracked: _BackendState) -> int:
        while tracked.failures and tracked.failures[0] <= self.clock() - self.config.window_s:
            tracked.failures.popleft()
        return len(tracked.failures)

    def failed(self, name: str) -> None:
        tracked, now = self._tracked(name), self.clock()
        tracked.failures.append(now)
        if tracked.probe_started is not None or self._recent_failures(tracked) >= self.config.allowed_fails:
            tracked.cooled_until, tracked.probe_started = now + self.config.cooldown_s, None
            tracked.failures.clear()
            self.gauge.set(1, tags={"backend": name})

    def seconds_left(self, name: str) -> float:
        tracked = self._tracked(name)
        return max(0.0, (tracked.cooled_until or 0.0) - self.clock())

    def status(self, name: str) -> dict:
        return {"state": self.state(name), "recent_failures": self._recent_failures(self._tracked(name)),
                "cooldown_seconds_left": round(self.seconds_left(name), 3)}
