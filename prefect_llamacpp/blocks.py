"""The `llama.cpp Server` block: where a team keeps one server's connection settings.

Register it once so it shows in the Prefect UI:

    prefect block register -m prefect_llamacpp
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import ConfigDict
from pydantic_ai.models.openai import OpenAIChatModel

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppConnection, LlamaCppSettings
from prefect_llamacpp.launch import LaunchSpec
from prefect_llamacpp.provider import (
    LlamaCppModel,
    create_llamacpp_model,
    create_llamacpp_model_async,
)

DEFAULT_BLOCK_NAME = "llamacpp"


class LlamaCppServer(Block, LlamaCppConnection):
    """Connection settings for one llama.cpp `llama-server` (base URL, API key, timeout, model).

    Create one in the Prefect UI (Blocks -> + -> llama.cpp Server) or in Python with
    `.save(name)`. An empty API key means the server has none; an empty model name means the
    model the server reports. A saved block is validated when it is loaded.

    Example:
        Load a saved block (the Prefect UI fills in its name) and ask its server a question:
        ```python
        from pydantic_ai import Agent

        from prefect_llamacpp import LlamaCppServer

        server = LlamaCppServer.load("BLOCK_NAME")
        agent = Agent(server.create_model())
        print(agent.run_sync("Say hello in five words.").output)
        ```
    """

    # Never echo a rejected value (it may hold the key) in a validation error.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "llama.cpp Server"
    _block_type_slug = "llamacpp-server"
    _description = (
        "Connection settings for a self-hosted llama.cpp server: base URL, API key, timeout "
        "and model name."
    )
    _documentation_url = "https://github.com/ggml-org/llama.cpp/tree/master/tools/server"
    _code_example = """
```python
from pydantic_ai import Agent

from prefect_llamacpp import LlamaCppServer

server = LlamaCppServer.load("BLOCK_NAME")
agent = Agent(server.create_model())
print(agent.run_sync("Say hello in five words.").output)
```
"""

    def settings(self) -> LlamaCppSettings:
        """The stored fields as `LlamaCppSettings` (what the provider library takes)."""
        values = {name: getattr(self, name) for name in LlamaCppConnection.model_fields}
        return LlamaCppSettings(**values)

    def get_client(self, **kwargs) -> LlamaCppClient:
        """A `LlamaCppClient` for this server; use it with `async with`."""
        return LlamaCppClient(self.base_url, timeout=self.timeout, api_key=self.api_key, **kwargs)

    def create_model(self, model_name: str | None = None) -> OpenAIChatModel:
        """A pydantic-ai model for this server, built without contacting it."""
        return create_llamacpp_model(model_name, self.settings())

    async def create_model_async(self, model_name: str | None = None, **kwargs) -> LlamaCppModel:
        """A pydantic-ai model after checking the server is ready, its profile read from the
        server (tools, thinking, images); raises `ServerNotReadyError` if it is not ready."""
        return await create_llamacpp_model_async(model_name, self.settings(), **kwargs)


class LlamaCppLaunch(Block, LaunchSpec):
    """How a run starts its own llama-server on the worker: binary, model, server options.

    A batch given `launch="BLOCK_NAME"` starts the server before its first request, watches it
    (restarting it when wedged or crashed, within the restart policy) and stops it at the end,
    however the run ends. The model may be a local path or a URL (downloaded once per machine).

    Example:
        Run a batch with a server of its own:
        ```python
        from prefect_llamacpp import LlamaCppLaunch, llamacpp_batch_flow

        LlamaCppLaunch(model="s3://models/qwen3-0.6b-q8_0.gguf", parallel=8).save("BLOCK_NAME")
        llamacpp_batch_flow("prompts.jsonl", "results.jsonl", launch="BLOCK_NAME")
        ```
    """

    model_config = ConfigDict(hide_input_in_errors=True, extra="allow")  # as Block

    _block_type_name = "llama.cpp Launch"
    _block_type_slug = "llamacpp-launch"
    _description = (
        "How to start a llama-server for a run: binary, model (path or URL, cached), slots, "
        "context, embeddings, restart policy."
    )
    _documentation_url = "https://github.com/ggml-org/llama.cpp/tree/master/tools/server"
    _code_example = """
```python
from prefect_llamacpp import LlamaCppLaunch, llamacpp_batch_flow

llamacpp_batch_flow("prompts.jsonl", "results.jsonl", launch="BLOCK_NAME")
```
"""

    def spec(self) -> LaunchSpec:
        """The stored fields as a `LaunchSpec` (what `llamacpp_server` takes)."""
        return LaunchSpec(**{name: getattr(self, name) for name in LaunchSpec.model_fields})
