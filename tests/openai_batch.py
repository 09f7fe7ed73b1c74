"""OpenAI's Batch output line, as a strict model: the SDK has types for the bodies, none for the line.

From OpenAI's batch guide: `{"id", "custom_id", "response": {"status_code", "request_id", "body"} |
null, "error": {"code", "message"} | null}`. Extra top-level keys are allowed (readers ignore them);
inside `response` and `error` nothing else is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class OpenAIBatchResponse(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    status_code: int
    request_id: str
    body: dict[str, Any]


class OpenAIBatchError(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    code: str
    message: str


class OpenAIBatchOutputLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    id: str
    custom_id: str
    response: OpenAIBatchResponse | None
    error: OpenAIBatchError | None


def read_openai_lines(path: Path) -> list[OpenAIBatchOutputLine]:
    """Every line of `path`, each validated (raises on the first that does not fit)."""
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        line = OpenAIBatchOutputLine.model_validate(json.loads(text))
        assert line.id.startswith("batch_req_")
        assert line.response is None or line.response.request_id.startswith("req_")
        lines.append(line)
    return lines
