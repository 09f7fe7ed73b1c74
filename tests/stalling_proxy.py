"""A small HTTP proxy in front of a real llama-server that breaks completions on purpose.

A real llama-server cannot be made to answer `/health` while never finishing a completion, so
the wedge tests put this in front of one: every request is forwarded to the real server except
`POST .../chat/completions`, which the proxy holds without answering (`mode="stall"`),
answers with llama-server's 500 "Compute error" (`mode="error"`), or drops without an answer
(`mode="drop"`, with `on_completion` to kill the real server first: a server dying mid-check), or
forwards the first `hold_after` and holds the rest until `release()` (`mode="hold"`: a run that
is certainly still going while the test does something else), forwards them without their
`response_format` (`mode="no_grammar"`: a server that answers 200 without applying the schema,
llama.cpp #19051), or forwards them as they are (`mode="pass"`: counted). `/health`, `/props`,
`/v1/models`, `/metrics` and `/slots` are the real server's answers.

    with StallingProxy(server.url) as proxy:
        status = await llamacpp_health_check(LlamaCppSettings(base_url=proxy.url), canary=True)

It runs its own event loop in a thread, so it serves tests and Prefect flows alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx

COMPUTE_ERROR = b'{"error":{"code":500,"message":"Compute error","type":"server_error"}}'
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class StallingProxy:
    def __init__(
        self, upstream: str, mode: str = "stall", on_completion=None, hold_after: int = 0
    ) -> None:
        assert mode in ("stall", "error", "drop", "hold", "no_grammar", "pass")
        self.upstream = upstream.rstrip("/")
        self.mode = mode
        self.on_completion = on_completion
        self.completions_seen = 0  # chat completions that reached the proxy
        self.completions_forwarded = 0  # and went on to the real server
        self.hold_after = hold_after
        self.held = 0  # completions waiting for release() (mode="hold")
        self._released = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    def release(self) -> None:
        """Let the held completions (and every later one) through."""
        self._released.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._released.set()
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        # A fresh upstream connection per request: llama-server may close an idle kept-alive
        # one just as the proxy reuses it, which would look like a fault of the server under test.
        self._http = httpx.AsyncClient(
            base_url=self.upstream, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        await self._http.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(
            asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError
        ):
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = dict(line.split(":", 1) for line in header_lines if line and ":" in line)
                headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "POST" and target.split("?")[0].endswith("/chat/completions"):
                    self.completions_seen += 1
                    if self.on_completion:
                        await asyncio.to_thread(self.on_completion)
                    if self.mode == "drop":
                        break
                    if self.mode == "hold" and self.completions_seen > self.hold_after:
                        self.held += 1
                        await asyncio.to_thread(self._released.wait)
                    if self.mode == "stall":
                        await reader.read()  # hold until the client gives up and closes
                        return
                    if self.mode == "error":
                        await self._reply(writer, 500, "Internal Server Error", COMPUTE_ERROR)
                        continue
                    if self.mode == "no_grammar":
                        request = json.loads(body)
                        for field in ("response_format", "json_schema", "grammar"):
                            request.pop(field, None)
                        body = json.dumps(request).encode()
                if method == "POST" and target.split("?")[0].endswith("/chat/completions"):
                    self.completions_forwarded += 1
                upstream = await self._http.request(
                    method,
                    target,
                    content=body,
                    headers={k: v for k, v in headers.items() if k not in _HOP_BY_HOP},
                )
                await self._reply(
                    writer,
                    upstream.status_code,
                    upstream.reason_phrase,
                    upstream.content,
                    upstream.headers.get("content-type", "application/json"),
                )
        writer.close()

    @staticmethod
    async def _reply(
        writer, status: int, reason: str, body: bytes, content_type="application/json"
    ):
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode("latin-1")
            + body
        )
        await writer.drain()
