"""Where a batch reads its input: a local path, or any URL fsspec opens (`s3://`, `gs://`,
`az://`, ...; the protocol's library installed, e.g. `pip install 'prefect-llamacpp[s3]'`).

Credentials come the way the storage library reads them (for S3: the AWS environment variables,
`~/.aws`, an instance role; `FSSPEC_S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL` for another S3
server), never from the URL: a URL that carries them is refused without being shown.
A URL input is streamed in blocks, never downloaded whole.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlsplit

from prefect_llamacpp.exceptions import ConfigurationError

# Bytes fetched per request from object storage: few round trips, bounded memory.
_BLOCK_BYTES = 8 * 1024 * 1024
# Query parameters that carry a secret (a presigned URL's signature, an access key, a token).
_SECRET_WORDS = ("key", "secret", "token", "signature", "sig", "password", "credential")


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL (`file://` too) rather than a plain path."""
    return isinstance(location, str) and "://" in location


def local_path(location: str | Path) -> Path | None:
    """The local file `location` names (a path or a `file://` URL), or None for remote URLs."""
    if not is_url(location):
        return Path(location)
    parts = urlsplit(str(location))
    return Path(parts.path) if parts.scheme == "file" else None


def shown(location: str | Path) -> str:
    """`location` as logs and messages may show it: a URL without user, password or query."""
    if not is_url(location):
        return str(location)
    parts = urlsplit(str(location))
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def checked_input(location: str | Path) -> str | Path:
    """`location` if a batch can read it; `ConfigurationError` naming the fix if not."""
    if not is_url(location):
        return location
    parts = urlsplit(str(location))
    secret_query = any(
        word in name.lower() for name, _ in parse_qsl(parts.query) for word in _SECRET_WORDS
    )
    if parts.username or parts.password or secret_query:
        raise ConfigurationError(
            f"the input URL {shown(location)} carries credentials; give them the way the "
            "storage library reads them (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "~/.aws, a role), never in the URL"
        )
    _filesystem(str(location))  # an unknown protocol or a missing library, said now
    return str(location)


def input_exists(location: str | Path) -> bool:
    path = local_path(location)
    if path is not None:
        return path.is_file()
    filesystem, inner = _filesystem(str(location))
    try:
        return filesystem.isfile(inner)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {shown(location)}: {exc}") from exc


def open_input(location: str | Path) -> AbstractContextManager[IO[bytes]]:
    """The input's bytes, read as a stream (a URL in blocks, never whole)."""
    path = local_path(location)
    if path is not None:
        return open(path, "rb")
    return _open_url(str(location))


@contextmanager
def _open_url(url: str) -> Iterator[IO[bytes]]:
    filesystem, inner = _filesystem(url)
    with filesystem.open(inner, "rb", block_size=_BLOCK_BYTES) as remote:
        # A standard buffered reader over it: `readline(limit)` as for a local file.
        yield io.BufferedReader(remote, buffer_size=_BLOCK_BYTES)


def _filesystem(url: str):
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ConfigurationError(
            f"{shown(url)} needs a storage library that is not installed ({exc}); for S3: "
            "pip install 'prefect-llamacpp[s3]'"
        ) from exc
    except ValueError as exc:  # an unknown protocol
        raise ConfigurationError(f"{shown(url)}: {exc}") from exc
