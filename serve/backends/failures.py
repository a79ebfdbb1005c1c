"""What a backend's failure means for the request: hand it to the next model, or give it back to the client.

Clients see a model name and a short reason; what the upstream said, and where it lives, goes to the log with
the request id. The one exception is an upstream's refusal of the request itself (a bad parameter, a prompt
too long for the model): its message is what the client must act on, so it is passed on, without URLs.
"""

from __future__ import annotations

import re

from serve.backends.retry import is_request_fault
from serve.errors import APIError

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
MESSAGE_CHARS = 300  # of an upstream's refusal, passed to the client


# `type`s of the error bodies a backend deployment yields for a call that got no HTTP answer at all.
UNREACHABLE, TIMED_OUT, DROPPED = "backend_unreachable", "backend_timeout", "backend_connection_dropped"
UNREADABLE = "backend_unreadable_answer"  # an answer that is not JSON
_REASONS = {UNREACHABLE: "unreachable", TIMED_OUT: "timed out", DROPPED: "connection dropped", UNREADABLE: "unreadable answer"}


class BackendFailure(Exception):
    """The backend could not answer (down, timed out, misconfigured, 5xx): the next model of the ranking should.

    `reason` is short and safe to show a client; `detail` (upstream text, URLs) is for the log only."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def without_urls(text: str) -> str:
    return _URL.sub("<url>", text)


def _status(code) -> int:
    if isinstance(code, int):
        return code
    return int(code) if isinstance(code, str) and code.isdigit() else 500


def classify(error: dict) -> Exception:
    """An OpenAI error body from a backend (its `code` the HTTP status) as the exception the ingress acts on:
    APIError for a refusal of the request itself, BackendFailure for everything that is the server's problem."""
    status = _status(error.get("code"))
    message = str(error.get("message") or "")
    if is_request_fault(status):
        return APIError(status, without_urls(message)[:MESSAGE_CHARS] or f"the request was refused (HTTP {status})",
                        type=error.get("type") or "invalid_request_error", param=error.get("param"))
    return BackendFailure(_REASONS.get(error.get("type"), f"HTTP {status}"), detail=message)


def describe(error: BaseException) -> str:
    """One line naming an exception (a RayTaskError names what the replica raised), for the log."""
    error = getattr(error, "cause", None) or error
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:500] if lines else ''}"
