"""The model cache: a GGUF named by URL is downloaded once per machine, checked, and reused.

    path = fetch_model("s3://models/tiny.gguf", sha256="ab12...", size=541_184)

The cache is `$LLAMACPP_MODEL_CACHE`, else `$XDG_CACHE_HOME/prefect-llamacpp/models`, else
`~/.cache/prefect-llamacpp/models`. A download goes to a temporary file beside its final name,
is hashed while it streams, and is renamed into place only when its size and SHA-256 are the
expected ones: a half-written or wrong file is never served. A lock file makes two launches on
one machine download once. A cached file is reused when the expected SHA-256 (if given) is the
one recorded at its download, and its size is the source's current size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.storage import filesystem, is_url, local_path, shown, unreachable

_BLOCK_BYTES = 8 * 1024 * 1024
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# progress(done_bytes, total_bytes or 0)
Progress = Callable[[int, int], None]


def model_cache_dir() -> Path:
    """Where downloaded models are kept (see the module docstring)."""
    configured = os.environ.get("LLAMACPP_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefect-llamacpp" / "models"


def fetch_model(
    location: str, *, sha256: str = "", size: int = 0, progress: Progress | None = None
) -> Path:
    """The local GGUF file for `location` (a path, or a URL downloaded into the cache once).

    Raises `ConfigurationError` when a path does not exist, a URL cannot be read, or the file's
    size or SHA-256 is not the expected one (the message shows both, never the URL's query).
    Blocking: call it in a thread from async code.
    """
    path = local_path(location)
    if path is not None:
        path = path.expanduser()
        if not path.is_file():
            raise ConfigurationError(f"model file {path} does not exist: give a GGUF file's path")
        if size and path.stat().st_size != size:
            raise ConfigurationError(
                f"model file {path} has {path.stat().st_size} bytes, the launch spec says {size}"
            )
        if sha256:
            _check_sha256(location, _file_sha256(path), sha256)
        return path
    if not is_url(location):  # pragma: no cover - local_path answers every non-URL
        raise ConfigurationError(f"{location!r} is neither a path nor a URL")
    return _cached(location, sha256.lower(), size, progress)


def _cached(url: str, sha256: str, size: int, progress: Progress | None) -> Path:
    fs, inner = filesystem(url)
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = inner.rstrip("/").rsplit("/", 1)[-1] or "model.gguf"
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    record = target.with_name(target.name + ".json")
    with _locked(target.with_name(target.name + ".lock")):
        try:
            source_size = int(fs.info(inner).get("size") or 0)
        except FileNotFoundError:
            raise ConfigurationError(f"no model at {shown(url)}: check the URL") from None
        except Exception as exc:  # each storage library raises its own
            raise unreachable(url, exc, "read the model") from None
        if size and source_size and source_size != size:  # before a download, not after
            raise ConfigurationError(
                f"the model at {shown(url)} has {source_size} bytes, the launch spec says {size}"
            )
        if _reusable(target, record, sha256, source_size):
            return target
        part = target.with_name(target.name + ".part")
        try:
            try:
                digest, written = _download(fs, inner, target, source_size, progress)
            except OSError as exc:
                if exc.errno in _DISK_ERRORS:  # this machine's disk, not the source
                    raise ConfigurationError(
                        f"cannot write the model cache {cache}: {exc.strerror}; free space "
                        "there or point LLAMACPP_MODEL_CACHE at a disk that has it"
                    ) from None
                raise unreachable(url, exc, "download the model") from None
            except Exception as exc:  # each storage library raises its own
                raise unreachable(url, exc, "download the model") from None
            if (size or source_size) and written != (size or source_size):
                raise ConfigurationError(
                    f"the model at {shown(url)} came as {written} bytes, "
                    f"{'the launch spec says' if size else 'the source says'} "
                    f"{size or source_size}: the download was cut short, or fix model_size"
                )
            if sha256:
                _check_sha256(url, digest, sha256)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.chmod(part, 0o444)  # the cache's copy is not to be edited in place
        os.replace(part, target)
        record.write_text(json.dumps({"url": shown(url), **_identity(target), "sha256": digest}))
        return target


def _identity(path: Path) -> dict[str, int]:
    """What changes when a file is written to or replaced: its size, mtime and inode."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _reusable(target: Path, record: Path, sha256: str, source_size: int) -> bool:
    try:
        recorded = json.loads(record.read_text())
        identity = _identity(target)
    except (OSError, ValueError):
        return False
    if source_size and identity["size"] != source_size:
        return False  # changed at the source
    if sha256 and recorded.get("sha256") != sha256:
        return False
    if all(recorded.get(key) == value for key, value in identity.items()):
        return True
    # Touched since it was downloaded: hashed again, reused only when still the same bytes.
    return recorded.get("sha256") == _file_sha256(target)


def _download(fs, inner: str, target: Path, total: int, progress: Progress | None):
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)  # a killed download's leftover
    digest = hashlib.sha256()
    written = 0
    shown_at = 0
    # Read once, front to back: a plain stream (block_size 0) where the library offers one,
    # so an HTTP server without range requests serves it too.
    streamed = 0 if "http" in _protocols(fs) else _BLOCK_BYTES
    with fs.open(inner, "rb", block_size=streamed) as remote, open(part, "wb") as local:
        while block := remote.read(_BLOCK_BYTES):
            local.write(block)
            digest.update(block)
            written += len(block)
            if progress is not None and (written - shown_at >= total / 20 or written == total):
                progress(written, total)
                shown_at = written
        local.flush()
        os.fsync(local.fileno())
    return digest.hexdigest(), written


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(location: str, actual: str, expected: str) -> None:
    if actual != expected.lower():
        raise ConfigurationError(
            f"the model at {shown(location)} has SHA-256 {actual}, the launch spec expects "
            f"{expected.lower()}: fix model_sha256, or the file"
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield
