"""Input locations: local paths, file:// and fsspec URLs; credentials never in a URL."""

from __future__ import annotations

import pytest

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.storage import checked_input, input_exists, local_path, open_input, shown


def test_paths_and_file_urls_are_local(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"custom_id": "a", "prompt": "hi"}\n')
    for location in (str(source), source, f"file://{source}"):
        assert local_path(location) == source
        assert input_exists(checked_input(location))
        with open_input(location) as lines:
            assert lines.readline(1000).startswith(b'{"custom_id"')
    assert local_path("s3://bucket/in.jsonl") is None


def test_an_unknown_protocol_is_refused_naming_it():
    with pytest.raises(ConfigurationError, match="nosuchproto://bucket/in.jsonl"):
        checked_input("nosuchproto://bucket/in.jsonl")


def test_shown_drops_user_password_and_query():
    assert shown("s3://AKIA:secret@bucket/in.jsonl?token=x") == "s3://bucket/in.jsonl"
    assert shown("/data/in.jsonl") == "/data/in.jsonl"
