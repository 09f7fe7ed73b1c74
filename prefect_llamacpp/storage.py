"""Where a batch reads its input and writes its output: a local path, or any URL fsspec opens
(`s3://`, `gs://`, `az://`, ...; the protocol's library installed, e.g.
`pip install 'prefect-llamacpp[s3]'`).

Credentials come the way the storage library reads them (for S3: the AWS environment variables,
`~/.aws`, an instance role; `FSSPEC_S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL` for another S3
server), or from a storage block for the run (`storage_credentials`), never from the URL: a URL
that carries them is refused without being shown.
A URL input is streamed in blocks, never downloaded whole.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from prefect_llamacpp.exceptions import ConfigurationError

# Bytes fetched per request from object storage: few round trips, bounded memory.
_BLOCK_BYTES = 8 * 1024 * 1024
# A query or fragment parameter that carries a secret (a presigned URL's signature, a token).
_SECRET_PARAMETER = re.compile(
    r"(^|[?&;#])[^=&;#]*(key|secret|token|sig|pass|pwd|auth|credential)[^=&;#]*=", re.IGNORECASE
)
# `user:password@` right after the scheme; the password may hold `/` (AWS secret keys do).
_USER_PASSWORD = re.compile(r"://([^/?#@]*):([^@]*)@")
# Schemes whose URLs name a port after the host (`host:8080/...`): not a password.
_PORTED = {"http", "https", "ftp", "sftp", "ssh", "webdav", "hdfs", "webhdfs", "smb"}
# A storage block's options (credentials, endpoint) for the URLs of one protocol: set for a run,
# seen by every task and thread it starts, never in a parameter, a log or a message.
_CREDENTIALS: ContextVar[tuple[str, dict[str, Any]] | None] = ContextVar(
    "storage_credentials", default=None
)


@contextmanager
def storage_credentials(protocol: str, options: dict[str, Any]) -> Iterator[None]:
    """Open every `protocol` URL (`s3`) with these fsspec `options` within the block."""
    token = _CREDENTIALS.set((protocol, options))
    try:
        yield
    finally:
        _CREDENTIALS.reset(token)


def under(location: str | Path, base: str | None) -> str | Path:
    """`location` as a run with a storage block reads it: a path is relative to the block's base
    URL; a URL stays as it is."""
    if base is None or is_url(location):
        return location
    return base.rstrip("/") + "/" + str(location).lstrip("/")


def is_url(location: str | Path) -> bool:
    """Whether `location` is a URL (`file://` too) rather than a plain path."""
    return isinstance(location, str) and "://" in location


def local_path(location: str | Path) -> Path | None:
    """The local file `location` names (a path or a `file://` URL, read as fsspec reads it),
    or None for remote URLs."""
    if not is_url(location):
        return Path(location)
    if not str(location).startswith("file://"):
        return None
    from fsspec.core import url_to_fs

    return Path(url_to_fs(str(location))[1])


def shown(location: str | Path) -> str:
    """`location` as logs and messages may show it: a URL without its query or fragment (and,
    for one carrying credentials, only its scheme)."""
    if not is_url(location):
        return str(location)
    text = str(location)
    if _carries_credentials(text):
        return text.split("://", 1)[0] + "://(a URL with credentials, not shown)"
    return re.split(r"[?#]", text, maxsplit=1)[0]


def checked_input(location: str | Path) -> str | Path:
    """`location` if a batch can read it; `ConfigurationError` naming the fix if not."""
    return checked_location(location, "input")


def checked_location(location: str | Path, role: str) -> str | Path:
    """`location` (the batch's `role`: input or output) if its URL carries no credentials and
    its storage library is installed; `ConfigurationError` naming the fix if not."""
    if not is_url(location):
        return location
    if _carries_credentials(str(location)):
        raise ConfigurationError(
            f"the {role} URL {shown(location)} carries credentials; give them the way the "
            "storage library reads them (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "~/.aws, a role), never in the URL"
        )
    filesystem(str(location))  # an unknown protocol or a missing library, said now
    return str(location)


def _carries_credentials(url: str) -> bool:
    for part in url.split("::"):  # a chained URL (simplecache::s3://...): each part
        query = re.search(r"[?#].*", part)
        if query and _SECRET_PARAMETER.search(query.group()):
            return True
        match = _USER_PASSWORD.search(part)
        if match is None:
            continue
        scheme = part.split("://", 1)[0].lower()
        after_colon = match.group(2)
        if scheme in _PORTED and re.match(r"\d+/", after_colon):
            continue  # host:port/...@...: an `@` in the path, not a password
        if scheme == "github":
            continue  # github://org:repo@sha/path is fsspec's form, no secret in it
        return True
    return False


def input_exists(location: str | Path) -> bool:
    """Whether the input is a file; `ConfigurationError` when the storage cannot say (no
    credentials, the endpoint unreachable), naming the URL but not repeating the library's text
    (it may quote the URL whole)."""
    path = local_path(location)
    if path is not None:
        return path.is_file()
    fs, inner = filesystem(str(location))
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return False
    except Exception as exc:  # each storage library raises its own
        raise unreachable(location, exc, "read") from None
    return info.get("type") == "file"


def input_size(location: str | Path) -> int:
    """The input's size in bytes (it exists: `input_exists` said so)."""
    path = local_path(location)
    if path is not None:
        return path.stat().st_size
    fs, inner = filesystem(str(location))
    try:
        return int(fs.info(inner).get("size") or 0)
    except Exception as exc:  # each storage library raises its own
        raise unreachable(location, exc, "read") from None


def unreachable(location: str | Path, exc: BaseException, doing: str) -> ConfigurationError:
    """The error for storage that cannot be used: names the URL and the fix, not the library's
    text (it may quote the URL whole)."""
    return ConfigurationError(
        f"cannot {doing} {shown(location)} ({type(exc).__name__}): are the storage "
        "credentials and endpoint set (for S3: AWS_* variables, ~/.aws, AWS_ENDPOINT_URL)?"
    )


def open_input(location: str | Path) -> AbstractContextManager[IO[bytes]]:
    """The input's bytes, read as a stream (a URL in blocks, never whole)."""
    path = local_path(location)
    if path is not None:
        return open(path, "rb")
    return _open_url(str(location))


@contextmanager
def _open_url(url: str) -> Iterator[IO[bytes]]:
    fs, inner = filesystem(url)
    with fs.open(inner, "rb", block_size=_BLOCK_BYTES) as remote:
        # A standard buffered reader over it: `readline(limit)` as for a local file.
        yield io.BufferedReader(remote, buffer_size=_BLOCK_BYTES)


def canonical_url(url: str) -> str:
    """The one name of the object `url` names (`s3a://b/x/` and `s3://b/x` are one object):
    what leases and overlap checks compare."""
    fs, inner = filesystem(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return f"{protocol}://{inner.rstrip('/')}"


def filesystem(url: str):
    """(the fsspec filesystem, the path inside it) for `url`; `ConfigurationError` when its
    library is missing or its protocol unknown."""
    import fsspec.core

    credentials = _CREDENTIALS.get()
    options = {}
    if credentials is not None and url.split("://", 1)[0] == credentials[0]:
        options = credentials[1]
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ConfigurationError(
            f"{shown(url)} needs a storage library that is not installed ({exc}); for S3: "
            "pip install 'prefect-llamacpp[s3]'"
        ) from exc
    except ValueError as exc:  # an unknown protocol
        raise ConfigurationError(f"{shown(url)}: {exc}") from exc
