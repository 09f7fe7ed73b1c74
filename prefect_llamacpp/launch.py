"""A launch specification: how to start a `llama-server` for a run, with known-good defaults.

    LaunchSpec(model="s3://models/qwen3-0.6b-q8_0.gguf", parallel=8, ctx_size=16384)

`server_command` is the one place that turns a spec into the server's command line. The
defaults follow what the server API notes verified: `--metrics` and `--slots` (progress for busy vs wedged,
the slots the broker counts), `-kvu` whenever embeddings run on more than one slot
(without it a text's vector depends on what it was packed with), `--cache-ram 0` for embeddings
(the host prompt cache only costs them). The API key goes to the server in its environment
(`LLAMA_API_KEY`), never on a command line another user can read in `ps`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.storage import checked_location, is_url

# Options the launcher sets itself: given in `extra_args` they would fight it.
_OWNED_ARGS = {
    "--host": "host",
    "--port": "port",
    "-m": "model",
    "--model": "model",
    "-mu": "model",
    "--model-url": "model",
    "-hf": "model",
    "--hf-repo": "model",
    "--api-key": "api_key",
    "--api-key-file": "api_key",
    "-hfr": "model",
    "-hff": "model",
    "--hf-file": "model",
    "-dr": "model",
    "--docker-repo": "model",
    "--models-dir": "model",
    "--models-preset": "model",
    "--alias": "alias",
    "-a": "alias",
}
# Secrets that would show in `ps` and in errors: they belong in the environment.
_SECRET_ARGS = {"-hft": "HF_TOKEN", "--hf-token": "HF_TOKEN"}


class RestartPolicy(BaseModel):
    """When the process that started a server restarts it."""

    check_interval: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between the manager's health checks (with the one-token canary); "
        "0: never checked, never restarted.",
    )
    failed_checks: int = Field(
        default=2,
        ge=1,
        description="Checks in a row that must find the server wedged (or not answering while "
        "its process runs) before it is restarted. A crashed process is restarted at once.",
    )
    max_restarts: int = Field(
        default=3, ge=0, description="Most restarts within `window` seconds; then it stays down."
    )
    window: float = Field(
        default=3600.0, gt=0, description="Seconds over which `max_restarts` is counted."
    )
    first_byte_timeout: float = Field(
        default=10.0, gt=0, description="The canary's first-byte deadline, in seconds."
    )


class LaunchSpec(BaseModel):
    """What to start: the binary, the model, and the server options that matter.

    Every field has a value (0, -1 or empty meaning "the server's default"), so Prefect's UI shows
    each as a plain input.
    """

    model_config = ConfigDict(hide_input_in_errors=True, extra="forbid")

    model: str = Field(
        title="Model",
        description="The GGUF file: a local path, or a URL fsspec reads (s3://, https://, ...), "
        "downloaded once into the model cache.",
        min_length=1,
    )
    model_sha256: str = Field(
        default="",
        title="Model SHA-256",
        description="The GGUF file's SHA-256 (hex). Checked after a download, refused when it "
        "differs. Empty: not checked.",
        pattern=r"^([0-9a-fA-F]{64})?$",
    )
    model_size: int = Field(
        default=0,
        ge=0,
        title="Model size (bytes)",
        description="The GGUF file's size in bytes, checked like the SHA-256. 0: not checked.",
    )
    binary: str = Field(
        default="",
        title="llama-server binary",
        description="Path of the llama-server binary. Empty: $LLAMA_SERVER_BIN, then "
        "llama-server on PATH.",
    )
    alias: str = Field(
        default="",
        title="Model alias",
        description="The model id the server reports (--alias). Empty: the file name.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="The address to listen on. 127.0.0.1: only this machine can reach it.",
    )
    port: int = Field(
        default=0, ge=0, le=65535, description="The port to listen on; 0: a free port."
    )
    parallel: int = Field(default=4, ge=1, le=256, title="Slots (-np)")
    ctx_size: int = Field(
        default=0,
        ge=0,
        title="Context (-c)",
        description="Tokens of context for all slots together (each slot gets its share "
        "unless kv_unified); 0: the model's own.",
    )
    threads: int = Field(
        default=0, ge=0, title="Threads (-t)", description="CPU threads; 0: the server's default."
    )
    gpu_layers: int = Field(
        default=-1,
        ge=-1,
        title="GPU layers (-ngl)",
        description="Layers to offload to the GPU; -1: the server's default.",
    )
    embeddings: bool = Field(
        default=False,
        description="Serve /v1/embeddings (--embeddings with --pooling); chat still works.",
    )
    pooling: Literal["mean", "cls", "last", "rank"] = Field(
        default="mean", description="How an embedding is pooled (with embeddings only)."
    )
    kv_unified: bool = Field(
        default=False,
        title="Unified KV cache (-kvu)",
        description="One KV cache shared by every slot. Always on for embeddings on more than "
        "one slot (vectors otherwise depend on what a text was packed with).",
    )
    cache_ram: int = Field(
        default=-1,
        ge=-1,
        title="Prompt cache in RAM (MiB, --cache-ram)",
        description="-1: the server's default (0 for embeddings, which it only slows down).",
    )
    api_key: SecretStr = Field(
        default=SecretStr(""),
        title="API key",
        description="Start the server with this key (clients then need it). Empty: no key.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        title="Extra arguments",
        description="More llama-server arguments, one per item (e.g. --flash-attn, on).",
    )
    ready_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds to wait for the model to load before giving up.",
    )
    restart: RestartPolicy = Field(
        default_factory=RestartPolicy,
        description="When a server found wedged or crashed is restarted.",
    )

    @field_validator("model")
    @classmethod
    def _model_location(cls, value: str) -> str:
        value = value.strip()
        if is_url(value):
            checked_location(value, "model")  # refuses a URL that carries credentials
        return value

    @field_validator("extra_args")
    @classmethod
    def _not_owned(cls, args: list[str]) -> list[str]:
        for arg in args:
            if "\0" in arg:
                raise ValueError("extra_args holds a NUL byte, which no command line can carry")
            name = arg.split("=", 1)[0]
            if name in _OWNED_ARGS:
                raise ValueError(
                    f"extra_args sets {name}, which the launcher sets from the "
                    f"{_OWNED_ARGS[name]!r} field: set that field instead"
                )
            if name in _SECRET_ARGS:
                raise ValueError(
                    f"extra_args sets {name}, a secret any user could read in `ps`: set "
                    f"{_SECRET_ARGS[name]} in the environment of the process that launches"
                )
        return args

    @model_validator(mode="after")
    def _one_model_id(self) -> LaunchSpec:
        # llama-server reads --alias as a comma-separated list: "a,b" would serve as "b".
        if "," in self.model_id or "\0" in self.model_id or "\0" in self.model:
            field = "alias" if self.alias else "model (its file name is the id)"
            raise ValueError(
                f"the model id {self.model_id!r} holds a comma or a NUL byte, which llama-server "
                f"would split or refuse: give an alias without them ({field})"
            )
        return self

    @property
    def unified_kv(self) -> bool:
        return self.kv_unified or (self.embeddings and self.parallel > 1)

    @property
    def model_id(self) -> str:
        """The id the server will report: the alias, else the model file's name."""
        return self.alias or self.model.rstrip("/").rsplit("/", 1)[-1]


def server_command(spec: LaunchSpec, binary: Path, model_path: Path, port: int) -> list[str]:
    """The llama-server command line for `spec` (the key is not in it: see `server_env`)."""
    args = [str(binary), "-m", str(model_path), "--host", spec.host, "--port", str(port)]
    # The alias always: a cached download's file name is not the name the spec gave it.
    # --slots and --metrics explicitly: the health check and the broker read both endpoints.
    args += ["--alias", spec.model_id, "-np", str(spec.parallel), "--metrics", "--slots"]
    if spec.ctx_size:
        args += ["-c", str(spec.ctx_size)]
    if spec.threads:
        args += ["-t", str(spec.threads)]
    if spec.gpu_layers >= 0:
        args += ["-ngl", str(spec.gpu_layers)]
    if spec.unified_kv:
        args.append("-kvu")
    if spec.embeddings:
        args += ["--embeddings", "--pooling", spec.pooling]
    cache_ram = spec.cache_ram if spec.cache_ram >= 0 else (0 if spec.embeddings else -1)
    if cache_ram >= 0:
        args += ["--cache-ram", str(cache_ram)]
    return args + list(spec.extra_args)


def server_env(spec: LaunchSpec) -> dict[str, str]:
    """The server's environment: ours, with the key (or without any key we were given)."""
    env = {name: value for name, value in os.environ.items() if name != "LLAMA_API_KEY"}
    key = spec.api_key.get_secret_value()
    if key:
        env["LLAMA_API_KEY"] = key
    return env


def installed_llama_server(binary: str | Path | None = None) -> Path | None:
    """`binary`, else `$LLAMA_SERVER_BIN`, else `llama-server` on PATH; None when none is set.
    Raises `ConfigurationError` when a named one is not an executable file."""
    for source, candidate in (
        ("binary", binary),
        ("LLAMA_SERVER_BIN", os.environ.get("LLAMA_SERVER_BIN")),
    ):
        if candidate:
            path = Path(candidate).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ConfigurationError(
                    f"{source} names {path}, which is not an executable file: point it at a "
                    "llama-server binary"
                )
            return path
    found = shutil.which("llama-server")
    return Path(found) if found else None


def find_llama_server(binary: str | Path | None = None) -> Path:
    """The llama-server to run (see `installed_llama_server`); raises `ConfigurationError`
    naming what to set when there is none."""
    found = installed_llama_server(binary)
    if found:
        return found
    raise ConfigurationError(
        "no llama-server binary: set the launch spec's binary, or LLAMA_SERVER_BIN, or put "
        "llama-server on PATH (build: https://github.com/ggml-org/llama.cpp#building-the-project)"
    )
