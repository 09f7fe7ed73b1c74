"""A scriptable stand-in for llama-server on a real loopback socket, for faults a real server
cannot be made to show on demand (a proxy's 429, a crash on one prompt). Each test says which
fault it fakes; every behaviour that a real server can show is tested against a real one.

`answer(body) -> (status, headers, json) | "crash" | "drop"`: "crash" drops every connection that
has a request in flight, unanswered, as a dying server does, and the server is then down for
`restart_s` (a supervisor restarting it: /health and every request answer 503 "Loading model",
or, with `while_down="drop"`, are dropped unanswered, as a proxy in front of it does, or with
`while_down="502"` answered 502 by that proxy, the requests in flight at the crash included);
"drop" closes only this request's connection, unanswered, while the server stays up (a proxy or
the network cutting one request).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

Answer = tuple[int, dict[str, str], Any] | str
LOADING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
BAD_GATEWAY = {"error": {"message": "upstream prematurely closed connection", "code": 502}}


def completion(text: str = "ok", tokens: int = 2) -> tuple[int, dict[str, str], Any]:
    return (
        200,
        {},
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens},
            "model": "fake",
        },
    )


class FakeLlamaServer:
    def __init__(
        self,
        answer: Callable[[dict], Answer],
        delay: float = 0.05,
        slots: int | None = None,
        restart_s: float = 0.3,
        while_down: str = "loading",
        routes: dict[str, Answer] | None = None,
    ) -> None:
        self.answer = answer
        self.delay = delay
        self.restart_s = restart_s
        self.while_down = while_down
        # Fixed answers by path prefix (GET /props, /v1/models ...), before `answer`.
        self.routes = routes or {}
        self.gets: list[str] = []
        self.crashes = 0
        self._down_until = 0.0
        # With `slots`, at most that many requests are processed at once (the rest wait), so
        # throughput is proportional to the slots, as on servers of their own.
        self._slots = asyncio.Semaphore(slots) if slots else None
        self.requests: list[dict] = []
        self.in_flight: set[asyncio.StreamWriter] = set()
        self.most_in_flight = 0
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> FakeLlamaServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def down_for(self, seconds: float) -> None:
        """Not ready (as `while_down` says) for `seconds` from now: loading, say."""
        self._down_until = time.monotonic() + seconds

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in list(self.in_flight):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode().split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in header_lines if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "GET":
                    self.gets.append(path)
                if time.monotonic() < self._down_until:
                    if self.while_down == "drop":
                        writer.transport.abort()
                        return
                    if self.while_down == "502":
                        await _respond(writer, 502, {"Connection": "close"}, BAD_GATEWAY)
                        writer.close()
                        return
                    await _respond(writer, 503, {}, LOADING)
                    continue
                route = next(
                    (answer for prefix, answer in self.routes.items() if path.startswith(prefix)),
                    None,
                )
                if route is not None:
                    await _respond(writer, *route)
                    continue
                if path.startswith("/health"):
                    await _respond(writer, 200, {}, {"status": "ok"})
                    continue
                request = json.loads(body) if body else {}
                self.requests.append(request)
                self.in_flight.add(writer)
                self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
                if self._slots:
                    async with self._slots:
                        await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(self.delay)
                outcome = self.answer(request)
                if outcome == "crash":
                    self.crashes += 1
                    self._down_until = time.monotonic() + self.restart_s
                    victims = list(self.in_flight)
                    self.in_flight.clear()
                    for victim in victims:
                        if self.while_down == "502":
                            await _respond(victim, 502, {"Connection": "close"}, BAD_GATEWAY)
                            victim.close()
                        else:
                            victim.transport.abort()
                    return
                if outcome == "drop":
                    self.in_flight.discard(writer)
                    writer.transport.abort()
                    return
                if writer not in self.in_flight:
                    return  # dropped by another request's crash
                self.in_flight.discard(writer)
                await _respond(writer, *outcome)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.in_flight.discard(writer)


async def _respond(writer, status: int, headers: dict[str, str], payload: Any) -> None:
    data = json.dumps(payload).encode()
    head = [
        f"HTTP/1.1 {status} X",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
