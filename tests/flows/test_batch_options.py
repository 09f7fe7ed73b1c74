"""Every batch option reaches the runner, from the flow's parameters and from the command line,
and a bad value is refused before anything runs: the option models are their one owner."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic_settings import CliApp

from prefect_llamacpp.batch import runner as runner_module
from prefect_llamacpp.batch.options import RequestOptions, RunOptions, option_names
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows import batch as batch_flow

pytestmark = pytest.mark.integration

# A value other than the default for every option; a new option without one fails the test.
NOT_DEFAULT = {
    "system_prompt": "Answer in one word.",
    "output_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
    "max_tokens": 7,
    "temperature": 0.5,
    "extra_body": {"top_k": 3},
    "chat_template_kwargs": {"enable_thinking": False},
    "embeddings": True,
    "concurrency": 3,
    "queue_depth": 2,
    "ready_timeout": 42.0,
    "request_timeout": 43.0,
    "max_attempts": 4,
    "max_crashes": 5,
    "chunk_size": 6,
    "embedding_batch": 9,
    "ignore_line_models": True,
    "allow_settings_change": True,
    "checkpoint_seconds": 5.0,
    "lease_seconds": 90.0,
    "broker": False,
    "priority": 3,
    "shards": 2,
    "shard_deployment": "llamacpp-batch/elsewhere",
    "metrics_name": "nightly-eval",
    # Nobody listens there: the push fails with a warning and the run goes on.
    "pushgateway": "http://127.0.0.1:9",
}
# What a run that reaches the runner is given: a sharded one is a parent and runs no lines.
RUNNER_VALUES = NOT_DEFAULT | {"shards": 1}


def test_every_option_has_a_test_value_unlike_its_default():
    assert {name for _, name in option_names()} == set(NOT_DEFAULT)
    for group, name in option_names():
        model = RequestOptions if group == "request" else RunOptions
        assert model.model_fields[name].default != NOT_DEFAULT[name], name
        assert model.model_fields[name].description, f"{name} has no description"


def cli_flags() -> list[str]:
    flags = []
    for name, value in RUNNER_VALUES.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + name.replace("_", "-"))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


@pytest.fixture
def runner_options(monkeypatch):
    """The options each BatchRunner is built with (the real runner runs on)."""
    seen = []
    real = runner_module.BatchRunner.__init__

    def spy(self, servers, model_name, options, **kwargs):
        seen.append(options)
        real(self, servers, model_name, options, **kwargs)

    monkeypatch.setattr(runner_module.BatchRunner, "__init__", spy)
    return seen


def assert_all_reached(options) -> None:
    for group, name in option_names():
        assert getattr(getattr(options, group), name) == RUNNER_VALUES[name], name


async def test_every_option_reaches_the_runner_from_the_flow(
    embedding_server, registered_block_type, runner_options, tmp_path
):
    await LlamaCppServer(base_url=embedding_server.url, timeout=5).save("opts", overwrite=True)
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "input": "hello"}\n')
    groups = {"request": {}, "run": {}}
    for group, name in option_names():
        groups[group][name] = RUNNER_VALUES[name]
    summary = await batch_flow.llamacpp_batch_flow(
        str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), server="opts", **groups
    )
    assert summary.succeeded == 1
    (options,) = runner_options
    assert_all_reached(options)
    assert options.concurrency == NOT_DEFAULT["concurrency"]


async def test_every_option_reaches_the_runner_from_the_command_line(
    embedding_server, registered_block_type, runner_options, tmp_path
):
    await LlamaCppServer(base_url=embedding_server.url, timeout=5).save("opts", overwrite=True)
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "input": "hello"}\n')
    argv = [str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--server", "opts"]
    # main() runs its own event loop, as on a terminal.
    assert await asyncio.to_thread(batch_flow.main, argv + cli_flags()) == 0
    (options,) = runner_options
    assert_all_reached(options)


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--max-tokens", "0", "--request.max-tokens"),
        ("--temperature", "nan", "--request.temperature"),
        ("--temperature", "101", "--request.temperature"),
        ("--concurrency", "0", "--run.concurrency"),
        ("--queue-depth", "-1", "--run.queue-depth"),
        ("--chunk-size", "0", "--run.chunk-size"),
        ("--max-crashes", "0", "--run.max-crashes"),
        ("--output-schema", '{"type": 5}', "--request.output-schema"),
        ("--chat-template-kwargs", "[1]", "--request.chat-template-kwargs"),
        ("--extra-body", '{"min_p": NaN}', "--request.extra-body"),
        ("--max-tokens", "2147483648", "--request.max-tokens"),
        ("--server", "", "--server"),
        ("--schema-file", "/nonexistent/schema.json", "--schema-file"),
    ],
)
def test_a_bad_option_is_refused_naming_it(capsys, flag, value, named):
    assert batch_flow.main(["in.jsonl", "out.jsonl", flag, value]) == 2
    err = capsys.readouterr().err
    # pydantic-settings names a value it could not parse as request.chat_template_kwargs.
    assert named.lstrip("-").replace("-", "_") in err.replace("-", "_"), err
    assert "Traceback" not in err


async def test_the_flow_refuses_a_bad_option_before_opening_anything(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "hi"}\n')
    state = await batch_flow.llamacpp_batch_flow(
        str(tmp_path / "in.jsonl"),
        str(tmp_path / "out.jsonl"),
        request={"max_tokens": 0},
        return_state=True,
    )
    assert state.is_failed() and "max_tokens" in state.message
    assert not (tmp_path / "out.jsonl").exists()


def test_a_fleet_naming_a_block_twice_is_refused_before_anything_starts(capsys):
    assert batch_flow.main(["in.jsonl", "out.jsonl", "--server", "a", "--server", "a"]) == 2
    assert "--server: server names a block twice" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, b"bytes"])
def test_request_fields_sent_as_json_must_be_plain_json(value):
    for field in ("extra_body", "chat_template_kwargs"):
        with pytest.raises(ValueError, match=f"{field} must be plain JSON"):
            RequestOptions(**{field: {"x": value}})


def test_null_asks_for_the_servers_default_max_tokens():
    command = CliApp.run(batch_flow.BatchCommand, cli_args=["a", "b", "--max-tokens", "null"])
    assert command.request.max_tokens is None
