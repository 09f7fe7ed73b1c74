"""A real S3 server on loopback for the tests: moto's server mode (the server s3fs tests itself
against) in a process of its own, reached over HTTP the way users reach theirs.

    def test_x(s3_bucket): ...   # an empty bucket; s3:// URLs work in this process
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from harness.server import free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The S3 endpoint URL of a moto server started for this test session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "the moto server exited; see its log"
                assert time.monotonic() < deadline, "the moto server did not start in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


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
