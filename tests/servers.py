"""Real llama-server processes for the integration and flow tests (a pytest plugin).

The binary comes from `harness.binary` (LLAMA_SERVER_BIN, PATH, or the cached build): if none can
be had the session fails, it never skips. Servers are session- or module-scoped and always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from harness.binary import ensure_llama_server
from harness.models import ensure_model
from harness.server import LlamaServer
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from tests.conftest import SECRET_KEY


@pytest.fixture(scope="session")
def llama_server_bin():
    return ensure_llama_server()


@pytest.fixture(scope="session")
def tiny_model():
    return ensure_model("tiny")


def _server(bin_path, model, args, tmp_path_factory):
    return LlamaServer(model, args, binary=bin_path, log_dir=tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def server(llama_server_bin, tiny_model, tmp_path_factory):
    """4 slots of 1024 tokens each, metrics on, alias `tiny`."""
    args = ["-np", "4", "-c", "4096", "--alias", "tiny", "--metrics"]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def tools_server(llama_server_bin, tmp_path_factory):
    """The tiny model with a template that renders tool calls and switches thinking."""
    args = ["-np", "2", "-c", "4096", "--alias", "tiny-tools", "--metrics"]
    model = ensure_model("tiny-tools")
    with _server(llama_server_bin, model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def key_server(llama_server_bin, tiny_model, tmp_path_factory):
    """Started with --api-key; no --metrics."""
    args = ["-np", "2", "--alias", "tiny-secure", "--api-key", SECRET_KEY]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def no_slots_server(llama_server_bin, tiny_model, tmp_path_factory):
    with _server(llama_server_bin, tiny_model, ["--no-slots"], tmp_path_factory) as running:
        yield running


# The tiny model's ChatML template, plus a line for each template variable the tests set. The
# server always defines `enable_thinking` (false unless --reasoning on); a request's
# `chat_template_kwargs` override it and add others.
ECHO_TEMPLATE = (
    "{% if enable_thinking is defined %}[enable_thinking={{ enable_thinking }}]\n{% endif %}"
    "{% if greeting is defined %}[greeting={{ greeting }}]\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def template_server(llama_server_bin, tiny_model, tmp_path_factory):
    """One slot, alias `tiny-echo`, a jinja chat template that echoes its variables
    (`ECHO_TEMPLATE`)."""
    template = tmp_path_factory.mktemp("templates") / "echo.jinja"
    template.write_text(ECHO_TEMPLATE)
    args = ["-np", "1", "--alias", "tiny-echo", "--jinja", "--chat-template-file", str(template)]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


# A reasoning model's template, as Qwen3's does it: the generation prompt opens `<think>` unless
# enable_thinking is false, and earlier thoughts are rendered from `reasoning_content`. From that
# llama-server's template analysis reads the reasoning markers, so with `--reasoning on` it
# streams what the model writes as `reasoning_content`, not `content`.
THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') -%}"
    "{{- '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\n\n</think>\n\n' -}}{%- else -%}{{- '<think>\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@pytest.fixture(scope="session")
def thinking_server(llama_server_bin, tiny_model, tmp_path_factory):
    """One slot, alias `tiny-think`, a reasoning template (`THINKING_TEMPLATE`), thinking on:
    every token the model writes is a thought."""
    template = tmp_path_factory.mktemp("templates") / "think.jinja"
    template.write_text(THINKING_TEMPLATE)
    args = ["-np", "1", "--alias", "tiny-think", "--jinja", "--chat-template-file", str(template)]
    args += ["--reasoning", "on", "--metrics"]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def embedding_server(llama_server_bin, tiny_model, tmp_path_factory):
    """`--embeddings --pooling mean`, 2 slots sharing one KV cache, alias `tiny-embed`.

    The tiny model names no pooling type, and with pooling `none` /v1/embeddings answers 400.
    `-kvu`: with `-np 2` alone (b1-0c1e570), the middle input of a three-input request got a
    different vector than the same text sent alone; with `-kvu` (the default without `-np`)
    every input's vector is the same either way."""
    args = ["-np", "2", "-kvu", "--alias", "tiny-embed", "--embeddings", "--pooling", "mean"]
    args += ["--cache-ram", "0"]  # as docs/llama-server.md advises for embedding servers
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def no_pooling_server(llama_server_bin, tiny_model, tmp_path_factory):
    """`--embeddings` without a pooling type (the tiny model names none)."""
    with _server(llama_server_bin, tiny_model, ["--embeddings"], tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def busy_server(llama_server_bin, tmp_path_factory):
    """One slot of the 340 MB `bench` model, metrics on: tokens cost real time, so a long
    generation keeps the slot busy for many seconds (see `long_generation`)."""
    args = ["-np", "1", "-c", "2048", "--alias", "bench", "--metrics"]
    with _server(llama_server_bin, ensure_model("bench"), args, tmp_path_factory) as running:
        yield running


@asynccontextmanager
async def long_generation(server: LlamaServer, max_tokens: int = 1900):
    """A long generation in flight on `server` (until it is generating), cancelled at the end.

    Closing the connection makes llama-server drop the request, so the slot frees at once.
    """
    async with (
        httpx.AsyncClient(timeout=300) as http,
        LlamaCppClient(server.url, api_key=None) as client,
    ):
        baseline = (await client.get_metrics())["n_decode_total"]
        request = asyncio.create_task(
            http.post(
                f"{server.openai_base}/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "Write a long story."}],
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
            )
        )
        try:
            for _ in range(300):
                metrics = await client.get_metrics()
                if metrics["requests_processing"] >= 1 and metrics["n_decode_total"] > baseline + 2:
                    break
                assert not request.done(), "the long generation ended before it was seen"
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the long generation never started")
            yield request
        finally:
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await request


@pytest.fixture(scope="session")
def router_server(llama_server_bin, tiny_model, tmp_path_factory):
    """Router mode over two models, `alpha` and `beta`, none loaded at start."""
    models_dir = tmp_path_factory.mktemp("router-models")
    for name in ("alpha", "beta"):
        shutil.copy(tiny_model, models_dir / f"{name}.gguf")
    args = ["--models-dir", str(models_dir), "--models-max", "1"]
    with _server(llama_server_bin, None, args, tmp_path_factory) as running:
        yield running


def settings_for(server: LlamaServer, **overrides) -> LlamaCppSettings:
    return LlamaCppSettings(base_url=server.openai_base, timeout=10, **overrides)


def servers_of(model: Path, keepers: bool = False) -> list[int]:
    """PIDs of the llama-servers running `model` (each test copies the model to a path of its
    own, so only its servers match), and with `keepers` the keepers that started them."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # Not its keeper, whose argv holds the server's too (unless asked for).
        server = argv[0].endswith(b"/llama-server") or (
            keepers and any(a.endswith(b"/_keeper.py") for a in argv[:3])
        )
        if server and state != "Z" and str(model).encode() in argv:
            pids.append(int(entry.name))
    return pids


def none_left(model: Path, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while servers_of(model, keepers=True):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
