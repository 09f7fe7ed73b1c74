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


# The chat_template_kwargs key that llama-server also reads itself to switch reasoning on/off.
THINKING_SWITCH = "enable_thinking"


class ServerCapabilities(BaseModel):
    """What the served model's chat template and the server support (from `/props`)."""

    tool_calls: bool = Field(
        False,
        description="The template renders tool calls (chat_template_caps.supports_tool_calls)",
    )
    thinking_switch: bool = Field(
        False, description="The template reads enable_thinking: thinking can be turned on and off"
    )
    reasoning: bool = Field(
        False, description="The template has a reasoning section (<think>...</think>)"
    )
    vision: bool = False
    audio: bool = False
    n_ctx: int | None = Field(None, description="Context per slot")
    from_template: bool = Field(
        True, description="False when /props said nothing about the template (an old server)"
    )

    @classmethod
    def from_props(cls, props: Any) -> ServerCapabilities:
        """From a `/props` answer; anything but an object says nothing (`from_template` False)."""
        if not isinstance(props, dict):
            return cls(from_template=False)
        caps = props.get("chat_template_caps")
        template = props.get("chat_template")
        template = template if isinstance(template, str) else ""
        modalities = props.get("modalities")
        modalities = modalities if isinstance(modalities, dict) else {}
        generation = props.get("default_generation_settings")
        n_ctx = generation.get("n_ctx") if isinstance(generation, dict) else None
        return cls(
            tool_calls=isinstance(caps, dict) and caps.get("supports_tool_calls") is True,
            thinking_switch=THINKING_SWITCH in template,
            reasoning="<think>" in template or THINKING_SWITCH in template,
            vision=modalities.get("vision") is True,
            audio=modalities.get("audio") is True,
            n_ctx=n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) else None,
            from_template=isinstance(caps, dict),
        )

    def summary(self) -> str:
        """One line for a report: `tools, thinking switch, vision; n_ctx 4096`."""
        found = [
            name
            for name, present in (
                ("tools", self.tool_calls),
                ("thinking switch", self.thinking_switch),
                ("reasoning", self.reasoning and not self.thinking_switch),
                ("vision", self.vision),
                ("audio", self.audio),
            )
            if present
        ]
        text = ", ".join(found) or "text only"
        return f"{text}; n_ctx {self.n_ctx}" if self.n_ctx else text


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
    capabilities: ServerCapabilities | None = Field(
        None, description="What the chat template and the server support (from /props)"
    )
    latency: CanaryLatency | None = None
    canary: str | None = Field(None, description="What happened to the canary, in a few words")
    canary_error: str | None = None
    deadline_missed: str | None = Field(None, description="first_byte or total")
    progress: str | None = Field(None, description="The evidence that told busy from wedged")
    structured_output: str | None = Field(
        None, description="The JSON-schema canary: enforced, not enforced, not checked: why"
    )

    @property
    def is_ready(self) -> bool:
        """Ready to serve now, asleep and woken by the next request, or busy (slow, not stuck)."""
        return self.state in (ServerState.READY, ServerState.SLEEPING, ServerState.BUSY)
