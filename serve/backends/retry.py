"""The one retry policy of the project's HTTP clients: what a failed call to an OpenAI-compatible server means.

Both clients follow it: the `OpenAIEndpoint` deployment (a pool backend) and the batch job's answer client.
A failure is either the server's problem, which another try (or, in the router, the next model) may not have,
or the request's own fault, which every try would repeat and which therefore goes back to the caller:

- transient (408, 429, 5xx, timeouts, refused or dropped connections): retried with exponential backoff;
- the server's setup (401, 403, 404: an expired key, a model name wrong in the config): not retried, since the
  same server answers the same way, but still the server's problem, so the router asks the next model;
- any other 4xx (400, 413, 422, ...): the request itself; returned to the caller as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

TRANSIENT_STATUS = frozenset({408, 429})
SETUP_STATUS = frozenset({401, 403, 404})


def is_transient(status: int) -> bool:
    """Another try of the same request on the same server may succeed."""
    return status in TRANSIENT_STATUS or status >= 500


def is_server_problem(status: int) -> bool:
    """The failure lies with the server (or its configuration), not with the request: another model may answer."""
    return is_transient(status) or status in SETUP_STATUS


def is_request_fault(status: int) -> bool:
    """A 4xx that the request itself caused: the caller must change the request."""
    return 400 <= status < 500 and not is_server_problem(status)


# Timeouts, refused connections and connections dropped before the answer: transient.
TRANSIENT_ERRORS = (httpx.TransportError,)


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` further tries after the first, the n-th after `backoff_s * 2**(n-1)` seconds."""

    retries: int = 1
    backoff_s: float = 0.1

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay_s(self, attempt: int) -> float:
        """The wait before try `attempt` (0 is the first try: no wait)."""
        return 0.0 if attempt == 0 else self.backoff_s * 2 ** (attempt - 1)

    def retry_status(self, status: int, attempt: int) -> bool:
        """Whether try `attempt`, answered with `status`, is followed by another."""
        return is_transient(status) and attempt + 1 < self.attempts

    def retry_error(self, attempt: int) -> bool:
        """Whether try `attempt`, which raised one of TRANSIENT_ERRORS, is followed by another."""
        return attempt + 1 < self.attempts
