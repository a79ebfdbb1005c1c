"""The one error a client of the router sees: an OpenAI error body with an HTTP status, built in one place for
the app's routes, the backends and the batch job."""

from __future__ import annotations

import math

from pydantic import ValidationError


class APIError(Exception):
    """An error the client gets as an OpenAI error body with `status`; `message` says what to change."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error shape, the one body every error of the router and its backends takes."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(error: ValidationError | list[dict]) -> str:
    """The first problem of a failed validation as `field.path: what is wrong` (never the value sent)."""
    problem = (error.errors() if isinstance(error, ValidationError) else error)[0]
    location = [str(part) for part in problem["loc"] if part != "body"]
    message = problem["msg"].removeprefix("Value error, ")
    return f"{'.'.join(location) + ': ' if location else ''}{message}"


def invalid_request(error: ValidationError | list[dict]) -> APIError:
    """The 400 for a failed validation, naming its first field (`param`) and what is wrong with it."""
    problem = (error.errors() if isinstance(error, ValidationError) else error)[0]
    location = [str(part) for part in problem["loc"] if part != "body"]
    return APIError(400, validation_message([problem]), param=location[0] if location else None)
