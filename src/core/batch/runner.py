"""Run batch items through a llama-server as fast as its slots allow, with bounded work per item.

The runner owns one HTTP pool sized to `concurrency` and keeps at most that many requests in
flight (llama-server defers the rest). Each item is one chat completion built by
`src/core/models/llamacpp_request.py` and sent over `LlamaCppClient`. Faults are sorted:

- the item's own (400 context too long, an answer that fails the schema): an error line;
- transient (timeout, 408/429/502/503/504 from a proxy): retried with backoff, honouring
  `Retry-After`, up to `max_attempts`;
- the server went away (refused, 503 loading): every worker waits for it through the readiness
  gate (up to `ready_timeout`), then goes on; past the deadline the batch stops
  (`BatchAbortedError`) with every finished result already in the ledger;
- the server died with the request in flight (the connection dropped unanswered): the item is a
  crash suspect and runs alone from then on, so a prompt that kills the server is isolated and,
  at its `max_crashes`-th crash, given up as `server_crash`, while the innocents that were in
  flight with it finish normally;
- 401 (wrong key): the batch stops.

Whatever happens, no item is sent more than `2 * (max_attempts + max_crashes)` times.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from src.core.batch.jsonl_input import BatchItem
from src.core.batch.ledger import RunSettings
from src.core.batch.records import ErrorKind, ResultLine, result_line
from src.core.models.llamacpp_request import (
    AnswerError,
    build_chat_request,
    read_chat_answer,
    structured_output,
)
from src.core.utils.config import LlamaCppSettings
from src.core.utils.exceptions import (
    BatchAbortedError,
    LlamaCppError,
    ServerDisconnectedError,
    ServerHTTPError,
    ServerLoadingError,
    ServerTimeoutError,
    ServerUnreachableError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from src.core.utils.logging import get_logger_with_context
from src.infrastructure.llm.llamacpp_client import KEY_HINT, LlamaCppClient

logger = get_logger_with_context("batch")

# Requests beyond total_slots that llama-server queues and starts the moment a slot frees: they
# hide the client's round trip between one answer and the next request (see the README's bench).
DEFAULT_QUEUE_DEPTH = 1

# llama-server's chat parser could not read the model's output back (seen with json_schema).
_UNPARSED_OUTPUT = "does not match the expected"


@dataclass(frozen=True)
class BatchOptions:
    concurrency: int
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = None
    max_tokens: int | None = 512
    temperature: float | None = None
    max_attempts: int = 3
    max_crashes: int = 2
    ready_timeout: float = 300
    request_timeout: float = 600
    # llama-server request fields beyond OpenAI's: top_k, min_p, repeat_penalty, ignore_eos, ...
    extra_body: dict[str, Any] | None = None

    def run_settings(self, model: str) -> RunSettings:
        return RunSettings(
            model=model,
            system_prompt=self.system_prompt,
            output_schema=self.output_schema,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            extra_body=self.extra_body,
        )


@dataclass
class BatchStats:
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)  # error kind -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    server_waits: int = 0
    crashes_seen: int = 0
    run_alone: int = 0

    def record(self, result: ResultLine) -> None:
        if result["error"] is None:
            self.succeeded += 1
        else:
            self.failed[result["error"]["kind"]] += 1
        usage = result["usage"]
        if usage:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]


class BatchRunner:
    """Runs `BatchItem`s; `on_result` receives each finished result line (to write and count).

    `already_done(custom_id)` is asked before an item is sent: an item answered earlier (a
    Prefect-level retry of a chunk, say) is never sent or written again.
    """

    def __init__(
        self,
        settings: LlamaCppSettings,
        model_name: str,
        options: BatchOptions,
        on_result: Callable[[ResultLine], None],
        already_done: Callable[[str], bool] = lambda custom_id: False,
    ) -> None:
        self.options = options
        self.model_name = model_name
        self.run_settings = options.run_settings(model_name)
        self.settings_fp = self.run_settings.fingerprint
        self.on_result = on_result
        self.already_done = already_done
        self.stats = BatchStats()
        self.in_flight = 0
        self.max_in_flight = 0
        self._slots = asyncio.Semaphore(options.concurrency)
        self._solo = asyncio.Lock()  # one crash suspect at a time has the server to itself
        self._suspects = 0
        self._no_suspects = asyncio.Event()
        self._no_suspects.set()
        root = settings.server_url.root
        self._client = LlamaCppClient(
            root,
            timeout=options.request_timeout,
            api_key=settings.api_key,
            max_connections=options.concurrency,
            connect_timeout=10,
        )
        self._gate = LlamaCppClient(root, timeout=settings.timeout, api_key=settings.api_key)
        self._gate_lock = asyncio.Lock()
        self._epoch = 0  # bumped each time the server is back after going away

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._gate.aclose()

    async def run(self, items: list[BatchItem]) -> None:
        """Run `items` concurrently (bounded by the shared slots); raises `BatchAbortedError`."""
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(self.run_item(item))

    async def run_item(self, item: BatchItem) -> ResultLine | None:
        """Run one item to its result line (also handed to `on_result`); None if done already."""
        if self.already_done(item.custom_id):
            return None
        result = await self._attempts(item)
        self.stats.record(result)
        self.on_result(result)
        return result

    # -- one item ------------------------------------------------------------------------------

    async def _attempts(self, item: BatchItem) -> ResultLine:
        started = time.monotonic()
        options = self.options
        request = build_chat_request(
            item.messages,
            model=self.model_name,
            system_prompt=options.system_prompt,
            output_schema=item.output_schema
            if item.output_schema is not None
            else options.output_schema,
            max_tokens=item.max_tokens or options.max_tokens,
            temperature=item.temperature if item.temperature is not None else options.temperature,
            extra_body=options.extra_body,
            sampling=item.sampling,
        )
        attempts = failures = crashes = 0
        limit = 2 * (options.max_attempts + options.max_crashes)

        def line(**fields: Any) -> ResultLine:
            return result_line(
                item.custom_id,
                item.line,
                attempts=attempts,
                latency_s=time.monotonic() - started,
                input_fp=item.input_fp,
                settings_fp=self.settings_fp,
                **fields,
            )

        try:
            while True:
                attempts += 1
                epoch = self._epoch
                alone = crashes > 0
                await self._take_slot(alone)
                try:
                    body = await self._client.chat_completion(request.body)
                    fault = None
                except LlamaCppError as exc:
                    fault = exc
                except Exception as exc:  # nothing one answer does may stop the batch
                    logger.exception("Unexpected fault on one item", custom_id=item.custom_id)
                    return line(
                        error=("invalid_response", f"the request failed ({type(exc).__name__})")
                    )
                finally:
                    self._give_slot(alone)

                if fault is None:
                    try:
                        answer = read_chat_answer(body)
                    except AnswerError as exc:
                        return line(error=(exc.kind, str(exc)))
                    except Exception as exc:  # nothing one answer does may stop the batch
                        return line(
                            error=("invalid_response", f"unreadable answer ({type(exc).__name__})")
                        )
                    usage = {
                        "prompt_tokens": answer.prompt_tokens,
                        "completion_tokens": answer.completion_tokens,
                    }
                    try:
                        if request.output_schema:
                            output = structured_output(answer, request.output_schema)
                        else:
                            output = answer.text
                    except AnswerError as exc:  # the tokens were still spent: keep the usage
                        return line(error=(exc.kind, str(exc)), usage=usage, model=answer.model)
                    return line(output=output, usage=usage, model=answer.model)

                if isinstance(fault, ServerDisconnectedError):
                    crashes += 1
                    self.stats.crashes_seen += 1
                    if crashes == 1:
                        self._add_suspect()
                    logger.warning(
                        "llama-server dropped a request unanswered; it runs alone from now on",
                        custom_id=item.custom_id,
                        crashes=crashes,
                    )
                    if crashes >= options.max_crashes:
                        return line(
                            error=(
                                "server_crash",
                                f"llama-server went down {crashes} times while this request ran "
                                f"(the last time alone): {fault}. The prompt likely crashes the "
                                "server; see its log, shorten the prompt or lower max_tokens.",
                            )
                        )
                    if attempts >= limit:
                        return line(error=("unreachable", str(fault)))
                    await self._wait_for_server(epoch)
                elif isinstance(fault, ServerTimeoutError):
                    failures += 1
                    if failures >= options.max_attempts or attempts >= limit:
                        return line(error=("timeout", str(fault)))
                    self.stats.retries += 1
                    await asyncio.sleep(_backoff(failures))
                elif isinstance(fault, ServerUnreachableError | ServerLoadingError):
                    if attempts >= limit:
                        kind = "unreachable"
                        if isinstance(fault, ServerHTTPError):
                            kind = "server_unavailable"
                        return line(error=(kind, str(fault)))
                    await self._wait_for_server(epoch)
                elif isinstance(fault, UnauthorizedError):
                    raise BatchAbortedError(
                        f"llama-server rejected the API key mid-batch: {KEY_HINT}"
                    ) from fault
                elif isinstance(fault, ServerHTTPError) and not fault.transient:
                    return line(error=_status_fault(fault))
                elif isinstance(fault, ServerHTTPError):
                    failures += 1
                    if attempts >= limit:
                        return line(error=("server_unavailable", str(fault)))
                    if failures >= options.max_attempts:
                        if not await self._server_is_down():
                            return line(error=("server_unavailable", str(fault)))
                        failures = 0  # a proxy in front of a server that is gone: wait for it
                        await self._wait_for_server(epoch)
                        continue
                    self.stats.retries += 1
                    await asyncio.sleep(max(_backoff(failures), fault.retry_after or 0))
                else:
                    raise fault
        finally:
            if crashes:
                self._remove_suspect()

    # -- slots ---------------------------------------------------------------------------------

    async def _take_slot(self, alone: bool) -> None:
        """One of `concurrency` slots; `alone`: all of them, so nothing else is in flight."""
        if alone:
            await self._solo.acquire()
            for _ in range(self.options.concurrency):
                await self._slots.acquire()
            self.stats.run_alone += 1
        else:
            while True:
                await self._slots.acquire()
                if not self._suspects:
                    break
                self._slots.release()  # suspects first: they run alone
                await self._no_suspects.wait()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _give_slot(self, alone: bool) -> None:
        self.in_flight -= 1
        if alone:
            for _ in range(self.options.concurrency):
                self._slots.release()
            self._solo.release()
        else:
            self._slots.release()

    def _add_suspect(self) -> None:
        self._suspects += 1
        self._no_suspects.clear()

    def _remove_suspect(self) -> None:
        self._suspects -= 1
        if not self._suspects:
            self._no_suspects.set()

    # -- the server ----------------------------------------------------------------------------

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
            if epoch != self._epoch:
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
                raise BatchAbortedError(str(exc)) from exc
            except LlamaCppError as exc:
                raise BatchAbortedError(
                    f"{exc} Every finished result is saved; rerun the batch to do the rest."
                ) from exc
            self._epoch += 1
            logger.info("llama-server is back; resuming", server=self._gate.base_url)


def _status_fault(exc: ServerHTTPError) -> tuple[ErrorKind, str]:
    """The error line for a status that retrying cannot fix."""
    if exc.status_code == 500 and _UNPARSED_OUTPUT in (exc.server_message or ""):
        return (
            "validation",
            f"{exc} (llama-server could not parse the model's answer back; try another "
            "max_tokens or a simpler schema)",
        )
    if isinstance(exc, UnexpectedResponseError) and exc.status_code < 300:
        return "invalid_response", str(exc)
    if 400 <= exc.status_code < 500:
        return "bad_request", str(exc)
    return "server_error", str(exc)


def _backoff(attempt: int) -> float:
    return min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
