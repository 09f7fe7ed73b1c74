"""The health canary: can the server answer, how fast, and if not, is it busy or wedged?

`/health` is liveness only: it answers 200 while every completion hangs. The canary sends one
one-token chat completion with two deadlines (first byte, total). When it misses a deadline or
fails with a server error, two progress reads `progress_interval` apart tell `busy` (the server
is working: `/metrics` `n_decode_total` advances while `requests_processing` > 0, or the
`/slots` progress fields move) from `wedged` (nothing moves). `tokens_predicted_total` only
moves when a request ends, so it cannot show progress during a long generation.

The caller decides when a canary may be sent: never to a sleeping server (a completion wakes
it) and, in router mode, only to a model that is already loaded (`probe_completion` sends
`autoload=false`, so a model unloaded meanwhile is refused, not loaded).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.exceptions import (
    DeadlineExceededError,
    LlamaCppError,
    ServerHTTPError,
    ServerLoadingError,
    ServerTimeoutError,
    TransportError,
    UnauthorizedError,
)
from prefect_llamacpp.status import CanaryLatency, ServerState

# Generation tokens/s from /metrics only once the server has spent this long generating.
MIN_GENERATION_S = 0.01


class CanaryOptions(BaseModel):
    """Deadlines for the one-token canary, in seconds."""

    model_config = ConfigDict(allow_inf_nan=False)  # an endless deadline never tells wedged

    first_byte_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for the first streamed token."
    )
    total_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for the whole one-token answer."
    )
    progress_interval: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between the two progress reads that tell busy from wedged.",
    )
    structured_output: bool = Field(
        default=False,
        description="Also send a tiny JSON-schema request and check that the answer obeys the "
        "schema: a server that answers without applying the grammar is reported (error), not "
        "trusted.",
    )


@dataclass
class CanaryOutcome:
    """What the canary found: a state for the report, latency figures, and why."""

    state: ServerState
    latency: CanaryLatency
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Did the server do work between two reads? `seen` is None when it could not be read."""

    seen: bool | None
    evidence: str


async def run_canary(
    client: LlamaCppClient,
    options: CanaryOptions,
    *,
    model: str | None,
    metrics: bool,
    slots: bool,
    router: bool = False,
) -> CanaryOutcome:
    """Send the canary to a ready, awake server and classify what happened.

    `metrics` / `slots`: whether `/props` says those endpoints are on (they decide how progress
    is read). Returns `ready` (answered in time), `busy`, `wedged` or `error` (the canary was
    refused, or failed while other work progressed). Raises `TransportError`,
    `ServerLoadingError` or `UnauthorizedError` when the server went away, restarted or
    started asking for a key between the check's reads: the caller reports those states.
    """
    progress_model = model if router else None
    latency = CanaryLatency()
    try:
        probe = await client.probe_completion(
            model,
            first_byte_timeout=options.first_byte_timeout,
            total_timeout=options.total_timeout,
        )
    except TransportError as exc:
        # The answer was cut off or refused. A dead server is unreachable; a live one that
        # drops completions is at fault like one that answers them with errors.
        await _still_alive(client)
        fault: LlamaCppError = exc
    except (ServerLoadingError, UnauthorizedError):
        raise
    except DeadlineExceededError as exc:
        fault = exc
    except ServerHTTPError as exc:
        if exc.status_code < 500:
            if router and "not loaded" in (exc.server_message or ""):
                # Unloaded between /v1/models and the canary; autoload=false kept it unloaded.
                return CanaryOutcome(
                    ServerState.READY,
                    latency,
                    detail={"skipped": "refused: the model was unloaded meanwhile"},
                )
            return CanaryOutcome(
                ServerState.ERROR, latency, error=f"the canary completion was refused: {exc}"
            )
        fault = exc
    else:
        latency.ttfb_s = round(probe.first_byte_s, 4)
        latency.total_s = round(probe.total_s, 4)
        if metrics:
            for name, value in (await _throughput(client, progress_model)).items():
                setattr(latency, name, value)
        if options.structured_output:
            return await _check_enforcement(
                client, model, options.total_timeout, latency, router=router
            )
        return CanaryOutcome(ServerState.READY, latency)

    progress = await observe_progress(
        client,
        model=progress_model,
        metrics=metrics,
        slots=slots,
        interval=options.progress_interval,
    )
    detail = {"canary_error": str(fault), "progress": progress.evidence}
    if isinstance(fault, DeadlineExceededError):
        detail["deadline_missed"] = fault.deadline
        if progress.seen:
            return CanaryOutcome(
                ServerState.BUSY,
                latency,
                error=f"{fault}, but the server is working ({progress.evidence})",
                detail=detail,
            )
    elif progress.seen:
        return CanaryOutcome(
            ServerState.ERROR,
            latency,
            error=f"completions fail while other work progresses: {fault}",
            detail=detail,
        )
    return CanaryOutcome(
        ServerState.WEDGED,
        latency,
        error=f"{fault}; /health says ok but nothing progresses ({progress.evidence})",
        detail=detail,
    )


# A schema whose one valid answer no free answer to the prompt gives: with the grammar applied
# the server can only write "grammar-ok"; without it, the model answers the prompt.
ENFORCEMENT_SCHEMA = {"type": "string", "enum": ["grammar-ok"]}
ENFORCEMENT_PROMPT = "Say hello."


async def _check_enforcement(
    client: LlamaCppClient,
    model: str | None,
    timeout: float,
    latency: CanaryLatency,
    *,
    router: bool = False,
) -> CanaryOutcome:
    """Send the JSON-schema canary: READY if the answer obeys the schema, ERROR if the server
    answered without applying it (llama.cpp #19051: a 200 with no grammar) or refused the
    schema. A late answer or a passing fault (busy, loading, a gateway's 503) proves nothing:
    "not checked", and the state stays READY."""
    # Imported here: request.py reads the provider's profile, which imports this module.
    from prefect_llamacpp.request import build_chat_request, read_chat_answer, structured_output

    request = build_chat_request(
        [{"role": "user", "content": ENFORCEMENT_PROMPT}],
        model=model or "",
        output_schema=ENFORCEMENT_SCHEMA,
        max_tokens=48,
        temperature=0,
    )

    def not_checked(why: str) -> CanaryOutcome:
        return CanaryOutcome(
            ServerState.READY, latency, detail={"structured_output": f"not checked: {why}"}
        )

    try:
        async with asyncio.timeout(timeout):
            body = await client.chat_completion(request.body, autoload=not router)
        structured_output(read_chat_answer(body), request.output_schema or "")
    except (TimeoutError, ServerTimeoutError):
        return not_checked(f"no answer within {timeout:g} s")
    except (ServerLoadingError, UnauthorizedError):
        raise
    except TransportError:
        await _still_alive(client)  # gone: the caller reports it unreachable
        return not_checked("the connection was lost")
    except ServerHTTPError as exc:
        if exc.transient or exc.status_code >= 500:
            return not_checked(f"{exc}")
        if router and "not loaded" in (exc.server_message or ""):
            return not_checked("the model was unloaded meanwhile")
        fault: LlamaCppError = exc
    except LlamaCppError as exc:  # the answer broke the schema
        fault = exc
    else:
        return CanaryOutcome(ServerState.READY, latency, detail={"structured_output": "enforced"})
    # Refused the schema, or answered without the grammar.
    return CanaryOutcome(
        ServerState.ERROR,
        latency,
        error=f"the server does not enforce a JSON schema ({fault}); structured output "
        "from it cannot be trusted: check its build, template and response_format support",
        detail={"structured_output": "not enforced"},
    )


async def observe_progress(
    client: LlamaCppClient,
    *,
    model: str | None,
    metrics: bool,
    slots: bool,
    interval: float,
) -> Progress:
    """Two reads `interval` seconds apart: `/metrics` when enabled (no side effects), else `/slots`.

    Both are answered by the server's task loop, so a wedged loop answers neither: a read that
    takes longer than `interval` (at least 2 s) counts as no progress. Raises
    `TransportError` when the server is gone.
    """
    read_timeout = max(interval, 2.0)
    if metrics:
        try:
            before = await asyncio.wait_for(client.get_metrics(model=model), read_timeout)
            await asyncio.sleep(interval)
            after = await asyncio.wait_for(client.get_metrics(model=model), read_timeout)
            return _metrics_progress(before, after, interval)
        except TimeoutError:
            return Progress(False, f"/metrics did not answer within {read_timeout:g} s")
        except TransportError:
            raise
        except LlamaCppError:
            pass  # e.g. a proxy that does not forward /metrics: try /slots
    if slots:
        try:
            before = await asyncio.wait_for(client.get_slots(model=model), read_timeout)
            await asyncio.sleep(interval)
            after = await asyncio.wait_for(client.get_slots(model=model), read_timeout)
        except TimeoutError:
            return Progress(False, f"/slots did not answer within {read_timeout:g} s")
        except TransportError:
            raise
        except LlamaCppError as exc:
            return Progress(None, f"progress unknown: /slots failed ({exc})")
        return _slots_progress(before, after, interval)
    return Progress(
        None, "progress unknown: start llama-server with --metrics (or without --no-slots)"
    )


def _metrics_progress(
    before: dict[str, float], after: dict[str, float], interval: float
) -> Progress:
    decodes = after.get("n_decode_total", 0) - before.get("n_decode_total", 0)
    processing = max(after.get("requests_processing", 0), before.get("requests_processing", 0))
    finished = sum(
        after.get(name, 0) - before.get(name, 0)
        for name in ("tokens_predicted_total", "prompt_tokens_total")
    )
    evidence = (
        f"/metrics over {interval:g} s: n_decode_total +{decodes:g}, "
        f"requests_processing {processing:g}, requests_deferred "
        f"{after.get('requests_deferred', 0):g}"
    )
    return Progress((decodes > 0 and processing > 0) or finished > 0, evidence)


def _slots_progress(before: list[dict], after: list[dict], interval: float) -> Progress:
    def work(slots: list[dict]) -> dict[Any, tuple]:
        # Per processing slot: its task and how far it got (prompt tokens, generated tokens).
        return {
            slot.get("id"): (
                slot.get("id_task"),
                slot.get("n_prompt_tokens_processed"),
                tuple(token.get("n_decoded") for token in slot.get("next_token") or []),
            )
            for slot in slots
            if slot.get("is_processing")
        }

    then, now = work(before), work(after)
    moved = bool(now) and now != then
    evidence = f"/slots over {interval:g} s: {len(now)} processing, " + (
        "progress fields moved" if moved else "progress fields unchanged"
    )
    return Progress(moved, evidence)


async def _still_alive(client: LlamaCppClient) -> None:
    """Raises `TransportError` (or `ServerLoadingError`) unless `/health` answers."""
    try:
        await client.get_health()
    except UnauthorizedError:
        pass  # --api-prefix with --api-key: /health asks for the key, the server is up


async def _throughput(client: LlamaCppClient, model: str | None) -> dict[str, float | None]:
    """Server-lifetime averages from the /metrics counters (a missing detail, not a fault)."""
    try:
        metrics = await client.get_metrics(model=model)
    except TransportError:
        raise
    except LlamaCppError:
        return {}
    return {
        "prompt_tokens_per_s": _ratio(metrics, "prompt_tokens_total", "prompt_seconds_total"),
        # A canary's one token takes no generation time (it comes out of the prompt's
        # decode): on a server that served nothing else this would divide by microseconds.
        "predicted_tokens_per_s": _ratio(
            metrics, "tokens_predicted_total", "tokens_predicted_seconds_total", MIN_GENERATION_S
        ),
    }


def _ratio(
    metrics: dict[str, float], tokens: str, seconds: str, min_seconds: float = 0.0
) -> float | None:
    if metrics.get(seconds, 0) <= min_seconds:
        return None
    return round(metrics.get(tokens, 0) / metrics[seconds], 1)
