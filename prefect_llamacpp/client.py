"""`LlamaCppClient`: every llama-server endpoint this project uses, typed, over one HTTP pool.

    async with LlamaCppClient("http://localhost:8080/v1", api_key="...") as client:
        props = await client.get_props()
        print(props["total_slots"])

Faults surface as the errors in `prefect_llamacpp.exceptions`: `TransportError` (no answer),
`ServerLoadingError` (503 while the model loads), `UnauthorizedError` (401), `NotSupportedError`
(501, an endpoint switched off by a server flag; also embeddings without pooling, a 400),
`ServerHTTPError` (any other status), and `UnexpectedResponseError` (an answer llama-server would
not send). In router mode, monitoring calls that name a model send `autoload=false`, so that
looking never loads a model.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from prefect_llamacpp.config import get_settings
from prefect_llamacpp.exceptions import (
    ConfigurationError,
    DeadlineExceededError,
    NotSupportedError,
    ServerDisconnectedError,
    ServerHTTPError,
    ServerLoadingError,
    ServerNotReadyError,
    ServerTimeoutError,
    ServerUnreachableError,
    TransportError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from prefect_llamacpp.server_url import parse_server_url

_UNSET: Any = object()

KEY_HINT = "set LLAMACPP_API_KEY (or the block's api_key) to the key llama-server was started with"
EMBEDDINGS_OFF = "embeddings are disabled on this server (start llama-server with --embeddings)"
POOLING_NONE = (
    "embeddings are on but the model names no pooling type, so llama-server cannot give one "
    "vector per input (start it with --pooling mean, or the pooling your embedding model needs)"
)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every client: building one loads the CA bundle (~30 ms of CPU), which
    a batch run would otherwise pay for each server's clients and each health check."""
    return httpx.create_ssl_context()


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) names for `url`.

    Read as curl reads it (httpx agrees for plain hosts, IPs and `*`): a proxy without a scheme
    is http://; a NO_PROXY entry is `*`, or a host that also covers its subdomains (`lan`,
    `.lan`, `*.lan`), optionally with a scheme (`http://`, `all://`) or a port (the URL's
    default port when it names none). CIDR ranges are not read (nor does httpx read them)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    proxies = urllib.request.getproxies_environment()
    if not host or _bypassed(host, parts.port, parts.scheme, proxies.get("no", "")):
        return None
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    return proxy or None


def _bypassed(host: str, port: int | None, scheme: str, no_proxy: str) -> bool:
    port = port or (443 if scheme == "https" else 80)
    for entry in (part.strip().lower() for part in no_proxy.split(",")):
        if entry == "*":
            return True
        if "://" in entry:
            entry_scheme, entry = entry.split("://", 1)
            if entry_scheme not in (scheme, "all"):
                continue
        entry_port = None
        if entry.startswith("["):  # [::1]:8080
            entry, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":") or None
        elif entry.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
            entry, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        entry = entry.removeprefix("*").removeprefix(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


class LlamaCppClient:
    """An async client for one llama-server. Use it with `async with`, or call `aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 30,
        api_key: str | SecretStr | None = _UNSET,
        *,
        max_connections: int | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        """A client for the server at `base_url` (its root or its `/v1` URL).

        Explicit values are all the client uses: with `base_url` given, `api_key` defaults to no
        key and the environment is never read. With no `base_url`, both come from the
        `LLAMACPP_*` settings. `connect_timeout` (default: `timeout`, at most 10 s) bounds how
        long a dead host can hold a request before it counts as unreachable.
        """
        if base_url is None:
            settings = get_settings().llamacpp
            base_url = settings.base_url
            if api_key is _UNSET:
                api_key = settings.api_key
        if api_key is _UNSET:
            api_key = None
        self._server_url = parse_server_url(base_url)
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        key = key.strip() if key else None  # a key pasted with its line break
        self._sends_key = bool(key)
        self.base_url = self._server_url.root
        self.timeout = timeout
        limits = (
            httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            if max_connections
            else httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own
        )
        # The client's own transport: one server, so one route (through the environment's proxy
        # for it, if any), and the hot path below can hand requests to it directly.
        self._transport = httpx.AsyncHTTPTransport(
            verify=_tls_context(), limits=limits, proxy=_environment_proxy(self.base_url)
        )
        self._http = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(
                timeout, connect=connect_timeout if connect_timeout else min(timeout, 10)
            ),
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )
        self._timeouts = {"timeout": self._http.timeout.as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    @property
    def openai_base_url(self) -> str:
        return self._server_url.openai_base

    def __repr__(self) -> str:
        return f"LlamaCppClient(base_url={self.base_url!r}, api_key={'***' if self._sends_key else None})"

    async def __aenter__(self) -> LlamaCppClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- endpoints -------------------------------------------------------------------------

    async def get_health(self) -> dict[str, Any]:
        """`GET /health`: `{"status": "ok"}` when the model is loaded. Liveness only."""
        return await self._get_json("/health")

    async def get_props(self, model: str | None = None) -> dict[str, Any]:
        """`GET /props`: `total_slots`, `is_sleeping`, `build_info`, per-slot `n_ctx`, ...

        Does not wake a sleeping server. In router mode without `model` it describes the router
        (`role == "router"`); with `model` it describes that model without loading it.
        """
        return await self._get_json("/props", params=_model_params(model))

    async def get_slots(self, model: str | None = None) -> list[dict[str, Any]]:
        """`GET /slots`: one entry per slot (`id`, `n_ctx`, `is_processing`, ...).

        Note: this is queued behind inference, wakes a sleeping server and resets its idle timer.
        Raises `NotSupportedError` when the server runs with `--no-slots`.
        """
        return await self._get_json(
            "/slots",
            params=_model_params(model),
            not_supported="slots are disabled on this server (started with --no-slots)",
        )

    async def list_models(self) -> list[dict[str, Any]]:
        """`GET /v1/models` `data`: `id`, `aliases`, `meta`; in router mode also `status`."""
        body = await self._get_json("/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._unexpected("/v1/models", 200, "no 'data' list in the answer")
        return data

    async def served_model_id(self) -> str | None:
        """The id of the model the server serves (the first in `/v1/models`), or None."""
        models = await self.list_models()
        return models[0].get("id") if models else None

    async def get_metrics(self, model: str | None = None) -> dict[str, float]:
        """`GET /metrics` parsed: `{"requests_processing": 0.0, "prompt_tokens_total": 12.0, ...}`.

        Names lose their `llamacpp:` prefix. Raises `NotSupportedError` unless the server runs
        with `--metrics`.
        """
        response = await self._request(
            "GET",
            "/metrics",
            params=_model_params(model),
            not_supported="metrics are disabled on this server (start llama-server with --metrics)",
        )
        try:
            families = list(text_string_to_metric_families(response.text))
        except ValueError as exc:
            raise self._unexpected(
                "/metrics", response.status_code, f"not Prometheus text ({exc})"
            ) from exc
        return {
            sample.name.removeprefix("llamacpp:"): float(sample.value)
            for family in families
            for sample in family.samples
        }

    async def is_running(self) -> bool:
        """True when a server answers `/health` at all (ready, loading, or asking for a key)."""
        try:
            await self.get_health()
        except (ServerLoadingError, UnauthorizedError):
            return True
        except (TransportError, ServerHTTPError):
            return False
        return True

    async def is_model_loaded(self, model: str | None = None) -> bool:
        """True when `/health` is 200 and the server lists `model` (any model if None) as usable.

        In router mode a model counts only when its status is `loaded`.
        """
        try:
            await self.get_health()
            models = await self.list_models()
        except (TransportError, ServerHTTPError):
            return False
        for entry in models:
            names = {entry.get("id"), *(entry.get("aliases") or [])}
            if model is not None and model not in names:
                continue
            status = router_model_status(entry)
            if status is None or status == "loaded":
                return True
        return False

    async def wait_until_ready(self, timeout: float = 60, poll_interval: float = 0.5) -> dict:
        """Poll until the server is ready; returns its `/health` body.

        Waits through connection refused, 503 "Loading model" and 502/504 from a proxy. Raises
        `ServerNotReadyError` at the deadline, saying what the server was last doing, and
        `UnauthorizedError` at once when the key is wrong.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self._probe_ready()
            except ServerLoadingError:
                last_state = "loading"
                reason = "it was still loading the model"
            except TransportError as exc:
                last_state = "unreachable"
                reason = f"it was unreachable ({exc})"
            except ServerHTTPError as exc:
                if not exc.transient:
                    raise
                last_state = "error"
                reason = f"it answered HTTP {exc.status_code}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerNotReadyError(
                    f"llama-server at {self.base_url} was not ready after {timeout:g} s: {reason}. "
                    "Check that it is running and raise the readiness timeout if the model is large.",
                    last_state=last_state,
                    details={"url": self.base_url, "timeout": timeout},
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def chat_completion(self, body: bytes, *, autoload: bool = True) -> dict[str, Any]:
        """`POST /v1/chat/completions` with a JSON `body` already encoded; the parsed answer.

        The batch hot path builds and encodes its requests once (`build_chat_request` in
        `prefect_llamacpp/request.py`). `autoload=False` keeps a router from loading the model.
        Raises `ServerTimeoutError` / `ServerDisconnectedError` when the request was sent but not
        answered, `ServerUnreachableError` when it was never sent, `ServerHTTPError` for a status.
        """
        response = await self._request(
            "POST",
            "/v1/chat/completions",
            # A monitor's request must never load a router model (the body names it).
            params=None if autoload else {"autoload": "false"},
            content=body,
            headers={"Content-Type": "application/json"},
        )
        return self._json("/v1/chat/completions", response)

    async def apply_template(self, body: bytes) -> str:
        """`POST /apply-template`: the prompt the model's chat template makes of a chat body.

        Takes the same encoded body as `chat_completion` (llama-server ignores the fields it
        does not template), so it shows what `chat_template_kwargs` change. Generates nothing.
        """
        response = await self._request(
            "POST", "/apply-template", content=body, headers={"Content-Type": "application/json"}
        )
        answer = self._json("/apply-template", response)
        prompt = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(prompt, str):
            raise self._unexpected("/apply-template", response.status_code, "without a 'prompt'")
        return prompt

    async def embeddings(self, body: bytes) -> dict[str, Any]:
        """`POST /v1/embeddings` with a JSON `body` already encoded; the parsed answer.

        Build the body with `build_embedding_request` and read the answer with
        `read_embedding_answer` (`prefect_llamacpp/request.py`). Raises
        `NotSupportedError` naming the flag to add when the server does not serve embeddings,
        and otherwise the errors of `chat_completion`.
        """
        path = "/v1/embeddings"
        try:
            response = await self._request(
                "POST",
                path,
                content=body,
                headers={"Content-Type": "application/json"},
                not_supported=EMBEDDINGS_OFF,
            )
        except ServerHTTPError as exc:
            # Verified (b1-0c1e570): --embeddings on a model that names no pooling type answers
            # 400 "Pooling type 'none' is not OAI compatible" to every /v1/embeddings request.
            if exc.status_code == 400 and "pooling" in (exc.server_message or "").lower():
                raise NotSupportedError(
                    f"{POOLING_NONE} (HTTP 400, {exc.url}: {exc.server_message})",
                    status_code=400,
                    url=exc.url,
                    server_message=exc.server_message,
                ) from exc
            raise
        return self._json(path, response)

    async def check_embeddings(self, model: str | None = None) -> None:
        """Send one tiny `/v1/embeddings` request; return if the server serves embeddings.

        Raises `NotSupportedError`, naming the flag to add, when it does not, and the usual
        errors when it cannot be asked. Cheap either way: a one-word input.
        """
        # Verified (b1-0c1e570): /props is the same with and without --embeddings, so only a
        # request tells; without --embeddings the server answers 501 before computing anything.
        payload = {"input": ["ping"], **({"model": model} if model else {})}
        await self.embeddings(json.dumps(payload).encode())

    async def supports_embeddings(self, model: str | None = None) -> bool:
        """True when the server serves `/v1/embeddings`; `check_embeddings` says why not."""
        try:
            await self.check_embeddings(model)
        except NotSupportedError:
            return False
        return True

    # -- router mode ---------------------------------------------------------------------

    async def load_model(self, model: str) -> dict[str, Any]:
        """Router mode: `POST /models/load`; the model starts loading in its own process."""
        return await self._post_json("/models/load", {"model": model})

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Router mode: `POST /models/unload`."""
        return await self._post_json("/models/unload", {"model": model})

    # -- plumbing --------------------------------------------------------------------------

    async def _probe_ready(self) -> dict:
        try:
            return await self.get_health()
        except UnauthorizedError:
            # With --api-prefix and --api-key, /health answers 401 (upstream bug): the server is
            # up; ask an authenticated endpoint whether the model is loaded.
            await self.list_models()
            return {"status": "ok"}

    async def _get_json(self, path: str, *, params=None, not_supported: str | None = None) -> Any:
        response = await self._request("GET", path, params=params, not_supported=not_supported)
        return self._json(path, response)

    async def _post_json(self, path: str, payload: dict[str, Any]) -> Any:
        response = await self._request("POST", path, json=payload)
        return self._json(path, response)

    def _json(self, path: str, response: httpx.Response) -> Any:
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError) as exc:
            content_type = response.headers.get("content-type", "unknown")
            raise self._unexpected(
                path, response.status_code, f"not JSON (content-type {content_type})"
            ) from exc

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params=None,
        json=None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        not_supported: str | None = None,
    ) -> httpx.Response:
        url = self._server_url.endpoint(path)
        try:
            if content is not None and params is None and json is None:
                response = await self._send_body(method, url, content, headers)
            else:
                response = await self._http.request(
                    method, url, params=params, json=json, content=content, headers=headers
                )
        except httpx.LocalProtocolError:
            # Its message quotes the offending header, which may be the key: never chain it.
            raise ConfigurationError(
                f"the request to llama-server at {self.base_url} could not be sent: a header is "
                "invalid (is the API key pasted with a line break or a space inside?)"
            ) from None
        except httpx.InvalidURL:
            raise ConfigurationError(
                f"{self.base_url} is not a URL httpx can use; use a URL like http://localhost:8080"
            ) from None
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ServerUnreachableError(
                f"cannot reach llama-server at {self.base_url}: no connection within "
                f"{self._http.timeout.connect:g} s; is it running, and is base_url right?",
                details={"url": url},
            ) from exc
        except httpx.TimeoutException as exc:
            raise ServerTimeoutError(
                f"llama-server at {self.base_url} did not answer {path} within {self.timeout:g} s",
                details={"url": url, "timeout": self.timeout},
            ) from exc
        except httpx.ConnectError as exc:
            raise ServerUnreachableError(
                f"cannot reach llama-server at {self.base_url} ({type(exc).__name__}); "
                "is it running, and is base_url right?",
                details={"url": url},
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ServerDisconnectedError(
                f"llama-server at {self.base_url} closed the connection without answering {path} "
                f"({type(exc).__name__}): it crashed, restarted, or a proxy cut the request",
                details={"url": url},
            ) from exc
        except httpx.RequestError as exc:
            raise ServerUnreachableError(
                f"cannot reach llama-server at {self.base_url} ({type(exc).__name__}); "
                "is it running, and is base_url right?",
                details={"url": url},
            ) from exc
        if response.is_success:
            return response
        raise self._status_error(path, url, response, not_supported)

    async def _send_body(
        self, method: str, url: str, content: bytes, headers: dict[str, str] | None
    ) -> httpx.Response:
        """Send an encoded body straight to the client's transport (the batch hot path).

        `AsyncClient.request` merges URLs, default headers and cookies and walks auth and
        redirect hooks for every request, none of which a POST to llama-server needs, and that
        is a large part of the client's CPU per short answer (docs/benchmarks.md). The transport
        raises the same httpx errors, so `_request` maps them as for any request.
        """
        sent = {**(headers or {})}
        if auth := self._http.headers.get("Authorization"):
            sent["Authorization"] = auth
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = httpx.URL(url)
        request = httpx.Request(
            method, target, content=content, headers=sent, extensions=self._timeouts
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response

    def _status_error(
        self, path: str, url: str, response: httpx.Response, not_supported: str | None
    ) -> ServerHTTPError:
        status = response.status_code
        server_message = _server_error_message(response)
        kwargs = {
            "status_code": status,
            "url": url,
            "server_message": server_message,
            "retry_after": _retry_after(response),
        }
        if status == 503 and server_message and "loading" in server_message.lower():
            return ServerLoadingError(
                f"llama-server at {self.base_url} is still loading the model (HTTP 503)", **kwargs
            )
        if status == 401:
            if self._sends_key:
                problem = "rejected the API key (HTTP 401)"
            else:
                problem = "requires an API key (HTTP 401)"
            return UnauthorizedError(
                f"llama-server at {self.base_url} {problem}: {KEY_HINT}", **kwargs
            )
        if status == 501:
            what = not_supported or f"{path} is not supported by this server"
            return NotSupportedError(f"{what} (HTTP 501, {url})", **kwargs)
        if server_message is None and "json" not in response.headers.get("content-type", ""):
            content_type = response.headers.get("content-type", "unknown")
            return UnexpectedResponseError(
                f"{url} answered HTTP {status} with {content_type}, not llama-server JSON; "
                "is base_url pointing at llama-server (or a proxy that forwards to it)?",
                **kwargs,
            )
        detail = f": {server_message}" if server_message else ""
        return ServerHTTPError(f"{url} answered HTTP {status}{detail}", **kwargs)

    def _unexpected(self, path: str, status: int, why: str) -> UnexpectedResponseError:
        url = self._server_url.endpoint(path)
        return UnexpectedResponseError(
            f"{url} answered HTTP {status} but the body is {why}; "
            "is base_url pointing at llama-server (or a proxy that forwards to it)?",
            status_code=status,
            url=url,
        )

    # -- canary (deep health) ------------------------------------------------------------

    async def probe_completion(
        self,
        model: str | None = None,
        *,
        first_byte_timeout: float = 10,
        total_timeout: float = 30,
        prompt: str = "Say OK.",
    ) -> CompletionProbe:
        """A one-token streamed `POST /v1/chat/completions`, timed; what a health canary sends.

        Returns the time to the first streamed event (the answer's first byte: llama-server may
        send its headers before the model has read the prompt, so they do not count) and to the
        end of the answer. Raises `DeadlineExceededError` (`deadline` "first_byte" or "total")
        when a deadline passes; the connection is then closed, which makes llama-server drop the
        request. Raises the usual errors for a refused connection or an error status, and
        `ServerHTTPError` when the stream itself carries an error. Naming `model` also sends
        `autoload=false`, so in router mode a probe never loads a model.
        """
        path = "/v1/chat/completions"
        url = self._server_url.endpoint(path)
        payload: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 1,
            "stream": True,
        }
        if model:
            payload["model"] = model
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline, limit = "first_byte", min(first_byte_timeout, total_timeout)
        first_byte_s = None
        finish_reason = None
        try:
            async with asyncio.timeout(limit) as timer:
                async with self._http.stream(
                    "POST",
                    url,
                    json=payload,
                    params={"autoload": "false"} if model else None,
                    # Our own deadlines decide; httpx's only guards against a lost timer.
                    timeout=httpx.Timeout(total_timeout + 5),
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        raise self._status_error(path, url, response, None)
                    async for chunk in self._sse_events(path, url, response):
                        if first_byte_s is None:
                            first_byte_s = loop.time() - started
                            deadline, limit = "total", total_timeout
                            timer.reschedule(started + total_timeout)
                        for choice in chunk.get("choices") or []:
                            finish_reason = choice.get("finish_reason") or finish_reason
        except TimeoutError:
            missed = "send a first token" if deadline == "first_byte" else "finish its answer"
            raise DeadlineExceededError(
                f"llama-server at {self.base_url} did not {missed} to a one-token request "
                f"within {limit:g} s",
                deadline=deadline,
                limit_s=limit,
                details={"url": url},
            ) from None
        except httpx.RequestError as exc:
            raise ServerDisconnectedError(
                f"lost llama-server at {self.base_url} during {path} ({type(exc).__name__}); "
                "is it running?",
                details={"url": url},
            ) from None
        return CompletionProbe(
            first_byte_s=first_byte_s,
            total_s=loop.time() - started,
            finish_reason=finish_reason,
        )

    async def _sse_events(self, path: str, url: str, response: httpx.Response):
        """The JSON events of a llama-server SSE stream up to `[DONE]`; raises on an error event."""
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and ": ping" comments
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                raise self._unexpected(path, response.status_code, "not an SSE JSON stream")
            if chunk.get("error"):
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                message = error.get("message") or str(chunk["error"])
                code = error.get("code")
                raise ServerHTTPError(
                    f"{url} failed in the middle of its answer: {message}",
                    status_code=code if isinstance(code, int) else 500,
                    url=url,
                    server_message=message,
                )
            yield chunk
        raise self._unexpected(path, response.status_code, "a stream that ended without [DONE]")


@dataclass(frozen=True)
class CompletionProbe:
    """What `LlamaCppClient.probe_completion` measured, in seconds."""

    first_byte_s: float  # to the first streamed token
    total_s: float
    finish_reason: str | None = None


def router_model_status(entry: dict[str, Any]) -> str | None:
    """A router-mode model's `status.value` (`loaded`, `unloaded`, ...); None outside router mode."""
    status = entry.get("status")
    if isinstance(status, dict):
        status = status.get("value")
    return status if isinstance(status, str) else None


def _model_params(model: str | None) -> dict[str, str] | None:
    # Router mode loads an unloaded model on any request naming it, unless autoload=false.
    return {"model": model, "autoload": "false"} if model else None


def _server_error_message(response: httpx.Response) -> str | None:
    """llama-server errors look like `{"error": {"message": ..., "type": ..., "code": ...}}`."""
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else None
    if isinstance(error, str):
        return error
    return None


def _retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (delta or HTTP date), capped at 10 minutes; None if absent."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), 600.0)
