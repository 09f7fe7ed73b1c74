"""A crash on demand for a real llama-server.

llama-server has no prompt that crashes it on demand, so this relay stands in front of a real
server and plays the part of the poison and of the supervisor: when a request carrying `poison`
passes through, it stops listening, SIGKILLs the server (every request in flight, innocent or
not, is dropped unanswered by the dying process), restarts it on the same port, waits until it is
ready, and listens again. While the server is down, clients get connection refused, as they
would from the server itself; with `while_down="drop"` the relay keeps listening and closes each
connection unanswered instead, as an HTTP proxy in front of a restarting server does (nginx and
others). `restart_delay` is the supervisor's pause before it starts the server again.
"""

from __future__ import annotations

import asyncio

from harness.server import LlamaServer, free_port


class CrashingRelay:
    def __init__(
        self,
        server: LlamaServer,
        poison: bytes,
        *,
        while_down: str = "refuse",
        restart_delay: float = 0.0,
    ) -> None:
        self.server = server
        self.poison = poison
        self.while_down = while_down
        self.restart_delay = restart_delay
        self.port = free_port()
        self.crashes = 0
        self._listener: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._crashing: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> CrashingRelay:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._crashing:
            await self._crashing
        self._listener.close()
        for client in list(self._clients):
            client.transport.abort()

    async def _listen(self) -> None:
        self._listener = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        try:
            server_in, server_out = await asyncio.open_connection("127.0.0.1", self.server.port)
        except OSError:
            client_out.transport.abort()
            return
        self._clients.add(client_out)

        async def upstream() -> None:
            tail = b""
            while data := await client_in.read(1 << 16):
                if self.poison in tail + data:
                    self._crash()
                    return
                tail = data[-len(self.poison) :]
                server_out.write(data)
                await server_out.drain()

        async def downstream() -> None:
            while data := await server_in.read(1 << 16):
                client_out.write(data)
                await client_out.drain()

        try:
            await asyncio.wait(
                [asyncio.create_task(upstream()), asyncio.create_task(downstream())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        except (ConnectionError, OSError):
            pass
        finally:
            # The server closed (or died): the client's connection ends unanswered, as it would.
            self._clients.discard(client_out)
            client_out.transport.abort()
            server_out.transport.abort()

    def _crash(self) -> None:
        if self._crashing is None or self._crashing.done():
            self._crashing = asyncio.get_running_loop().create_task(self._crash_and_restart())

    async def _crash_and_restart(self) -> None:
        self.crashes += 1
        if self.while_down == "refuse":
            self._listener.close()
        self.server.kill()
        for client in list(self._clients):
            client.transport.abort()
        await asyncio.sleep(self.restart_delay)
        await asyncio.to_thread(self.server.start)
        if self.while_down == "refuse":
            await self._listen()
