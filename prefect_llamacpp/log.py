"""Keyword-context logging on top of stdlib `logging`, so Prefect run logs can capture it.

    logger = get_logger_with_context(server="http://gpu-1:8080")
    logger.info("Detected model", model_id="qwen3-8b")
    # -> "Detected model server=http://gpu-1:8080 model_id=qwen3-8b"

All loggers live under `prefect_llamacpp`; add that name to Prefect's
`PREFECT_LOGGING_EXTRA_LOGGERS` to see these lines in flow-run logs.
"""

from __future__ import annotations

import logging
from typing import Any

ROOT_LOGGER_NAME = "prefect_llamacpp"


class ContextLogger:
    """A stdlib logger that appends `key=value` context to every message.

    The context also travels as `record.llamacpp_context` for structured handlers.
    """

    def __init__(self, logger: logging.Logger, context: dict[str, Any]) -> None:
        self.logger = logger
        self.context = context

    def bind(self, **context: Any) -> ContextLogger:
        return ContextLogger(self.logger, {**self.context, **context})

    def log(self, level: int, message: str, /, exc_info: Any = None, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        context = {**self.context, **fields}
        suffix = " ".join(f"{key}={value}" for key, value in context.items() if value is not None)
        self.logger.log(
            level,
            f"{message} {suffix}" if suffix else message,
            exc_info=exc_info,
            extra={"llamacpp_context": context},
            stacklevel=3,
        )

    def debug(self, message: str, /, **fields: Any) -> None:
        self.log(logging.DEBUG, message, **fields)

    def info(self, message: str, /, **fields: Any) -> None:
        self.log(logging.INFO, message, **fields)

    def warning(self, message: str, /, **fields: Any) -> None:
        self.log(logging.WARNING, message, **fields)

    def error(self, message: str, /, **fields: Any) -> None:
        self.log(logging.ERROR, message, **fields)

    def exception(self, message: str, /, **fields: Any) -> None:
        self.log(logging.ERROR, message, exc_info=True, **fields)


def get_logger_with_context(name: str | None = None, **context: Any) -> ContextLogger:
    """A logger named `prefect_llamacpp[.name]` that adds `context` to every line."""
    full_name = f"{ROOT_LOGGER_NAME}.{name}" if name else ROOT_LOGGER_NAME
    return ContextLogger(logging.getLogger(full_name), context)
