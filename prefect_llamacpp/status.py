"""What a provider health check reports: a state, not a boolean."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class ServerState(StrEnum):
    READY = "ready"  # /health 200 and the model answered /v1/models
    LOADING = "loading"  # 503 "Loading model": reachable, not ready yet
    SLEEPING = "sleeping"  # unloaded on idle (/props.is_sleeping); the next request reloads it
    UNAUTHORIZED = "unauthorized"  # reachable, the API key is missing or wrong
    UNREACHABLE = "unreachable"  # refused, DNS failure, timeout
    ERROR = "error"  # 5xx, or an answer llama-server would not send
    BUSY = "busy"  # ready, the canary missed its deadline, but the server is making progress
    WEDGED = "wedged"  # /health ok, the canary missed its deadline or failed, nothing progresses


class ProviderHealthStatus(BaseModel):
    """The result of a health check. `connected` means the server answered HTTP at all."""

    connected: bool
    model_detected: bool = False
    model_id: str | None = None
    base_url: str
    provider_type: str = "llamacpp"
    state: ServerState
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None

    @property
    def is_ready(self) -> bool:
        """Ready to serve now, asleep and woken by the next request, or busy (slow, not stuck)."""
        return self.state in (ServerState.READY, ServerState.SLEEPING, ServerState.BUSY)
