"""A real S3 server on 127.0.0.1 for the tests and the benchmark: moto's server mode (the server
s3fs tests itself against) in a process of its own, reached over HTTP as users reach theirs.

    with s3_server(log_dir) as endpoint:      # http://127.0.0.1:PORT
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness.server import free_port

# Credentials moto accepts; a user's come from their own environment the same way.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """The endpoint URL of a moto server started for the block; stopped after it."""
    port = free_port()
    with open(log_dir / "moto.log", "w") as log:
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
                    assert process.poll() is None, f"the moto server exited; see {log.name}"
                    assert time.monotonic() < deadline, "the moto server did not start in 60 s"
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(10)
