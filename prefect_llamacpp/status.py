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


class CanaryLatency(BaseModel):
    """The canary's figures, in seconds and tokens per second; None when not measured."""

    ttfb_s: float | None = None  # time to the first streamed token
    total_s: float | None = None  # time to the whole one-token answer
    prompt_tokens_per_s: float | None = None  # server-lifetime average, from /metrics
    predicted_tokens_per_s: float | None = None  # server-lifetime average, from /metrics


class ProviderHealthStatus(BaseModel):
    """The result of a health check. `connected` means the server answered HTTP at all.

    The first fields are the provider contract's; the typed ones after them are what the check
    read (None or empty when it did not get that far); `metadata` keeps anything else.
    """

    connected: bool
    model_detected: bool = False
    model_id: str | None = None
    base_url: str
    provider_type: str = "llamacpp"
    state: ServerState
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    server_status: str | None = Field(None, description="What /health said: ok, loading, ...")
    http_status: int | None = Field(None, description="The status of the answer that failed it")
    # From /props
    total_slots: int | None = None
    n_ctx: int | None = Field(None, description="Context per slot")
    build_info: str | None = None
    model_alias: str | None = None
    model_path: str | None = None
    role: str | None = Field(None, description='"router" for a server in router mode')
    is_sleeping: bool | None = None
    endpoint_slots: bool | None = None
    endpoint_metrics: bool | None = None
    props_error: str | None = Field(None, description="Why /props could not be read")
    # From /v1/models
    models: list[str] = Field(default_factory=list)
    model_aliases: list[str] = Field(default_factory=list)
    router_models: dict[str, str] = Field(
        default_factory=dict, description="Router mode: each model's status (loaded, ...)"
    )
    model_name_not_listed: str | None = Field(
        None, description="The configured model name, when the server does not list it"
    )
    # The canary (None unless one was asked for)
    latency: CanaryLatency | None = None
    canary: str | None = Field(None, description="What happened to the canary, in a few words")
    canary_error: str | None = None
    deadline_missed: str | None = Field(None, description="first_byte or total")
    progress: str | None = Field(None, description="The evidence that told busy from wedged")

    @property
    def is_ready(self) -> bool:
        """Ready to serve now, asleep and woken by the next request, or busy (slow, not stuck)."""
        return self.state in (ServerState.READY, ServerState.SLEEPING, ServerState.BUSY)
