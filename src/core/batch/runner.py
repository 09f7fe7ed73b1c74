"""Run batch items through a llama-server with pydantic-ai, as fast as its slots allow.

The runner owns one HTTP client whose pool is sized to `concurrency`, and a semaphore that keeps
exactly that many requests in flight (llama-server defers the rest, and over-subscription only
costs time). Faults are sorted three ways:

- transient (refused, timeout, 502/503/504): retried with backoff; when retries run out and the
  server is down or loading, every worker waits for it once more through the readiness gate
  (up to `ready_timeout`), then the item is tried again;
- the item's own (400 context too long, output that fails the schema): an error line;
- the whole batch's (401 wrong key, server gone past the deadline): raised, so the run stops
  with everything finished so far already in the ledger.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpx2
import jsonschema
from openai import AsyncOpenAI
from pydantic_ai import exceptions as ai_errors
from pydantic_ai.direct import model_request
from pydantic_ai.messages import (
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.output import OutputObjectDefinition

from src.core.batch.jsonl_input import BatchItem
from src.core.models.llamacpp_provider import PLACEHOLDER_API_KEY, LlamaCppProvider
from src.core.utils.config import LlamaCppSettings
from src.core.utils.exceptions import (
    LlamaCppError,
    ServerLoadingError,
    ServerUnreachableError,
    UnauthorizedError,
)
from src.core.utils.logging import get_logger_with_context
from src.infrastructure.llm.llamacpp_client import KEY_HINT, LlamaCppClient

logger = get_logger_with_context("batch")


@dataclass(frozen=True)
class BatchOptions:
    concurrency: int
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = None
    max_tokens: int | None = 512
    temperature: float | None = None
    max_attempts: int = 3
    ready_timeout: float = 300
    request_timeout: float = 600
    # llama-server request fields beyond OpenAI's: top_k, min_p, repeat_penalty, ignore_eos, ...
    extra_body: dict[str, Any] | None = None


@dataclass
class BatchStats:
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)  # error kind -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    server_waits: int = 0

    def record(self, result: dict[str, Any]) -> None:
        if result.get("error") is None:
            self.succeeded += 1
        else:
            self.failed[result["error"]["kind"]] += 1
        usage = result.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)


class BatchAbortedError(LlamaCppError):
    """The batch cannot go on (wrong key, server gone past the deadline); finished work is saved."""


class _Transient(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BatchRunner:
    """Runs `BatchItem`s; `on_result` receives each finished result line (to write and count)."""

    def __init__(
        self,
        settings: LlamaCppSettings,
        model_name: str,
        options: BatchOptions,
        on_result: Callable[[dict[str, Any]], None],
    ) -> None:
        self.options = options
        self.model_name = model_name
        self.on_result = on_result
        self.stats = BatchStats()
        self.in_flight = 0
        self.max_in_flight = 0
        self._slots = asyncio.Semaphore(options.concurrency)
        self._http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(options.request_timeout, connect=10),
            limits=httpx2.Limits(
                max_connections=options.concurrency,
                max_keepalive_connections=options.concurrency,
            ),
        )
        # Retries are ours (with the readiness gate); the OpenAI SDK's own would hide faults.
        openai_client = AsyncOpenAI(
            base_url=settings.server_url.openai_base,
            api_key=settings.api_key_value() or PLACEHOLDER_API_KEY,
            http_client=self._http,
            max_retries=0,
        )
        # Direct model requests, not an Agent run: a batch item is one request and needs no agent
        # loop (measured on the tiny model: 0.5 -> 0.75 of raw-client throughput), and nothing caches the answers, so
        # identical prompts are each sent to the server.
        self.model = OpenAIChatModel(
            model_name, provider=LlamaCppProvider(openai_client=openai_client)
        )
        self._gate = LlamaCppClient(
            settings.server_url.root, timeout=settings.timeout, api_key=settings.api_key
        )
        self._gate_lock = asyncio.Lock()
        self._server_epoch = 0

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._gate.aclose()

    async def run(self, items: list[BatchItem]) -> None:
        """Run `items` concurrently (bounded by the shared semaphore); raises `BatchAbortedError`."""
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(self.run_item(item))

    async def run_item(self, item: BatchItem) -> dict[str, Any]:
        async with self._slots:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                result = await self._attempts(item)
            finally:
                self.in_flight -= 1
        self.stats.record(result)
        self.on_result(result)
        return result

    async def _attempts(self, item: BatchItem) -> dict[str, Any]:
        started = time.monotonic()
        attempts = 0
        tries_left = self.options.max_attempts
        while True:
            attempts += 1
            tries_left -= 1
            epoch = self._server_epoch
            try:
                output, usage, model = await self._ask(item)
            except _Transient as fault:
                if tries_left > 0:
                    self.stats.retries += 1
                    await asyncio.sleep(_backoff(attempts))
                    continue
                if await self._server_is_down():
                    await self._wait_for_server(epoch)
                    tries_left = self.options.max_attempts
                    continue
                return _result(
                    item, error=(fault.kind, str(fault)), attempts=attempts, started=started
                )
            except _ItemError as fault:
                return _result(
                    item,
                    error=(fault.kind, str(fault)),
                    attempts=attempts,
                    started=started,
                    usage=fault.usage,
                    model=fault.model,
                )
            return _result(
                item, output=output, usage=usage, model=model, attempts=attempts, started=started
            )

    async def _ask(self, item: BatchItem) -> tuple[Any, dict[str, int], str | None]:
        schema = (
            item.output_schema if item.output_schema is not None else self.options.output_schema
        )
        settings: dict[str, Any] = {}
        if max_tokens := item.max_tokens or self.options.max_tokens:
            settings["max_tokens"] = max_tokens
        temperature = item.temperature if item.temperature is not None else self.options.temperature
        if temperature is not None:
            settings["temperature"] = temperature
        if self.options.extra_body:
            settings["extra_body"] = self.options.extra_body
        try:
            response = await model_request(
                self.model,
                _to_pydantic_ai(item.messages, self.options.system_prompt),
                model_settings=settings,
                model_request_parameters=_request_parameters(
                    _schema_key(schema) if schema else None
                ),
            )
        except ai_errors.ModelAuthenticationError:
            raise BatchAbortedError(
                f"llama-server rejected the API key mid-batch: {KEY_HINT}"
            ) from None
        except (ai_errors.ModelConnectionError, ai_errors.ModelRequestTimeout) as exc:
            timed_out = isinstance(exc, ai_errors.ModelTimeoutError | ai_errors.ModelRequestTimeout)
            kind = "timeout" if timed_out else "unreachable"
            raise _Transient(kind, f"{kind}: {exc}") from None
        except ai_errors.ModelHTTPError as exc:
            message = _http_error_message(exc)
            if exc.status_code in (502, 503, 504):
                raise _Transient("server_unavailable", message) from None
            kind = "bad_request" if 400 <= exc.status_code < 500 else "server_error"
            raise _ItemError(kind, message) from None
        except ai_errors.ModelAPIError as exc:
            raise _Transient("server_unavailable", str(exc)) from None
        except ai_errors.UnexpectedModelBehavior as exc:
            raise _ItemError("invalid_response", f"unexpected answer: {exc.message}") from None
        usage = {
            "prompt_tokens": response.usage.input_tokens,
            "completion_tokens": response.usage.output_tokens,
        }
        text = response.text or ""
        if not schema:
            return text, usage, response.model_name
        try:
            return _structured(text, schema, response.finish_reason), usage, response.model_name
        except _ItemError as fault:
            fault.usage, fault.model = usage, response.model_name  # the tokens were still spent
            raise

    async def _server_is_down(self) -> bool:
        try:
            await self._gate.health_check()
        except (ServerUnreachableError, ServerLoadingError):
            return True
        except LlamaCppError:
            return False
        return False

    async def _wait_for_server(self, epoch: int) -> None:
        """One worker waits through the gate; the others wait for it. Raises past the deadline."""
        async with self._gate_lock:
            if epoch != self._server_epoch:
                return  # another worker already saw the server come back
            self.stats.server_waits += 1
            logger.warning(
                "llama-server went away mid-batch; waiting for it",
                server=self._gate.base_url,
                timeout_s=self.options.ready_timeout,
            )
            try:
                await self._gate.wait_until_ready(timeout=self.options.ready_timeout)
            except UnauthorizedError as exc:
                raise BatchAbortedError(str(exc)) from None
            except LlamaCppError as exc:
                raise BatchAbortedError(
                    f"{exc} Every finished result is saved; rerun the batch to do the rest."
                ) from None
            self._server_epoch += 1
            logger.info("llama-server is back; resuming", server=self._gate.base_url)


class _ItemError(Exception):
    def __init__(self, kind: str, message: str, usage=None, model=None) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage
        self.model = model


def _result(
    item: BatchItem,
    *,
    output: Any = None,
    error: tuple[str, str] | None = None,
    usage: dict[str, int] | None = None,
    model: str | None = None,
    attempts: int,
    started: float,
) -> dict[str, Any]:
    return {
        "custom_id": item.custom_id,
        "line": item.line,
        "output": output,
        "error": {"kind": error[0], "message": error[1]} if error else None,
        "usage": usage,
        "model": model,
        "latency_s": round(time.monotonic() - started, 4),
        "attempts": attempts,
    }


def _backoff(attempt: int) -> float:
    return min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())


def _to_pydantic_ai(
    messages: list[dict[str, str]], system_prompt: str | None
) -> list[ModelRequest | ModelResponse]:
    """OpenAI-style messages as pydantic-ai messages; `system_prompt` unless the line has its own."""
    converted: list[ModelRequest | ModelResponse] = []
    if system_prompt and not any(m["role"] in ("system", "developer") for m in messages):
        converted.append(ModelRequest(parts=[SystemPromptPart(system_prompt)]))
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            converted.append(ModelResponse(parts=[TextPart(content)]))
        elif role in ("system", "developer"):
            converted.append(ModelRequest(parts=[SystemPromptPart(content)]))
        else:
            converted.append(ModelRequest(parts=[UserPromptPart(content)]))
    return converted


def _structured(text: str, schema: dict[str, Any], finish_reason: str | None) -> Any:
    """The answer as a JSON value that satisfies `schema`, or an `_ItemError` saying why not."""
    try:
        value = json.loads(text)
    except ValueError:
        why = "cut off at max_tokens" if finish_reason == "length" else "not valid JSON"
        raise _ItemError("validation", f"the answer is {why}: {text[:200]!r}") from None
    problems = _schema_problems(_schema_key(schema), value)
    if problems:
        raise _ItemError("validation", problems)
    return value


def _schema_key(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True)


@lru_cache(maxsize=64)
def _request_parameters(schema_key: str | None) -> ModelRequestParameters:
    if schema_key is None:
        return ModelRequestParameters()
    # Native output: llama-server compiles the schema into a grammar, so answers conform; the
    # provider profile also puts the schema in the instructions so the model knows the fields.
    return ModelRequestParameters(
        output_mode="native",
        output_object=OutputObjectDefinition(json_schema=json.loads(schema_key), name="output"),
        allow_text_output=False,
    )


@lru_cache(maxsize=64)
def _validator(schema_key: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_key)
    return jsonschema.validators.validator_for(schema)(schema)


def _schema_problems(schema_key: str, output: Any) -> str | None:
    errors = sorted(_validator(schema_key).iter_errors(output), key=lambda e: list(e.path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.path) or "(root)"
    return f"output does not match the schema at {where}: {first.message}"


def _http_error_message(exc: ai_errors.ModelHTTPError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or (body.get("error") or {}).get("message") if body else None
    return f"HTTP {exc.status_code}: {message or exc.body}"
