"""llama.cpp as a pydantic-ai provider, plus health checks and model detection.

status = await llamacpp_health_check()          # never raises for a server fault
model = await create_llamacpp_model_async()     # raises ServerNotReadyError unless ready
agent = Agent(model)                            # a LlamaCppModel: pydantic-ai's OpenAIChatModel,
                                                # its profile read from the server's /props
agent.run_sync("Hi", model_settings=llamacpp_model_settings(
    chat_template_kwargs={"enable_thinking": False}))
embedder = Embedder(create_llamacpp_embedding_model())  # server started with --embeddings
"""

from __future__ import annotations

import functools
import os
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, cast

from openai import AsyncOpenAI
from pydantic import SecretStr, TypeAdapter, ValidationError
from pydantic_ai.exceptions import (
    ModelConnectionError,
    ModelHTTPError,
    ModelUnavailableError,
    UserError,
)
from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelResponse,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIChatModelSettings
from pydantic_ai.profiles import ModelProfile, merge_profile
from pydantic_ai.profiles.deepseek import deepseek_model_profile
from pydantic_ai.profiles.google import google_model_profile
from pydantic_ai.profiles.meta import meta_model_profile
from pydantic_ai.profiles.mistral import mistral_model_profile
from pydantic_ai.profiles.openai import OpenAIJsonSchemaTransformer, OpenAIModelProfile
from pydantic_ai.profiles.qwen import qwen_model_profile
from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider
from pydantic_ai.settings import ModelSettings

from prefect_llamacpp.canary import CanaryOptions, run_canary
from prefect_llamacpp.client import LlamaCppClient, router_model_status
from prefect_llamacpp.config import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL_NAME,
    LlamaCppSettings,
    get_settings,
)
from prefect_llamacpp.exceptions import (
    TRANSIENT_STATUS,
    ConfigurationError,
    LlamaCppError,
    ModelError,
    ServerHTTPError,
    ServerLoadingError,
    ServerNotReadyError,
    ServerTimeoutError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.server_url import parse_server_url
from prefect_llamacpp.status import (
    THINKING_SWITCH,
    CanaryLatency,
    ProviderHealthStatus,
    ServerCapabilities,
    ServerState,
)

if TYPE_CHECKING:
    from pydantic_ai.embeddings import EmbeddingSettings
    from pydantic_ai.embeddings.openai import OpenAIEmbeddingModel

# pydantic-ai's OpenAI client insists on a key; llama-server without --api-key ignores it.
PLACEHOLDER_API_KEY = "llamacpp-no-key"

_FAMILY_PROFILES = {
    "llama": meta_model_profile,
    "gemma": google_model_profile,
    "qwen": qwen_model_profile,
    "qwq": qwen_model_profile,
    "deepseek": deepseek_model_profile,
    "mistral": mistral_model_profile,
}

logger = get_logger_with_context("provider")


def llamacpp_model_profile(model_name: str) -> ModelProfile:
    """What llama-server supports for `model_name` (a GGUF file name or `--alias`).

    `json_schema` response formats are compiled to a grammar, so native structured output is
    enforced even for small models; the schema is also put in the instructions so the model
    knows what it is writing. Tools need `--jinja`, on by default in current servers.
    """
    bare = PurePath(model_name.lower()).name
    family = next(
        (profile(bare) for prefix, profile in _FAMILY_PROFILES.items() if bare.startswith(prefix)),
        None,
    )
    return merge_profile(
        OpenAIModelProfile(json_schema_transformer=OpenAIJsonSchemaTransformer),
        family,
        OpenAIModelProfile(
            supports_json_schema_output=True,
            supports_json_object_output=True,
            native_output_requires_schema_in_instructions=True,
            openai_supports_strict_tool_definition=False,
            openai_chat_supports_document_input=False,
            supports_tool_return_schema=False,
            # llama-server puts a reasoning model's thoughts in `reasoning_content` (its default
            # --reasoning-format) and reads that field back from assistant messages.
            openai_chat_thinking_field="reasoning_content",
            openai_chat_send_back_thinking_parts="field",
        ),
    )


def server_model_profile(
    capabilities: ServerCapabilities, name_profile: ModelProfile | None
) -> ModelProfile:
    """`name_profile` (what the model's name suggests) corrected by what the server said.

    - Tools only where the template renders tool calls; structured output then goes through an
      output tool (a JSON-schema grammar would block the tool calls, pydantic-ai #6552), and
      through the server's grammar (native) where it cannot.
    - pydantic-ai's `thinking` setting where the template takes `enable_thinking` (the model
      sends it as `chat_template_kwargs`), nowhere else.
    - Images and audio as the server's `modalities` say; the context window from `n_ctx`.
    """
    if not capabilities.from_template:
        return name_profile or OpenAIModelProfile()
    return merge_profile(
        name_profile,
        OpenAIModelProfile(
            supports_tools=capabilities.tool_calls,
            default_structured_output_mode="tool" if capabilities.tool_calls else "native",
            supports_thinking=capabilities.thinking_switch,
            # Only the template decides, not the model's name: without the switch nothing is
            # sent for `thinking`.
            thinking_always_enabled=False,
            thinking_enabled_by_default=False,
            supports_image_input=capabilities.vision,
            supports_audio_input=capabilities.audio,
            **({"context_window": capabilities.n_ctx} if capabilities.n_ctx else {}),
        ),
    )


class LlamaCppModelSettings(OpenAIChatModelSettings, total=False):
    """Model settings for `LlamaCppModel`; every field is `llamacpp_`-prefixed, so they merge
    with pydantic-ai's own settings. A plain `OpenAIChatModel` (`create_llamacpp_model` without
    capabilities) does not read them: give it `llamacpp_model_settings(...)`."""

    llamacpp_chat_template_kwargs: dict[str, Any]
    """Variables for the model's chat template, sent as llama-server's `chat_template_kwargs`:
    `{"enable_thinking": False}` turns a Qwen3 model's thinking off. Replaces any
    `chat_template_kwargs` in `extra_body`."""


def llamacpp_model_settings(
    *, chat_template_kwargs: dict[str, Any] | None = None, **settings: Any
) -> OpenAIChatModelSettings:
    """pydantic-ai model settings (any `OpenAIChatModelSettings` field in `settings`) that also
    send llama-server's `chat_template_kwargs`, inside `extra_body`, where pydantic-ai's own
    `OpenAIChatModel` sends them. Raises `ConfigurationError` for kwargs that are not a JSON object.

    pydantic-ai merges settings one level deep: a run's own `extra_body` replaces this one
    whole. To keep the kwargs through such merges, use `LlamaCppModel` with
    `LlamaCppModelSettings`."""
    result = cast(dict[str, Any], dict(settings))
    if chat_template_kwargs is not None:
        result["extra_body"] = _with_template_kwargs(result.get("extra_body"), chat_template_kwargs)
    return cast(OpenAIChatModelSettings, result)


def _with_template_kwargs(extra_body: Any, chat_template_kwargs: Any) -> dict[str, Any]:
    """`extra_body` with llama-server's `chat_template_kwargs` set (checked)."""
    kwargs = checked_chat_template_kwargs(chat_template_kwargs)
    return {**(extra_body or {}), "chat_template_kwargs": kwargs}


def checked_chat_template_kwargs(value: Any) -> dict[str, Any]:
    """`value` if it can be sent as `chat_template_kwargs`; `ConfigurationError` naming the fix if not."""
    # llama-server silently ignores a chat_template_kwargs that is not an object.
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ConfigurationError(
            "chat_template_kwargs must be a JSON object with string keys, such as "
            f'{{"enable_thinking": false}}; got {type(value).__name__}'
        )
    return value


class LlamaCppModel(OpenAIChatModel):
    """pydantic-ai's `OpenAIChatModel` for llama-server, fitted to what the server said it can do.

    With `capabilities` (what `create_llamacpp_model_async` reads from `/props`), the profile
    comes from the server (`server_model_profile`): tools only where the chat template renders
    tool calls, pydantic-ai's `thinking` setting sent as `chat_template_kwargs.enable_thinking`
    where the template reads it. A request the server would get wrong is refused before it is
    sent (`UserError` saying why and what to do). `LlamaCppModelSettings` fields are sent too,
    so `llamacpp_chat_template_kwargs` survives a run's own `extra_body`."""

    def __init__(
        self,
        model_name: str,
        *,
        provider: LlamaCppProvider | OpenAICompatibleProvider,
        capabilities: ServerCapabilities | None = None,
        **kwargs: Any,
    ) -> None:
        self.capabilities = capabilities
        if capabilities is not None and "profile" not in kwargs:
            kwargs["profile"] = server_model_profile(
                capabilities, provider.model_profile(model_name)
            )
        super().__init__(model_name, provider=provider, **kwargs)

    def prepare_request(
        self,
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> tuple[ModelSettings | None, ModelRequestParameters]:
        try:
            merged, parameters = super().prepare_request(model_settings, model_request_parameters)
        except UserError as exc:
            if "Tool output is not supported" in str(exc) and self._no_tool_calls():
                raise UserError(
                    "ToolOutput needs tool calls, and this llama-server's chat template cannot "
                    "render them: use NativeOutput (the grammar; the default here) or "
                    "PromptedOutput"
                ) from None
            raise
        self._refuse_what_the_server_gets_wrong(parameters)
        # A copy: the merged settings may be the model's own dict, reused by the next request.
        settings = cast(dict[str, Any], dict(merged or {}))
        extra_body = settings.get("extra_body")
        given = extra_body.get("chat_template_kwargs") if isinstance(extra_body, dict) else None
        # The caller's own kwargs: LlamaCppModelSettings' replace those in extra_body (as on the
        # batch path); `thinking` below only adds to them.
        own = settings.pop("llamacpp_chat_template_kwargs", None)
        chosen = own if own is not None else given
        kwargs = dict(checked_chat_template_kwargs(chosen)) if chosen is not None else {}
        if parameters.thinking is not None:
            # The template reads enable_thinking (else pydantic-ai would not have passed
            # `thinking` on): send it there, never as an OpenAI reasoning_effort llama-server
            # does not read. The caller's own kwargs win.
            kwargs.setdefault(THINKING_SWITCH, parameters.thinking is not False)
            parameters = replace(parameters, thinking=None)
        if kwargs:
            settings["extra_body"] = _with_template_kwargs(settings.get("extra_body"), kwargs)
        return (cast(ModelSettings, settings) if settings else merged), parameters

    def _no_tool_calls(self) -> bool:
        """The server said its template cannot render tool calls (not merely: said nothing)."""
        known = self.capabilities is not None and self.capabilities.from_template
        return known and not self.capabilities.tool_calls

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        self._refuse_what_the_template_cannot_render(messages)
        return await super().request(messages, model_settings, model_request_parameters)

    @asynccontextmanager
    async def request_stream(self, messages: list[ModelMessage], *args: Any, **kwargs: Any):
        self._refuse_what_the_template_cannot_render(messages)
        async with super().request_stream(messages, *args, **kwargs) as stream:
            yield stream

    def _refuse_what_the_template_cannot_render(self, messages: list[ModelMessage]) -> None:
        """Images or audio the server cannot read, tool calls its template cannot render (it
        would drop them without a word, or fail each retry alike)."""
        if self.capabilities is None or not self.capabilities.from_template:
            return
        for message in messages:
            for part in message.parts:
                if isinstance(part, ToolCallPart | ToolReturnPart) and self._no_tool_calls():
                    raise UserError(
                        "the message history holds tool calls, and this llama-server's chat "
                        "template cannot render them (it would drop them): continue the "
                        "conversation on a server whose template supports tools"
                    )
                contents = part.content if isinstance(part, UserPromptPart) else None
                for item in contents if isinstance(contents, list) else []:
                    for kind, allowed in (
                        ("image", self.capabilities.vision),
                        ("audio", self.capabilities.audio),
                    ):
                        if getattr(item, "kind", None) == f"{kind}-url" or (
                            isinstance(item, BinaryContent) and getattr(item, f"is_{kind}")
                        ):
                            if not allowed:
                                raise UserError(
                                    f"this llama-server cannot read {kind} input (/props "
                                    f"modalities.{'vision' if kind == 'image' else 'audio'} is "
                                    "false): start it with a multimodal projector (--mmproj) "
                                    "for a model that has one"
                                )

    def _refuse_what_the_server_gets_wrong(self, parameters: ModelRequestParameters) -> None:
        if not parameters.function_tools:
            return
        if self._no_tool_calls():
            raise UserError(
                "this llama-server's chat template cannot render tool calls "
                "(/props chat_template_caps.supports_tool_calls is false), so the model would "
                "never call the agent's tools: serve a model whose template supports tools, or "
                "give llama-server one with --chat-template-file"
            )
        if parameters.output_mode == "native":
            raise UserError(
                "NativeOutput with tools: llama-server turns the JSON schema into a grammar for "
                "the whole answer, which leaves the model no way to call a tool (pydantic-ai "
                "#6552). Use ToolOutput (the default on this server) or PromptedOutput"
            )


class LlamaCppProvider(OpenAICompatibleProvider):
    """pydantic-ai provider for a llama.cpp `llama-server`.

    `base_url` may be the server root or its `/v1` URL; it falls back to `LLAMACPP_BASE_URL`, then
    to http://localhost:8080/v1. `api_key` falls back to `LLAMACPP_API_KEY`; without one a
    placeholder is sent, which a server started without `--api-key` ignores. Pass `http_client`
    to size the connection pool yourself (batch work should), or a ready `openai_client`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        http_client: Any | None = None,
        openai_client: AsyncOpenAI | None = None,
    ) -> None:
        if openai_client is not None:
            if base_url or api_key or http_client:
                raise UserError(
                    "Pass either openai_client or base_url/api_key/http_client, not both"
                )
            super().__init__(
                "llamacpp", openai_client=openai_client, profile=llamacpp_model_profile
            )
            return
        url = base_url or os.getenv("LLAMACPP_BASE_URL") or DEFAULT_BASE_URL
        key = api_key or os.getenv("LLAMACPP_API_KEY") or PLACEHOLDER_API_KEY
        super().__init__(
            "llamacpp",
            base_url=parse_server_url(url).openai_base,
            api_key=key,
            http_client=http_client,
            profile=llamacpp_model_profile,
        )

    @property
    def name(self) -> str:
        return "llamacpp"

    @staticmethod
    def model_profile(model_name: str) -> ModelProfile | None:
        return llamacpp_model_profile(model_name)

    def __repr__(self) -> str:
        return f"LlamaCppProvider(base_url={self.base_url!r})"


def is_transient_model_error(exc: BaseException) -> bool:
    """Whether a failed model call (pydantic-ai's error, or ours) is worth sending again: the
    server was unreachable, timed out, was loading or overloaded (408, 429, 502, 503, 504). A
    refused request or a failure of the answer itself (500, a bad schema) is not."""
    for error in (exc, exc.__cause__):
        if isinstance(error, LlamaCppError):
            return bool(error.transient)
        if isinstance(error, ModelHTTPError):
            return error.status_code in TRANSIENT_STATUS
        if isinstance(error, ModelConnectionError | ModelUnavailableError):
            return True
    return False


def create_llamacpp_model(
    model_name: str | None = None,
    settings: LlamaCppSettings | None = None,
    *,
    http_client: Any | None = None,
    capabilities: ServerCapabilities | None = None,
) -> OpenAIChatModel:
    """pydantic-ai's `OpenAIChatModel` for the server in `settings` (default: env), with
    `LlamaCppProvider`, its profile from the model's name; with `capabilities` (see
    `create_llamacpp_model_async`, which reads them from the server) a `LlamaCppModel` whose
    profile comes from the server instead.

    Needs no server to build. A reasoning model's `reasoning_content` comes back as
    `ThinkingPart`s; chat template variables go in model settings built with
    `llamacpp_model_settings(chat_template_kwargs=...)`.
    Raises `ConfigurationError` when the base URL is invalid.
    """
    settings = settings or get_settings().llamacpp
    name = model_name or settings.model_name or DEFAULT_MODEL_NAME
    provider = _provider_for(settings, http_client)
    if capabilities is None:
        # pydantic-ai's own class, as the seed's programs expect (`type(m).__name__`).
        return OpenAIChatModel(name, provider=provider)
    return LlamaCppModel(name, provider=provider, capabilities=capabilities)


def create_llamacpp_embedding_model(
    model_name: str | None = None,
    settings: LlamaCppSettings | None = None,
    *,
    http_client: Any | None = None,
    embedding_settings: EmbeddingSettings | None = None,
) -> OpenAIEmbeddingModel:
    """An embedding model for `/v1/embeddings` of the server in `settings` (default: env).

    Use it with `pydantic_ai.Embedder`. Needs no server to build; the server must run with
    `--embeddings` (and a pooling type: the model's own, or `--pooling mean`), else each call
    fails with HTTP 501 or 400 (`LlamaCppClient.check_embeddings` says which before you send
    work). llama-server ignores `dimensions`: vectors have the model's `n_embd`. Raises
    `ConfigurationError` when the base URL is invalid.
    """
    # Imported here: it brings tiktoken, which chat-only programs never need.
    from pydantic_ai.embeddings.openai import OpenAIEmbeddingModel

    settings = settings or get_settings().llamacpp
    name = model_name or settings.model_name or DEFAULT_MODEL_NAME
    return OpenAIEmbeddingModel(
        name, provider=_provider_for(settings, http_client), settings=embedding_settings
    )


def _provider_for(settings: LlamaCppSettings, http_client: Any | None) -> LlamaCppProvider:
    return LlamaCppProvider(
        base_url=settings.server_url.openai_base,
        api_key=settings.api_key_value() or PLACEHOLDER_API_KEY,
        http_client=http_client,
    )


async def create_llamacpp_model_async(
    model_name: str | None = None,
    settings: LlamaCppSettings | None = None,
    auto_detect: bool = True,
    test_connection: bool = True,
    *,
    http_client: Any | None = None,
) -> LlamaCppModel:
    """Like `create_llamacpp_model`, but checks the server first, names the model it serves and
    fits the model's profile to what the server's `/props` says (`server_model_profile`: tools,
    thinking, images, context), read once here.

    Raises `ServerNotReadyError` saying the server's state (loading, unauthorized, unreachable, ...) when
    `test_connection` is set and the server is not ready. A sleeping server counts as ready.
    """
    settings = settings or get_settings().llamacpp
    name = model_name or settings.model_name
    if test_connection:
        status = await llamacpp_health_check(settings)
        if not status.is_ready:
            raise ServerNotReadyError(
                f"llama-server is not ready ({status.state}): {status.error}",
                last_state=str(status.state),
                details={"state": str(status.state), "base_url": status.base_url},
                transient=status.state in (ServerState.LOADING, ServerState.UNREACHABLE),
            )
        if auto_detect and not name:
            name = status.model_id
        # /props unread (a proxy that does not forward it): the name's profile, our checks.
        capabilities = status.capabilities or ServerCapabilities(from_template=False)
    else:
        capabilities = ServerCapabilities(from_template=False)
        if auto_detect and not name:
            name = await detect_llamacpp_model(
                settings.base_url, settings.timeout, settings.api_key
            )
    logger.info("Created llama.cpp model", model_id=name, server=settings.server_url.root)
    return create_llamacpp_model(name, settings, http_client=http_client, capabilities=capabilities)


async def detect_llamacpp_model(
    base_url: str,
    timeout: float = 10,
    api_key: str | SecretStr | None = None,
) -> str | None:
    """The id of the model the server serves (first of `/v1/models`), or None if it lists none.

    `api_key` defaults to `LLAMACPP_API_KEY`. Raises `ModelError` (its cause the client's error) with `details` (status code,
    URL) when the server cannot be reached or answers with an error.
    """
    if api_key is None:
        api_key = get_settings().llamacpp.api_key
    async with LlamaCppClient(base_url, timeout=timeout, api_key=api_key) as client:
        try:
            model_id = await client.served_model_id()
        except LlamaCppError as exc:
            raise ModelError(
                f"Could not detect the llama.cpp model: {exc}",
                details=exc.details,
                transient=exc.transient,
            ) from exc
    logger.info("Detected model", model_id=model_id, server=client.base_url)
    return model_id


async def llamacpp_health_check(
    settings: LlamaCppSettings | None = None, *, canary: bool | CanaryOptions = False
) -> ProviderHealthStatus:
    """Ask the server in `settings` (default: env) what state it is in. Never raises for a fault.

    `canary=True` (or `CanaryOptions(...)` for other deadlines) also sends a one-token
    completion to a ready server and reports its `latency`, and `busy` or `wedged`
    when it misses a deadline (see `prefect_llamacpp.canary`). Off by default: without it the
    check sends no completion at all.
    """
    settings = settings or get_settings().llamacpp
    options = CanaryOptions() if canary is True else (canary or None)
    try:
        server_url = settings.server_url
    except ConfigurationError as exc:
        return ProviderHealthStatus(
            connected=False, base_url=settings.base_url, state=ServerState.ERROR, error=str(exc)
        )
    async with LlamaCppClient(
        server_url.root, timeout=settings.timeout, api_key=settings.api_key
    ) as client:
        return await read_server_status(client, model_name=settings.model_name, canary=options)


async def read_server_status(
    client: LlamaCppClient, model_name: str | None = None, canary: CanaryOptions | None = None
) -> ProviderHealthStatus:
    """The health check on an open client (see `_read_server_status`); an answer of a shape
    llama-server never sends is reported as state `error`, never raised."""
    try:
        return await _read_server_status(client, model_name, canary)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        logger.warning("Unreadable answer in a health check", error=repr(exc))
        return ProviderHealthStatus(
            connected=True,
            base_url=client.openai_base_url,
            state=ServerState.ERROR,
            error=f"an answer is not what llama-server sends ({type(exc).__name__}); "
            "is base_url a llama-server, or a proxy in front of one?",
        )


async def _read_server_status(
    client: LlamaCppClient, model_name: str | None, canary: CanaryOptions | None
) -> ProviderHealthStatus:
    """The health check on an open client: `/health`, then `/props`, then `/v1/models`.

    Reads `/props` (which does not wake a sleeping server) and never `/slots` (which does).
    With `canary`, a ready server then gets the one-token canary; a sleeping one never does,
    and in router mode only a loaded model does. `/slots` is read only when the canary missed
    its deadline and `/metrics` is off.
    """
    status = _HealthReport(client.openai_base_url)
    if canary is not None:
        status.fields["latency"] = CanaryLatency()
    try:
        health = await client.get_health()
        status.fields["server_status"] = health.get("status") if isinstance(health, dict) else None
    except UnauthorizedError:
        # --api-prefix with --api-key makes /health answer 401: the server is up, go on with the key.
        status.fields["server_status"] = "unauthorized"
    except ServerTimeoutError as exc:
        # Accepted, never answered. llama-server answers /health from its HTTP thread at once,
        # loading or generating: a process that does not is stopped or stuck.
        return status.build(
            ServerState.WEDGED,
            error=f"{exc}; it accepted the connection, so the process is stopped or stuck",
        )
    except LlamaCppError as exc:
        return status.from_error(exc)

    try:
        props = await client.get_props()
        if not isinstance(props, dict):
            raise UnexpectedResponseError(
                "/props is not a JSON object", status_code=200, url=client.base_url + "/props"
            )
        status.fields.update(summarize_props(props))
    except (UnauthorizedError, ServerLoadingError, TransportError) as exc:
        return status.from_error(exc)
    except LlamaCppError as exc:
        # A proxy may not forward /props; the check can still answer from /v1/models.
        props = {}
        status.fields["props_error"] = str(exc)

    if props.get("is_sleeping"):
        # /v1/models would be served, but sleeping is the state to report; props names the model.
        model_id = _text(props.get("model_alias")) or _file_name(_text(props.get("model_path")))
        status.skip_canary("the server is asleep, and a completion would wake it")
        return status.build(ServerState.SLEEPING, model_id=model_id)

    try:
        models = await client.list_models()
    except LlamaCppError as exc:
        return status.from_error(exc)
    # Only the entries llama-server would send: an odd one (a proxy's) is passed over.
    models = [entry for entry in models if isinstance(entry, dict) and _text(entry.get("id"))]
    ids = [entry["id"] for entry in models]
    status.fields["models"] = ids
    aliases = [alias for entry in models for alias in _texts(entry.get("aliases"))]
    if aliases:
        status.fields["model_aliases"] = aliases

    if props.get("role") == "router":
        statuses = {entry["id"]: router_model_status(entry) for entry in models}
        status.fields["router_models"] = statuses
        loaded = [model for model, value in statuses.items() if value == "loaded"]
        chosen = model_name if model_name in loaded else (loaded[0] if loaded else None)
        if chosen is None:
            status.skip_canary("no model is loaded, and a check never loads one")
            return status.build(ServerState.READY)
        try:  # the router's /props says nothing of a model's template; the model's own does
            status.fields["capabilities"] = ServerCapabilities.from_props(
                await client.get_props(chosen)  # autoload=false: never loads it
            )
        except LlamaCppError as exc:
            logger.warning("No /props for the router's model", model=chosen, error=str(exc))
        return await status.ready(client, chosen, canary, router=True)

    if not ids:
        return status.build(ServerState.ERROR, error="the server lists no model in /v1/models")
    if model_name and not _names_model(models, model_name):
        # Single-model servers answer any `model`, so this is a warning, not a failure.
        status.fields["model_name_not_listed"] = model_name
        logger.warning("Configured model not listed", model_name=model_name, served=ids[0])
    return await status.ready(client, ids[0], canary)


def summarize_props(props: dict[str, Any]) -> dict[str, Any]:
    """The `/props` fields a health report keeps."""
    generation = props.get("default_generation_settings") or {}
    summary = {
        "total_slots": props.get("total_slots"),
        "is_sleeping": props.get("is_sleeping"),
        "build_info": props.get("build_info"),
        "n_ctx": generation.get("n_ctx") if isinstance(generation, dict) else None,
        "model_alias": props.get("model_alias"),
        "model_path": props.get("model_path"),
        "role": props.get("role"),
        "endpoint_slots": props.get("endpoint_slots"),
        "endpoint_metrics": props.get("endpoint_metrics"),
        "capabilities": ServerCapabilities.from_props(props),
    }
    return {key: value for key, value in summary.items() if value is not None}


@functools.cache
def _field_adapter(name: str) -> TypeAdapter:
    return TypeAdapter(ProviderHealthStatus.model_fields[name].annotation)


class _HealthReport:
    """Collects what the check reads (`ProviderHealthStatus` fields, and anything else as
    `metadata`) and turns faults into states."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.fields: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}

    def build(
        self,
        state: ServerState,
        *,
        model_id: str | None = None,
        error: str | None = None,
        connected: bool = True,
    ) -> ProviderHealthStatus:
        return ProviderHealthStatus(
            connected=connected,
            model_detected=bool(model_id),
            model_id=model_id,
            base_url=self.base_url,
            state=state,
            metadata=self.metadata,
            error=error,
            **self._typed_fields(),
        )

    def _typed_fields(self) -> dict[str, Any]:
        """The fields whose values fit their types; an odd value (a proxy's, an older
        server's) goes to `metadata` as it came, so a check never fails on it."""
        typed = {}
        for name, value in self.fields.items():
            try:
                typed[name] = _field_adapter(name).validate_python(value)
            except ValidationError:
                self.metadata[name] = value
        return typed

    async def ready(
        self,
        client: LlamaCppClient,
        model_id: str,
        canary: CanaryOptions | None,
        *,
        router: bool = False,
    ) -> ProviderHealthStatus:
        """READY, or what the canary found instead when one is asked for."""
        if canary is None:
            return self.build(ServerState.READY, model_id=model_id)
        try:
            outcome = await run_canary(
                client,
                canary,
                model=model_id,
                # Router props say nothing about the child's endpoints: try, fall back.
                metrics=router or bool(self.fields.get("endpoint_metrics")),
                slots=router or self.fields.get("endpoint_slots") is not False,
                router=router,
            )
        except LlamaCppError as exc:  # gone, restarted or locked between the reads
            return self.from_error(exc)
        self.fields["latency"] = outcome.latency
        self.fields["canary"] = _canary_summary(outcome.state, outcome.detail)
        for name, value in outcome.detail.items():
            if name in ProviderHealthStatus.model_fields:
                self.fields[name] = value
            else:
                self.metadata[name] = value
        return self.build(outcome.state, model_id=model_id, error=outcome.error)

    def skip_canary(self, reason: str) -> None:
        if "latency" in self.fields:  # a canary was asked for
            self.fields["canary"] = f"not sent: {reason}"

    def from_error(self, exc: LlamaCppError) -> ProviderHealthStatus:
        if isinstance(exc, TransportError):
            return self.build(ServerState.UNREACHABLE, error=str(exc), connected=False)
        if isinstance(exc, ServerHTTPError):
            self.fields["http_status"] = exc.status_code
        if isinstance(exc, ServerLoadingError):
            self.fields.setdefault("server_status", "loading")
            return self.build(ServerState.LOADING, error=str(exc))
        if isinstance(exc, UnauthorizedError):
            return self.build(ServerState.UNAUTHORIZED, error=str(exc))
        return self.build(ServerState.ERROR, error=str(exc))


def _canary_summary(state: ServerState, detail: dict[str, Any]) -> str:
    if "skipped" in detail:
        return detail["skipped"]
    if "deadline_missed" in detail:
        return f"missed its {detail['deadline_missed'].replace('_', '-')} deadline"
    schema = detail.get("structured_output")
    if state == ServerState.READY:
        return "answered" + (f"; JSON schema {schema}" if schema else "")
    if schema == "not enforced":
        return "answered, but ignored the JSON schema"
    return "failed"


def _names_model(models: list[dict[str, Any]], model_name: str) -> bool:
    return any(
        model_name == entry.get("id") or model_name in _texts(entry.get("aliases"))
        for entry in models
    )


def _text(value: Any) -> str | None:
    """`value` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def _texts(value: Any) -> list[str]:
    """The non-empty strings of `value` if it is a list, else none."""
    return [item for item in value if _text(item)] if isinstance(value, list) else []


def _file_name(path: str | None) -> str | None:
    return PurePath(path).name if path else None
