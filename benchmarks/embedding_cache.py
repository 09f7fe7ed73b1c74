"""Embeddings with and without llama-server's host-memory prompt cache (`--cache-ram`).

    python -m benchmarks.embedding_cache [--texts 16000]

Sends distinct texts in requests of 32, 4 in flight, to a server started by default and then to
one started with `--cache-ram 0`, printing texts/s and the server's RSS every 2,000 texts.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from harness.models import ensure_model
from harness.server import LlamaServer

SLOTS = 4
PACK = 32
EVERY = 2000


def _rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


async def _send(url: str, pid: int, texts: list[str]) -> None:
    gate = asyncio.Semaphore(SLOTS)
    limits = httpx.Limits(max_connections=SLOTS)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def one(pack: list[str]) -> None:
            async with gate:
                body = {"input": pack, "model": "tiny", "encoding_format": "base64"}
                response = await http.post(f"{url}/v1/embeddings", json=body)
                response.raise_for_status()

        for start in range(0, len(texts), EVERY):
            part = texts[start : start + EVERY]
            began = time.monotonic()
            await asyncio.gather(*(one(part[i : i + PACK]) for i in range(0, len(part), PACK)))
            rate = len(part) / (time.monotonic() - began)
            print(f"  {start + len(part):6d} texts: {rate:4.0f}/s, server RSS {_rss_mb(pid)} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=16000)
    count = parser.parse_args().texts
    texts = [f"Document {i}: notes on topic {i % 97} and item {i}. " * 3 for i in range(count)]
    base = ["-np", str(SLOTS), "-kvu", "--alias", "tiny", "--embeddings", "--pooling", "mean"]
    for label, extra in (("default prompt cache", []), ("--cache-ram 0", ["--cache-ram", "0"])):
        print(label, flush=True)
        with tempfile.TemporaryDirectory() as logs:
            server = LlamaServer(ensure_model("tiny"), base + extra, log_dir=Path(logs))
            with server:
                asyncio.run(_send(server.url, server.process.pid, texts))


if __name__ == "__main__":
    main()
