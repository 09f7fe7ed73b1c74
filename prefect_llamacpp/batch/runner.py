"""Run batch items through a llama-server as fast as its slots allow, with bounded work per item.

The runner owns one HTTP pool sized to `concurrency` and keeps at most that many requests in
flight (llama-server defers the rest). Each item is one chat completion built by
`prefect_llamacpp/request.py` and sent over `LlamaCppClient`. Faults are sorted:

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from prefect_llamacpp.batch.decide import (
    Action,
    Decision,
    Fault,
    GiveUpReason,
    Limits,
    Tries,
    decide,
)
from prefect_llamacpp.batch.dispatch import Dispatcher, Lane, NoServerError, Route, join_problem
from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.batch.options import (
    OPTION_GROUPS,
    RequestOptions,
    RunOptions,
    option_names,
)
from prefect_llamacpp.batch.records import ErrorKind, ResultLine, ServerResponse, result_line
from prefect_llamacpp.client import KEY_HINT
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.embedding_probe import packed_embeddings_problem
from prefect_llamacpp.exceptions import (
    BatchAbortedError,
    LlamaCppError,
    NotSupportedError,
    ServerDisconnectedError,
    ServerHTTPError,
    ServerLoadingError,
    ServerTimeoutError,
    ServerUnreachableError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.provider import read_server_status
from prefect_llamacpp.request import (
    AnswerError,
    ChatRequest,
    EmbeddingRequest,
    build_chat_request,
    build_embedding_request,
    read_chat_answer,
    read_embedding_answer,
    structured_output,
)
from prefect_llamacpp.status import ServerState

logger = get_logger_with_context("batch")

# Seconds between looks at a server that is not ready to (re)join when its answer was no help.
WATCH_PAUSE_S = 2.0

# llama-server's chat parser could not read the model's output back (seen with json_schema).
_UNPARSED_OUTPUT = "does not match the expected"
# llama-server answers 500 to an embedding input longer than its physical batch (b1-0c1e570).
_INPUT_TOO_LARGE = "too large to process"


@dataclass(frozen=True)
class BatchOptions:
    """The runner's options: the run's `RequestOptions` and `RunOptions`, the concurrency they
    came to, and what the output format asks of the answers."""

    concurrency: int
    request: RequestOptions = field(default_factory=RequestOptions)
    run: RunOptions = field(default_factory=RunOptions)
    # How vectors come over the wire for lines that do not say (None: base64, the smallest);
    # "float" when the answers are kept as the server sent them (the OpenAI output format).
    vector_encoding: str | None = None
    # Result lines carry the server's answer body (the OpenAI output format writes it); without
    # it a pack's answer is not cut into one body per line, work the native format would drop.
    keep_responses: bool = False

    @classmethod
    def of(cls, concurrency: int, **options: Any) -> BatchOptions:
        """From flat names: `BatchOptions.of(4, max_tokens=8, ready_timeout=5)`."""
        groups: dict[str, dict[str, Any]] = {group: {} for group in OPTION_GROUPS}
        for group, name in option_names():
            if name in options:
                groups[group][name] = options.pop(name)
        return cls(
            concurrency,
            RequestOptions(**groups["request"]),
            RunOptions(**groups["run"]),
            **options,
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
    """Runs `BatchItem`s over one llama-server or a fleet; `on_results` receives the finished
    result lines of each request (one, or a pack's), to write and count.

    `servers` is one server's `LlamaCppSettings` (a lane named "server" serving `model_name`,
    `options.concurrency` in flight) or a list of `Lane`s. `already_done(custom_id)` is asked
    before an item is sent: an item answered earlier (a Prefect-level retry of a chunk, say) is
    never sent or written again.
    """

    def __init__(
        self,
        servers: LlamaCppSettings | list[Lane],
        model_name: str,
        options: BatchOptions,
        on_results: Callable[[list[ResultLine]], None],
        already_done: Callable[[str], bool] = lambda custom_id: False,
    ) -> None:
        self.options = options
        self.model_name = model_name
        self.run_settings = options.request.run_settings(model_name)
        self.settings_fp = self.run_settings.fingerprint
        self.on_results = on_results
        self.already_done = already_done
        self.stats = BatchStats()
        self.max_in_flight = 0
        if isinstance(servers, LlamaCppSettings):
            servers = [
                Lane(
                    "server",
                    servers,
                    model_name,
                    options.concurrency,
                    request_timeout=options.run.request_timeout,
                )
            ]
        self.lanes = servers
        self.names_servers = len(servers) > 1  # result lines say which server answered
        self.dispatch = Dispatcher(servers, options.run.ready_timeout)
        self._watchers: dict[Lane, asyncio.Task] = {}
        self._checking: dict[Lane, asyncio.Task] = {}
        # Whether a lane joining late is asked if it serves embeddings (the run has such lines).
        self.checks_embeddings = False

    @property
    def in_flight(self) -> int:
        return self.dispatch.in_flight

    async def aclose(self) -> None:
        for task in [*self._watchers.values(), *self._checking.values()]:
            task.cancel()
        await asyncio.gather(
            *self._watchers.values(), *self._checking.values(), return_exceptions=True
        )
        self.dispatch.close()
        for lane in self.lanes:
            await lane.aclose()

    async def run(self, items: list[BatchItem]) -> None:
        """Run `items` concurrently (bounded by the lanes' slots); raises `BatchAbortedError`."""
        for lane in self.lanes:  # servers not ready at the start join when they are
            if lane.pending and not lane.retired and lane not in self._watchers:
                self._watchers[lane] = asyncio.create_task(self._watch(lane))
        async with asyncio.TaskGroup() as group:
            for job in self._jobs(items):
                group.create_task(self.run_job(job))

    async def run_item(self, item: BatchItem) -> ResultLine | None:
        """Run one item to its result line (also handed to `on_results`); None if done already."""
        results = await self.run_job([item])
        return results[0] if results else None

    async def run_job(self, items: list[BatchItem]) -> list[ResultLine]:
        """Run one request's items (one chat line, or embedding lines packed together) to their
        result lines, handed to `on_results` together. Items answered already are left out."""
        items = [item for item in items if not self.already_done(item.custom_id)]
        if not items:
            return []
        results = await self._attempts(items)
        for result in results:
            self.stats.record(result)
        self.on_results(results)
        return results

    def _jobs(self, items: list[BatchItem]) -> Iterator[list[BatchItem]]:
        """One job per chat line; embedding lines packed, up to `embedding_batch` texts a
        request, with lines that ask for the same model and vector encoding."""
        packs: dict[tuple[str | None, str | None], list[BatchItem]] = {}
        sizes: dict[tuple[str | None, str | None], int] = {}
        for item in items:
            if not item.embeddings:
                yield [item]
                continue
            key = (
                None if self.options.run.ignore_line_models else item.model,
                item.encoding_format,
            )
            count = len(item.inputs or ())
            pack = packs.get(key)
            if pack and sizes[key] + count > self.options.run.embedding_batch:
                yield packs.pop(key)
                pack = None
            if not pack:
                pack = packs[key] = []
                sizes[key] = 0
            pack.append(item)
            sizes[key] += count
        yield from packs.values()

    # -- one request -----------------------------------------------------------------------------

    def _request(self, items: list[BatchItem], model: str) -> ChatRequest | EmbeddingRequest:
        options = self.options
        item = items[0]
        if item.embeddings:
            texts = [text for each in items for text in each.inputs or ()]
            vectors = item.encoding_format or options.vector_encoding
            encoding = {"encoding_format": vectors} if vectors else None
            return build_embedding_request(texts, model=model, extra_body=encoding)
        return build_chat_request(
            item.messages,
            model=model,
            system_prompt=options.request.system_prompt,
            output_schema=item.output_schema
            if item.output_schema is not None
            else options.request.output_schema,
            max_tokens=item.max_tokens or options.request.max_tokens,
            temperature=item.temperature
            if item.temperature is not None
            else options.request.temperature,
            extra_body=options.request.extra_body,
            sampling=item.sampling,
            chat_template_kwargs=item.chat_template_kwargs
            if item.chat_template_kwargs is not None
            else options.request.chat_template_kwargs,
        )

    async def _attempts(self, items: list[BatchItem], spent: int = 0) -> list[ResultLine]:
        """Send one request for `items` until answered or given up; `spent`: attempts already
        made for them (in a pack that was split), which count against the limit."""
        started = time.monotonic()
        options = self.options
        requests: dict[str, Any] = {}
        tries = Tries(attempts=spent)
        limits = Limits(options.run.max_attempts, options.run.max_crashes)
        lane: Lane | None = None
        embeddings = items[0].embeddings

        def line(item: BatchItem, **fields: Any) -> ResultLine:
            result = result_line(
                item.custom_id,
                item.line,
                attempts=tries.attempts,
                latency_s=time.monotonic() - started,
                input_fp=item.input_fp,
                settings_fp=self.settings_fp,
                server=lane.name if lane and self.names_servers else None,
                **fields,
            )
            if lane is not None:
                if result["error"] is None:
                    lane.stats.succeeded += 1
                else:
                    lane.stats.failed += 1
                if result["usage"]:
                    lane.stats.completion_tokens += result["usage"]["completion_tokens"]
            return result

        def lines(**fields: Any) -> list[ResultLine]:
            return [line(item, **fields) for item in items]

        wanted = None if options.run.ignore_line_models else items[0].model
        route = Route(wanted, embeddings)
        if not self.dispatch.serves(route):
            return lines(error=("no_server_for_model", self._unserved(items[0], route)))
        unready = 0  # times a lane was not ready for a suspect: bounded like the attempts
        while True:
            tries = replace(tries, attempts=tries.attempts + 1)
            alone = tries.alone
            try:
                lane = await self.dispatch.take(route, alone=alone)
            except NoServerError as exc:
                if exc.whole_fleet:
                    raise BatchAbortedError(str(exc)) from exc
                lane = None
                if exc.unserved:
                    return lines(error=("no_server_for_model", self._unserved(items[0], route)))
                return lines(error=("unreachable", str(exc)))
            epoch = lane.epoch
            if alone and await self._check_lane(lane, epoch):
                # A suspect is sent only to a server that is ready: one sent into a restart
                # (a proxy drops it unanswered) would be blamed for a crash it did not cause.
                self.dispatch.give(lane, alone=True)
                tries = replace(tries, attempts=tries.attempts - 1)  # nothing was sent
                unready += 1
                if unready > limits.limit:
                    return lines(error=("unreachable", f"{lane.name} was never ready to run it"))
                continue
            self.max_in_flight = max(self.max_in_flight, self.dispatch.in_flight)
            model = wanted or lane.model
            request = requests.get(model) or requests.setdefault(model, self._request(items, model))
            try:
                if embeddings:
                    body = await lane.client.embeddings(request.body)
                else:
                    body = await lane.client.chat_completion(request.body)
                fault = None
            except LlamaCppError as exc:
                fault = exc
            except Exception as exc:  # nothing one answer does may stop the batch
                logger.exception("Unexpected fault on one item", custom_id=items[0].custom_id)
                return lines(
                    error=("invalid_response", f"the request failed ({type(exc).__name__})")
                )
            finally:
                self.dispatch.give(lane, alone=alone)

            if fault is None:
                try:
                    if embeddings:
                        return self._embedded(items, request, body, line)
                    return [self._answered(items[0], request, body, line)]
                except AnswerError as exc:
                    return lines(error=(exc.kind, str(exc)))
                except Exception as exc:  # nothing one answer does may stop the batch
                    return lines(
                        error=("invalid_response", f"unreadable answer ({type(exc).__name__})")
                    )

            kind = _fault_kind(fault)
            decision = decide(kind, tries, limits, pack=len(items) > 1)
            if decision.action is Action.CHECK_SERVER:
                down = await self._check_lane(lane, epoch)
                decision = decide(kind, decision.tries, limits, pack=len(items) > 1, down=down)
            tries = decision.tries
            if decision.crashed:
                self.stats.crashes_seen += 1
                logger.warning(
                    "llama-server dropped a request unanswered; it runs alone from now on",
                    custom_id=items[0].custom_id,
                    server=lane.name,
                    crashes=tries.crashes,
                )
            if decision.retire:
                self._retire(lane, fault)
            match decision.action:
                case Action.SPLIT:
                    return await self._split(items, tries.attempts)
                case Action.GIVE_UP:
                    return lines(**_given_up(decision, fault))
                case Action.RETRY:
                    self.stats.retries += 1
                    retry_after = getattr(fault, "retry_after", None) or 0
                    await asyncio.sleep(max(_backoff(tries.failures), retry_after))
                case Action.WAIT_FOR_SERVER:
                    await self._check_lane(lane, epoch)

    def _answered(self, item: BatchItem, request: ChatRequest, body: Any, line) -> ResultLine:
        """The result line of a chat answer; `AnswerError` when it is unusable."""
        answer = read_chat_answer(body)
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        }
        fields = {"usage": usage, "model": answer.model, "reasoning": answer.reasoning}
        response: ServerResponse = {"status_code": 200, "body": body}
        try:
            if request.output_schema:  # parsed from the answer, never from the reasoning
                output = structured_output(answer, request.output_schema)
            else:
                output = answer.text
        except AnswerError as exc:  # the tokens were still spent: keep the usage
            return line(item, error=(exc.kind, str(exc)), response=response, **fields)
        return line(item, output=output, response=response, **fields)

    def _embedded(
        self, items: list[BatchItem], request: EmbeddingRequest, body: Any, line
    ) -> list[ResultLine]:
        """One result line per embedding line of a pack: its vector (or vectors, for a line
        that gave a list) and its part of the answer.

        llama-server counts the tokens of a whole request; a line sharing one with others gets
        the count split by text length (the run's total stays exact).
        """
        answer = read_embedding_answer(body, request.count)
        entries = sorted(body["data"], key=lambda entry: entry["index"])
        sizes = [sum(len(text.encode()) for text in item.inputs or ()) for item in items]
        tokens = _apportion(answer.prompt_tokens, sizes)
        results, start = [], 0
        for item, count in zip(items, tokens, strict=True):
            end = start + len(item.inputs or ())
            vectors = answer.vectors[start:end]
            own = body
            if len(items) > 1 and self.options.keep_responses:
                own = {
                    "object": "list",
                    "data": [
                        {**entry, "index": index} for index, entry in enumerate(entries[start:end])
                    ],
                    "model": body.get("model"),
                    "usage": {"prompt_tokens": count, "total_tokens": count},
                }
            results.append(
                line(
                    item,
                    output=vectors[0] if item.single_input else vectors,
                    usage={"prompt_tokens": count, "completion_tokens": 0},
                    model=answer.model,
                    response={"status_code": 200, "body": own}
                    if self.options.keep_responses
                    else None,
                )
            )
            start = end
        return results

    async def _split(self, items: list[BatchItem], spent: int) -> list[ResultLine]:
        parts = await asyncio.gather(*(self._attempts([item], spent) for item in items))
        return [result for part in parts for result in part]

    def _unserved(self, item: BatchItem, route: Route) -> str:
        if route.embeddings and self.dispatch.serves(route.model):
            return (
                f"line {item.line}: no server of this run serves embeddings"
                + (f" for model {route.model!r}" if route.model else "")
                + " (the run log says why): start llama-server with --embeddings, a pooling type "
                "(--pooling mean for a chat model) and, with -np, -kvu"
            )
        return (
            f"line {item.line}: no server of this run serves model {route.model!r} (they "
            f"serve {', '.join(sorted(self._served()))}); add a server that does, or "
            "pass ignore_line_models to send the line to any server"
        )

    def _served(self) -> set[str]:
        return {
            name
            for lane in self.lanes
            if not lane.pending and not lane.retired
            for name in (lane.model, *lane.served_models)
        }

    # -- lanes going and coming ------------------------------------------------------------------

    async def _check_lane(self, lane: Lane, epoch: int) -> bool:
        """After a failed request: is `lane` down? If so take it out and watch it come back.

        One check per lane at a time; the others wait for its answer. Returns True when down.
        """
        if lane.epoch != epoch or not lane.up:
            return not lane.up
        check = self._checking.get(lane)
        if check is None or check.done():
            check = self._checking[lane] = asyncio.create_task(self._is_down(lane))
        down = await asyncio.shield(check)
        if down and lane.epoch == epoch and self.dispatch.lane_down(lane):
            self.stats.server_waits += 1
            logger.warning(
                "llama-server went away mid-batch; its work goes to the others while it is watched",
                server=lane.name,
                url=lane.gate.base_url,
            )
            self._watchers[lane] = asyncio.create_task(self._watch(lane))
        return down

    async def _is_down(self, lane: Lane) -> bool:
        try:
            await lane.gate.get_health()
        except (TransportError, ServerLoadingError):
            return True  # refused, timed out, or loading
        except ServerHTTPError as exc:
            return exc.transient  # a proxy answering 502/503/504 for a server that is gone
        except LlamaCppError:
            return False
        return False

    async def _watch(self, lane: Lane) -> None:
        """Poll a lane that went away (or was not ready at the start) until it is ready, then
        let it take work."""
        while True:
            try:
                await lane.gate.wait_until_ready(timeout=self.options.run.ready_timeout)
                if lane.pending and not await self._shape_pending(lane):
                    if lane.retired:
                        return
                    await asyncio.sleep(WATCH_PAUSE_S)
                    continue
            except UnauthorizedError:
                # Out for good; the dispatcher fails whatever only this lane could run.
                logger.error("llama-server now refuses the API key", server=lane.name)
                self.dispatch.lane_down(lane, retire=True)
                return
            except LlamaCppError:
                # Not a llama-server answer (a 404 or 500 from something else at that URL), or
                # its embeddings probe failed: look again later, never in a tight loop.
                await asyncio.sleep(WATCH_PAUSE_S)
                continue
            if lane.pending:
                logger.info(
                    "llama-server is ready; it joins the run",
                    server=lane.name,
                    capacity=lane.capacity,
                )
            else:
                logger.info("llama-server is back; it takes work again", server=lane.name)
            self.dispatch.lane_up(lane)
            return

    async def _shape_pending(self, lane: Lane) -> bool:
        """Read a late server's health report and shape its lane from it: True when it can
        join. A server that cannot take work this run (a wrong key, router mode with no model)
        is retired."""
        status = await read_server_status(lane.gate, model_name=lane.settings.model_name)
        problem = join_problem(status, lane.settings.model_name)
        if problem is not None:
            # Ready yet unusable as configured, or refusing the key: waiting will not help.
            if status.is_ready or status.state == ServerState.UNAUTHORIZED:
                logger.error("llama-server cannot join the run", server=lane.name, why=problem)
                self.dispatch.lane_down(lane, retire=True)
            return False
        lane.shape(status)
        if self.checks_embeddings:
            try:
                lane.embeddings = await packed_embeddings_problem(lane.gate, lane.model) is None
            except NotSupportedError:
                lane.embeddings = False
        return True

    def _retire(self, lane: Lane, fault: LlamaCppError) -> None:
        """A lane that refuses the key is out for good; with none left, the batch stops."""
        if not lane.retired:
            logger.error("llama-server rejected the API key mid-batch", server=lane.name)
        self.dispatch.lane_down(lane, retire=True)
        if all(other.retired for other in self.lanes):
            raise BatchAbortedError(
                f"llama-server rejected the API key mid-batch: {KEY_HINT}"
            ) from fault


def _bad_gateway(fault: LlamaCppError) -> bool:
    """A proxy's 502: its upstream closed or refused (a crash looks like this behind nginx)."""
    return (
        isinstance(fault, ServerHTTPError)
        and fault.status_code == 502
        and not isinstance(fault, ServerLoadingError)
    )


def _fault_kind(fault: LlamaCppError) -> Fault:
    """A failed send as `decide` sees it; a fault no rule covers is raised."""
    if isinstance(fault, ServerDisconnectedError) or _bad_gateway(fault):
        return Fault.DROPPED
    if isinstance(fault, ServerTimeoutError):
        return Fault.TIMEOUT
    if isinstance(fault, ServerLoadingError):
        return Fault.LOADING
    if isinstance(fault, ServerUnreachableError):
        return Fault.NOT_SENT
    if isinstance(fault, UnauthorizedError):
        return Fault.UNAUTHORIZED
    if isinstance(fault, ServerHTTPError):
        return Fault.TRANSIENT if fault.transient else Fault.REFUSED
    raise fault


def _given_up(decision: Decision, fault: LlamaCppError) -> dict[str, Any]:
    """The error fields of a request given up."""
    tries = decision.tries
    match decision.reason:
        case GiveUpReason.SERVER_REFUSED:
            assert isinstance(fault, ServerHTTPError)
            return {"error": _status_fault(fault), "response": _error_response(fault)}
        case GiveUpReason.DROPPED_ALONE:
            return {"error": (decision.kind, _dropped_alone(tries.failures, fault))}
        case GiveUpReason.CRASHED_ALONE:
            return {
                "error": (
                    decision.kind,
                    f"llama-server went down {tries.crashes} times while this request ran "
                    f"(the last time alone): {fault}. The prompt likely crashes the "
                    "server; see its log, shorten the prompt or lower max_tokens.",
                )
            }
    return {"error": (decision.kind, str(fault))}


def _dropped_alone(times: int, fault: LlamaCppError) -> str:
    return (
        f"the request ran alone and got no answer {times} times, though llama-server answered "
        "/health right after each: it may restart faster than it can be checked, or a proxy "
        f"in front of it cuts this request; see both logs ({fault})"
    )


def _status_fault(exc: ServerHTTPError) -> tuple[ErrorKind, str]:
    """The error line for a status that retrying cannot fix."""
    if exc.status_code == 500 and _UNPARSED_OUTPUT in (exc.server_message or ""):
        return (
            "validation",
            f"{exc} (llama-server could not parse the model's answer back; try another "
            "max_tokens or a simpler schema)",
        )
    if exc.status_code == 500 and _INPUT_TOO_LARGE in (exc.server_message or ""):
        return (
            "bad_request",
            f"{exc} (a text longer than the server's physical batch: split it, or start "
            "llama-server with a larger --ubatch-size and --batch-size)",
        )
    if isinstance(exc, UnexpectedResponseError) and exc.status_code < 300:
        return "invalid_response", str(exc)
    if 400 <= exc.status_code < 500:
        return "bad_request", str(exc)
    return "server_error", str(exc)


def _error_response(exc: ServerHTTPError) -> ServerResponse:
    """What the server answered to a refused request, in its own error shape."""
    message = exc.server_message or str(exc)
    return {
        "status_code": exc.status_code,
        "body": {"error": {"code": exc.status_code, "message": message}},
    }


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, in whole numbers that add up to `total`."""
    if len(weights) == 1:
        return [total]
    if not any(weights):
        weights = [1] * len(weights)
    raw = [total * weight / sum(weights) for weight in weights]
    shares = [int(value) for value in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - shares[i], reverse=True)
    for index in by_remainder[: total - sum(shares)]:
        shares[index] += 1
    return shares


def _backoff(attempt: int) -> float:
    return min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
