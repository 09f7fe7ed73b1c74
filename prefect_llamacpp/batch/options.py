"""A batch run's options, grouped: what every request asks (`RequestOptions`) and how the run goes
(`RunOptions`). The one owner of each option's default, limits and description: the flow's
parameters, the Prefect UI's run form and the `llamacpp-batch` command line are built from them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_llamacpp.batch.ledger import RunSettings
from prefect_llamacpp.config import check_pushgateway_url
from prefect_llamacpp.request import schema_problem

# Requests beyond total_slots that llama-server queues and starts the moment a slot frees: they
# hide the client's round trip between one answer and the next request (docs/benchmarks.md).
DEFAULT_QUEUE_DEPTH = 1
# Texts per /v1/embeddings request: several lines share one request, sparing a round trip each.
DEFAULT_EMBEDDING_BATCH = 32
# The most llama-server takes (a C int); more is refused, or wraps round, at the server.
MAX_TOKENS = 2_147_483_647
# Requests per Prefect task run: each task run costs the Prefect API CPU that a llama-server on
# the same machine lacks, so chunks are large (docs/benchmarks.md).
DEFAULT_CHUNK_SIZE = 500


class RequestOptions(BaseModel):
    """What to ask: settings for every request. A line's own values win."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str | None = Field(None, description="System message for lines that bring none.")
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema: every answer becomes a validated object."
    )
    max_tokens: int | None = Field(
        512,
        ge=1,
        le=MAX_TOKENS,
        description="Most tokens per answer; null: the server's default.",
    )
    temperature: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False, description="Sampling temperature, 0 to 100."
    )
    extra_body: dict[str, Any] | None = Field(
        None,
        description='llama-server fields for every request, e.g. {"top_k": 20, "min_p": 0.05}.',
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description='Variables for the chat template, e.g. {"enable_thinking": false} for a '
        "reasoning model.",
    )
    embeddings: bool = Field(
        False,
        description='Native lines are {"custom_id", "input"} texts to embed (OpenAI lines with '
        "url /v1/embeddings are embedded in any run); the servers need --embeddings.",
    )

    @field_validator("extra_body", "chat_template_kwargs")
    @classmethod
    def _plain_json(cls, value: dict[str, Any] | None, info) -> dict[str, Any] | None:
        # Sent as JSON in every request: a value JSON cannot carry (a set, NaN) would fail
        # every line at the server instead of the run here.
        if value is not None:
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{info.field_name} must be plain JSON ({exc})") from None
        return value

    @field_validator("output_schema")
    @classmethod
    def _usable_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and (problem := schema_problem(schema)):
            raise ValueError(f"output_schema is {problem}")
        return schema

    def run_settings(self, model: str) -> RunSettings:
        """The settings whose fingerprint each result line carries."""
        return RunSettings(
            model=model,
            system_prompt=self.system_prompt,
            output_schema=self.output_schema,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            extra_body=self.extra_body,
            chat_template_kwargs=self.chat_template_kwargs,
        )


class RunOptions(BaseModel):
    """How to run: how much in flight, how long to wait, how often to try."""

    # hide_input_in_errors: a refused pushgateway address may hold a password.
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True
    )

    concurrency: int | None = Field(
        None,
        ge=1,
        description="Most requests in flight per server; empty: total_slots + queue_depth.",
    )
    queue_depth: int = Field(
        DEFAULT_QUEUE_DEPTH,
        ge=0,
        description="Requests beyond total_slots that llama-server queues, to hide the round trip.",
    )
    ready_timeout: float = Field(
        300, gt=0, description="Seconds to wait for a server to be ready, at the start and mid-run."
    )
    request_timeout: float = Field(600, gt=0, description="Seconds to wait for one answer.")
    max_attempts: int = Field(
        3, ge=1, description="Tries per line on a timeout or a 408/429/5xx from a proxy."
    )
    max_crashes: int = Field(
        2,
        ge=1,
        description="Server crashes a line may cause (running alone) before it is given up.",
    )
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE,
        ge=1,
        description="Requests per Prefect task run (embedding lines count as their packs).",
    )
    embedding_batch: int = Field(
        DEFAULT_EMBEDDING_BATCH, ge=1, description="Most texts per /v1/embeddings request."
    )
    ignore_line_models: bool = Field(
        False, description="Send every line to any server, whatever model it names."
    )
    allow_settings_change: bool = Field(
        False, description="Resume an output written with other settings, keeping its answers."
    )
    checkpoint_seconds: float = Field(
        60,
        gt=0,
        description="Object-storage outputs: publish new results at least this often (and at "
        "every chunk's end); a crash loses at most what came since.",
    )
    lease_seconds: float = Field(
        120,
        ge=60,  # Prefect's shortest lease
        description="Object-storage outputs: how long the output stays held by a run that "
        "died (its lease, renewed while it lives).",
    )
    broker: bool = Field(
        True,
        description="Share each server's slots with the other runs on it, through the Prefect "
        "concurrency limit llamacpp-slots-<server> (total_slots + queue_depth).",
    )
    priority: int = Field(
        1, ge=1, le=100, description="This run's weight when runs share a server's slots."
    )
    shards: int = Field(
        1,
        ge=1,
        le=256,
        description="Split the batch into this many flow runs on a work pool (object-storage "
        "input and output); each id goes to one shard by a hash of its custom_id.",
    )
    shard_deployment: str | None = Field(
        None,
        description="Deployment that runs the shards ('flow/deployment'); empty: the parent's "
        "own deployment.",
    )
    metrics_name: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The batch's name in Prometheus metrics and progress events (keep it "
        "stable across runs: it is a label); not given: the output's file name.",
    )
    pushgateway: str | None = Field(
        None,
        description="A Prometheus Pushgateway (http://host:9091) to push the run's figures to; "
        "not given: LLAMACPP_PUSHGATEWAY_URL, if set; an empty string: no push.",
    )

    @field_validator("pushgateway")
    @classmethod
    def _valid_gateway(cls, value: str | None) -> str | None:
        return None if value is None else check_pushgateway_url(value)


OPTION_GROUPS: dict[str, type[BaseModel]] = {"request": RequestOptions, "run": RunOptions}


def option_names() -> Iterator[tuple[str, str]]:
    """(group, field) for every option: for shortcuts and for tests that walk them all."""
    for group, model in OPTION_GROUPS.items():
        for name in model.model_fields:
            yield group, name
