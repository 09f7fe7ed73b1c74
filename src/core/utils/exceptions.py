"""The project's errors: one base, a model error, and the server faults the client reports.

`transient` says whether retrying can help (the server is starting, restarting or overloaded);
Prefect tasks retry on exactly those. No error ever carries the API key: messages and `details`
hold URLs, status codes and the server's own message, nothing from request headers.
"""

from __future__ import annotations

from typing import Any


class LlamaCppError(Exception):
    """Base of every error this project raises."""

    transient: bool = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message


class ModelError(LlamaCppError):
    """The model cannot be found, created or reached; `model_name` and `details` say which and why."""

    def __init__(
        self,
        message: str,
        *,
        model_name: str | None = None,
        details: dict[str, Any] | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, details=details)
        self.model_name = model_name
        self.transient = transient


class ServerUnreachableError(LlamaCppError):
    """No HTTP answer: connection refused, DNS failure or timeout."""

    transient = True


class ServerHTTPError(LlamaCppError):
    """The server answered with a status we did not want.

    `status_code`, `url`, and `server_message` (the `error.message` llama-server sends) are kept
    as attributes and in `details`.
    """

    def __init__(
        self, message: str, *, status_code: int, url: str, server_message: str | None = None
    ) -> None:
        super().__init__(
            message,
            details={"status_code": status_code, "url": url, "server_message": server_message},
        )
        self.status_code = status_code
        self.url = url
        self.server_message = server_message
        self.transient = status_code in (502, 503, 504)


class ServerLoadingError(ServerHTTPError):
    """503 "Loading model": the server is up and will be ready once the model is in memory."""


class UnauthorizedError(ServerHTTPError):
    """401: the API key is missing or wrong."""


class NotSupportedError(ServerHTTPError):
    """501: the endpoint is switched off by a server flag (`--no-slots`, no `--metrics`)."""


class UnexpectedResponseError(ServerHTTPError):
    """The answer is not what llama-server sends (e.g. a reverse proxy's HTML page)."""


class DeadlineExceededError(LlamaCppError):
    """A timed probe (the health canary) missed a deadline; `deadline` says which one.

    `deadline` is "first_byte" (no streamed token within `limit_s`) or "total" (the answer did
    not finish within `limit_s`). The request was cancelled. Whether the server is busy or
    wedged is for the caller to find out (see `src.core.models.canary`).
    """

    transient = True

    def __init__(
        self, message: str, *, deadline: str, limit_s: float, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details={**(details or {}), "deadline": deadline})
        self.deadline = deadline
        self.limit_s = limit_s


class ServerNotReadyError(LlamaCppError):
    """The server did not become ready before the deadline; `last_state` says what it was doing."""

    transient = True

    def __init__(self, message: str, *, last_state: str, details: dict[str, Any] | None = None):
        super().__init__(message, details=details)
        self.last_state = last_state
