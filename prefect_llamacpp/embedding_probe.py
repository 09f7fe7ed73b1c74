"""Does a server give a text the same vector in a shared request as alone?

Verified on b1-0c1e570 with `--embeddings --pooling mean`: started with `-np N` (N > 1) and no
`-kvu`, texts of different lengths sent in one request (or concurrently) come back with vectors
of cosine ~0.93 to their own vector alone, every time, while with `-kvu` (the default without
`-np`) they agree to 1e-4. Nothing in `/props`, `/slots` or `/v1/models` tells the two apart, so
the only way to know is to ask: three texts of different lengths together, then each alone.
"""

from __future__ import annotations

import math

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.request import build_embedding_request, read_embedding_answer

PROBE_TEXTS = ("llama.cpp probe", "llama.cpp probe " + "word " * 7, "llama.cpp " + "word " * 14)
MIN_COSINE = 0.999


async def packed_embeddings_problem(client: LlamaCppClient, model: str) -> str | None:
    """Why packed embedding requests to this server cannot be trusted, or None when they can.

    Four small requests. Raises the client's errors (e.g. `NotSupportedError` without
    `--embeddings`)."""
    packed = await _vectors(client, model, list(PROBE_TEXTS))
    alone = [(await _vectors(client, model, [text]))[0] for text in PROBE_TEXTS]
    worst = min(_cosine(a, b) for a, b in zip(packed, alone, strict=True))
    if worst >= MIN_COSINE:
        return None
    return (
        f"texts embedded together get other vectors than alone (cosine {worst:.3f}): the server "
        "splits its KV cache between slots (-np without -kvu); start it with -kvu"
    )


async def _vectors(client: LlamaCppClient, model: str, texts: list[str]) -> list[list[float]]:
    request = build_embedding_request(texts, model=model)
    return read_embedding_answer(await client.embeddings(request.body), request.count).vectors


def _cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / norm if norm else 0.0
