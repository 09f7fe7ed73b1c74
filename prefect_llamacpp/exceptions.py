"""Every error this project raises on purpose, in one module.

    LlamaCppError                      base; `transient` says whether waiting and retrying can help
    ├── ConfigurationError             a setting or argument that cannot work (also a ValueError)
    │   └── BlockNotFoundError         no saved `llama.cpp Server` block of that name
    ├── TransportError                 no HTTP answer (transient)
    │   ├── ServerUnreachableError     not sent: connection refused, DNS, no connection in time
    │   ├── ServerTimeoutError         sent; no answer before the deadline
    │   └── ServerDisconnectedError    sent; the connection closed unanswered
    ├── ServerHTTPError                an answer with a status we did not want
    │   ├── ServerLoadingError         503 "Loading model" (transient)
    │   ├── UnauthorizedError          401: key missing or wrong
    │   ├── NotSupportedError          501: endpoint switched off by a server flag (400: no pooling)
    │   └── UnexpectedResponseError    not what llama-server sends (a proxy's HTML page)
    ├── AnswerError                    an answer that cannot be used (`kind`: invalid_response,
    │                                  validation)
    ├── ServerNotReadyError            not ready now or before a deadline; `last_state` says why
    ├── DeadlineExceededError          the health canary missed its first-byte or total deadline
    ├── ModelError                     the served model could not be detected (the cause is kept)
    ├── LaunchError                    a llama-server we start exited or was not ready in time
    └── BatchError                     a batch cannot start or go on; finished work is saved
        ├── BatchAbortedError          stopped mid-run (wrong key, server gone past the deadline)
        ├── NoServerError              no server that can run a line has been usable in time
        ├── BatchPathError             input/output paths unusable (same file, missing input)
        ├── LedgerInUseError           another run holds the output file
        ├── LedgerSettingsError        the run's settings differ from the ledger's
        └── LedgerFormatError          the run asks for another output format than the ledger's

Configuration errors are fixed by the caller and never retried; the others happen at run time.
`transient` is what Prefect task retries and the batch runner decide on. No error ever carries
the API key: messages and `details` hold URLs, status codes and the server's own message, nothing
from request headers. Library errors are mapped with `raise Mapped(...) from exc`, keeping the
cause, except where the cause's text may quote a header. Every error pickles (Prefect stores
a failed run's exception), keyword-only fields and all.
"""

from __future__ import annotations

from typing import Any

# Proxies and gateways answer these while the server is busy, starting or restarting.
TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})


class LlamaCppError(Exception):
    """Base of every error this project raises."""

    transient: bool = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Subclasses take keyword-only arguments, which Exception's own pickling cannot pass.
        return (_restore, (type(self), self.message, self.__dict__))


def _restore(cls: type[LlamaCppError], message: str, state: dict[str, Any]) -> LlamaCppError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class ConfigurationError(LlamaCppError, ValueError):
    """A setting or an argument that cannot work (a bad base URL, a key with a space in it, bad
    server names, a template variable that is not an object): fix it, then run again."""


class BlockNotFoundError(ConfigurationError):
    """No saved `llama.cpp Server` block has the given name."""


class ModelError(LlamaCppError):
    """The served model could not be detected; `__cause__` is the error that stopped it."""

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


class TransportError(LlamaCppError):
    """No HTTP answer came back: the request was not sent, or it was and nothing answered."""

    transient = True


class ServerUnreachableError(TransportError):
    """The request was not sent: connection refused, DNS failure, no connection in time."""


class ServerTimeoutError(TransportError):
    """The request was sent but no answer came before the deadline (the server may still run it)."""


class ServerDisconnectedError(TransportError):
    """The request was sent and the connection closed without an answer: the server crashed,
    was restarted, or a proxy cut the request."""


class ServerHTTPError(LlamaCppError):
    """The server answered with a status we did not want.

    `status_code`, `url`, and `server_message` (the `error.message` llama-server sends) are kept
    as attributes and in `details`. `retry_after` is the `Retry-After` header in seconds, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        url: str,
        server_message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message,
            details={"status_code": status_code, "url": url, "server_message": server_message},
        )
        self.status_code = status_code
        self.url = url
        self.server_message = server_message
        self.retry_after = retry_after
        self.transient = status_code in TRANSIENT_STATUS


class ServerLoadingError(ServerHTTPError):
    """503 "Loading model": the server is up and will be ready once the model is in memory."""


class UnauthorizedError(ServerHTTPError):
    """401: the API key is missing or wrong."""


class NotSupportedError(ServerHTTPError):
    """501: the endpoint is switched off by a server flag (`--no-slots`, no `--metrics`, no
    `--embeddings`); also the 400 of `/v1/embeddings` on a server whose pooling is `none`."""


class UnexpectedResponseError(ServerHTTPError):
    """The answer is not what llama-server sends (e.g. a reverse proxy's HTML page)."""


class DeadlineExceededError(LlamaCppError):
    """A timed probe (the health canary) missed a deadline; `deadline` says which one.

    `deadline` is "first_byte" (no streamed token within `limit_s`) or "total" (the answer did
    not finish within `limit_s`). The request was cancelled. Whether the server is busy or
    wedged is for the caller to find out (see `prefect_llamacpp.canary`).
    """

    transient = True

    def __init__(
        self, message: str, *, deadline: str, limit_s: float, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details={**(details or {}), "deadline": deadline})
        self.deadline = deadline
        self.limit_s = limit_s


class AnswerError(LlamaCppError):
    """The answer is not usable: `kind` is `invalid_response` or `validation`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ServerNotReadyError(LlamaCppError):
    """The server is not ready (now, or before a deadline); `last_state` says what it was doing.
    Transient unless the state needs a fix (a wrong key, an error)."""

    def __init__(
        self,
        message: str,
        *,
        last_state: str,
        details: dict[str, Any] | None = None,
        transient: bool = True,
    ):
        super().__init__(message, details=details)
        self.last_state = last_state
        self.transient = transient


class LaunchError(LlamaCppError):
    """A llama-server this process started exited, or was not ready within `ready_timeout`; the
    message ends with its log's tail. Not transient: the same command fails the same way."""


class BatchError(LlamaCppError):
    """A batch cannot start or go on. Every finished result is already in the ledger."""


class BatchAbortedError(BatchError):
    """The batch stopped mid-run (wrong key, server gone past the deadline); rerun to finish."""


class NoServerError(BatchError):
    """No lane that can run the request has been usable for `ready_timeout`. `whole_fleet` says
    whether that is every lane (the batch stops) or only those serving the line's model;
    `unserved`: no lane serves it at all (a late server joined and does not)."""

    def __init__(self, message: str, *, whole_fleet: bool, unserved: bool = False) -> None:
        super().__init__(message)
        self.whole_fleet = whole_fleet
        self.unserved = unserved


class BatchPathError(BatchError):
    """The input or output path cannot be used (missing input, input and output the same file)."""


class LedgerInUseError(BatchError):
    """Another batch run holds the output file (its ledger); nothing was sent."""


class LedgerSettingsError(BatchError):
    """The run's settings differ from those the ledger was written with; `differences` says how."""

    def __init__(self, message: str, *, differences: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message, details={"differences": list(differences)})
        self.differences = differences


class LedgerFormatError(BatchError):
    """The ledger's lines are in another output format than the run asks for; nothing was sent."""
