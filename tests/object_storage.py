"""A real S3 server on loopback for the tests: moto's server mode (the server s3fs tests itself
against) in a process of its own, reached over HTTP the way users reach theirs.

    def test_x(s3_bucket): ...   # an empty bucket; s3:// URLs work in this process
"""

from __future__ import annotations

import os
import uuid

import pytest

from harness.s3 import S3_ENV
from harness.s3 import s3_server as start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The S3 endpoint URL of a moto server started for this test session."""
    with start_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A new bucket on the session's S3 server, with this process pointed at that server the
    way a user points theirs (environment variables only). Its name, e.g. `batch-1f2e...`."""
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"batch-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()


def upload(local: os.PathLike, url: str) -> str:
    import s3fs

    s3fs.S3FileSystem().put_file(str(local), url)
    return url
