"""The launch spec: the command line it makes, the defaults it applies, what it refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.launch import LaunchSpec, find_llama_server, server_command, server_env

BIN, MODEL = Path("/opt/llama-server"), Path("/models/tiny.gguf")


def command(**fields) -> list[str]:
    return server_command(LaunchSpec(model=str(MODEL), **fields), BIN, MODEL, 8123)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_defaults_listen_on_loopback_with_metrics_and_an_alias():
    args = command()
    assert args[0] == str(BIN)
    assert option(args, "-m") == str(MODEL)
    assert option(args, "--host") == "127.0.0.1" and option(args, "--port") == "8123"
    assert option(args, "-np") == "4" and {"--metrics", "--slots"} <= set(args)
    assert option(args, "--alias") == "tiny.gguf"  # the server reports the spec's name
    for unset in ("-c", "-t", "-ngl", "-kvu", "--embeddings", "--cache-ram"):
        assert unset not in args


def test_a_url_models_alias_is_its_file_name_not_the_cached_files():
    spec = LaunchSpec(model="s3://bucket/models/qwen.gguf")
    assert option(server_command(spec, BIN, Path("/cache/ab12-qwen.gguf"), 1), "--alias") == (
        "qwen.gguf"
    )


def test_embeddings_get_pooling_a_unified_cache_and_no_prompt_cache():
    args = command(embeddings=True, parallel=4)
    assert "--embeddings" in args and option(args, "--pooling") == "mean"
    assert "-kvu" in args  # vectors otherwise depend on what a text was packed with
    assert option(args, "--cache-ram") == "0"
    assert "-kvu" not in command(embeddings=True, parallel=1)
    assert option(command(embeddings=True, cache_ram=512), "--cache-ram") == "512"


def test_every_option_reaches_the_command_line():
    args = command(
        ctx_size=8192,
        threads=2,
        gpu_layers=0,
        kv_unified=True,
        cache_ram=0,
        alias="m",
        extra_args=["--flash-attn", "on"],
        parallel=8,
    )
    assert option(args, "-c") == "8192" and option(args, "-t") == "2"
    assert option(args, "-ngl") == "0" and "-kvu" in args
    assert option(args, "--alias") == "m" and option(args, "-np") == "8"
    assert args[-2:] == ["--flash-attn", "on"]


def test_the_key_is_in_the_environment_never_on_the_command_line():
    spec = LaunchSpec(model=str(MODEL), api_key="sk-launch-secret")
    assert "sk-launch-secret" not in " ".join(server_command(spec, BIN, MODEL, 1))
    assert server_env(spec)["LLAMA_API_KEY"] == "sk-launch-secret"
    assert "sk-launch-secret" not in repr(spec) and "sk-launch-secret" not in str(spec)


def test_no_key_clears_a_key_inherited_from_our_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_API_KEY", "inherited")
    assert "LLAMA_API_KEY" not in server_env(LaunchSpec(model=str(MODEL)))


@pytest.mark.parametrize(
    "arg",
    [
        "--port",
        "--host=0.0.0.0",
        "-m",
        "--api-key",
        "--alias",
        "-hf",
        "-hfr",
        "--hf-file",
        "-dr",
        "--models-dir",
        "--model-url",
    ],
)
def test_extra_args_may_not_set_what_the_launcher_owns(arg):
    with pytest.raises(ValidationError, match="set that field instead"):
        LaunchSpec(model=str(MODEL), extra_args=[arg, "x"])


@pytest.mark.parametrize("arg", ["-hft", "--hf-token=hf_secret"])
def test_a_token_on_the_command_line_is_refused_naming_the_environment(arg):
    with pytest.raises(ValidationError, match="HF_TOKEN in the environment") as caught:
        LaunchSpec(model=str(MODEL), extra_args=[arg, "hf_secret"])
    assert "hf_secret" not in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"alias": "tiny,other"},  # llama-server would serve it as "other"
        {"alias": "ti\0ny"},
        {"model": "/models/a,b.gguf"},  # its file name is the id
        {"extra_args": ["--temp", "0\0"]},
    ],
)
def test_what_a_command_line_cannot_carry_is_refused_at_once(fields):
    with pytest.raises(ValidationError, match="comma or a NUL|NUL byte"):
        LaunchSpec(**{"model": str(MODEL), **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"model": ""},
        {"model": "x", "parallel": 0},
        {"model": "x", "port": 70000},
        {"model": "x", "model_sha256": "abc"},
        {"model": "x", "pooling": "max"},
        {"model": "x", "paralel": 4},  # a typo is refused, not ignored
        {"model": "x", "restart": {"check_interval": -1}},
    ],
)
def test_bad_specs_are_refused(fields):
    with pytest.raises(ValidationError):
        LaunchSpec(**fields)


def test_a_model_url_with_credentials_is_refused_without_showing_them():
    with pytest.raises(ValidationError) as caught:
        LaunchSpec(model="https://user:hunter2@models.example.com/m.gguf")
    assert "hunter2" not in str(caught.value)


def test_the_binary_named_then_the_environment_then_path(tmp_path, monkeypatch):
    named, from_env = tmp_path / "named", tmp_path / "env"
    for path in (named, from_env):
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(from_env))
    assert find_llama_server(str(named)) == named
    assert find_llama_server() == from_env
    monkeypatch.delenv("LLAMA_SERVER_BIN")
    on_path = tmp_path / "llama-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin")
    assert find_llama_server() == on_path


def test_no_binary_names_every_way_to_give_one(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="LLAMA_SERVER_BIN.*PATH"):
        find_llama_server()
    not_executable = tmp_path / "llama-server-copy"
    not_executable.write_text("")
    with pytest.raises(ConfigurationError, match="not an executable file"):
        find_llama_server(str(not_executable))
