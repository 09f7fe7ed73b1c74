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


def test_shown_drops_the_query_and_hides_a_url_with_credentials():
    assert shown("s3://bucket/in.jsonl?versionId=3") == "s3://bucket/in.jsonl"
    assert shown("http://127.0.0.1:9000/bucket/in.jsonl") == "http://127.0.0.1:9000/bucket/in.jsonl"
    assert "secret" not in shown("s3://AKIA:secret@bucket/in.jsonl")
    assert shown("/data/in.jsonl") == "/data/in.jsonl"


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("s3://AKIAEXAMPLE:wJalr/hunter2SECRET@bucket/in.jsonl", True),  # a `/` in the secret
        ("http://u:ab/hunter2SECRET@127.0.0.1:5917/x", True),
        ("simplecache::s3://AKIA:hunter2SECRET@bucket/in.jsonl", True),  # a chained URL
        ("http://user:1234@host/x", True),
        ("s3://bucket/in.jsonl?auth=hunter2SECRET", True),
        ("s3://bucket/in.jsonl?a=1;token=hunter2SECRET", True),
        ("s3://bucket/in.jsonl#token=hunter2SECRET", True),
        ("https://host/x?X-Amz-Signature=hunter2SECRET", True),
        ("abfs://container@account.dfs.core.windows.net/in.jsonl", False),  # adlfs's form
        ("github://org:repo@sha/in.jsonl", False),  # fsspec's github form
        ("http://127.0.0.1:5917/bucket/a@b.jsonl", False),  # an `@` in the path
        ("s3://bucket/a@b.jsonl?versionId=3", False),
    ],
)
def test_credentials_are_found_wherever_they_hide_and_never_shown(url, refused):
    from prefect_llamacpp.storage import _carries_credentials

    assert _carries_credentials(url) is refused
    if refused:
        assert "hunter2SECRET" not in shown(url) and "wJalr" not in shown(url)
        with pytest.raises(ConfigurationError, match="carries credentials") as info:
            checked_input(url)
        assert "hunter2SECRET" not in str(info.value)


def test_a_relative_file_url_is_read_as_fsspec_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("file://rel/in.jsonl") == tmp_path / "rel" / "in.jsonl"
