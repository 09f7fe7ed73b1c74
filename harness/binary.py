"""Find a `llama-server` binary, building it once from a pinned PyPI sdist when none is found.

Order: `$LLAMA_SERVER_BIN`, then `llama-server` on `PATH`, then the per-user build cache. The
build takes llama.cpp from the `llama-cpp-python` sdist (it vendors the whole tree under
`vendor/llama.cpp`), because PyPI is the one source this project may download from.

    python -m harness.binary          # print the path, building first if needed
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.launch import installed_llama_server

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file is easy to cache and move
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # the web UI needs npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... or a download from a hub this machine cannot reach
]


class ServerBinaryError(RuntimeError):
    """No llama-server could be found or built; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefect-llamacpp" / f"llama-server-{SDIST_VERSION}"


def cached_binary() -> Path:
    return cache_dir() / "bin" / "llama-server"


def find_llama_server() -> Path | None:
    """The binary to use without building ($LLAMA_SERVER_BIN, PATH, then the cache), or None."""
    try:
        found = installed_llama_server()
    except ConfigurationError as exc:
        raise ServerBinaryError(f"{exc}, or unset LLAMA_SERVER_BIN to build one") from exc
    if found:
        return found
    cached = cached_binary()
    return cached if cached.is_file() else None


def ensure_llama_server(log=print) -> Path:
    """A path to a runnable llama-server; builds and caches one if none exists (~10 min on 2 cores)."""
    found = find_llama_server()
    if found:
        return found
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache / "build.lock", log):
        # Another process may have finished the build while we waited for the lock.
        if cached_binary().is_file():
            return cached_binary()
        for stale in cache.glob("build-*"):  # left by a build that was killed outright
            shutil.rmtree(stale, ignore_errors=True)
        _build(cache, log)
    return cached_binary()


@contextmanager
def _build_lock(lock_path: Path, log):
    with open(lock_path, "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[llama-server] another build holds {lock_path}; waiting for it")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build(cache: Path, log) -> None:
    started = time.monotonic()
    log(
        f"[llama-server] no binary found (LLAMA_SERVER_BIN, PATH, {cached_binary()}); "
        f"building from the {SDIST_PACKAGE}=={SDIST_VERSION} sdist. "
        "This takes about 10 minutes on 2 cores and happens once."
    )
    # Work in a scratch dir inside the cache; only a finished binary is moved into bin/.
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as scratch:
        work = Path(scratch)
        source = _fetch_source(work, log)
        build_dir = work / "build"
        jobs = str(os.cpu_count() or 2)
        build_log = cache / "build.log"
        build_log.unlink(missing_ok=True)
        log(f"[llama-server] compiling; full output in {build_log}")
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS], log, build_log)
        build = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs]
        _run(build, log, build_log)
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise ServerBinaryError(f"the build finished but {built} is missing")
        target = cached_binary()
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(".partial")
        shutil.copy2(built, staged)
        os.replace(staged, target)  # atomic: a half-copied file never looks finished
    log(f"[llama-server] built {target} in {time.monotonic() - started:.0f} s")


def _fetch_source(work: Path, log) -> Path:
    archive = work / SDIST_FILE
    local = os.environ.get("LLAMA_CPP_SDIST")  # an already-downloaded sdist, for offline machines
    if local:
        shutil.copy(local, archive)
    else:
        log(f"[llama-server] downloading {SDIST_FILE} (75 MB) from PyPI")
        url = _sdist_url()
        with urllib.request.urlopen(url, timeout=120) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ServerBinaryError(f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(work / "src", members=members, filter="data")
    roots = list((work / "src").glob("*/vendor/llama.cpp"))
    if not roots:
        raise ServerBinaryError("the sdist holds no vendor/llama.cpp tree")
    return roots[0]


def _sdist_url() -> str:
    """The sdist's download URL from PyPI's simple index (PEP 691 JSON)."""
    index = os.environ.get("PYPI_SIMPLE_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{SDIST_PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ServerBinaryError(
            f"could not read {index}/{SDIST_PACKAGE}/ ({exc}); download {SDIST_FILE} by hand "
            "and set LLAMA_CPP_SDIST to its path, or set LLAMA_SERVER_BIN"
        ) from exc
    for entry in files:
        if entry["filename"] == SDIST_FILE:
            return entry["url"]
    raise ServerBinaryError(f"{SDIST_FILE} is not listed at {index}/{SDIST_PACKAGE}/")


def _run(cmd: list[str], log, build_log: Path | None = None) -> None:
    """Run a build step, its output going to `build_log`; a heartbeat line every 30 s."""
    if shutil.which(cmd[0]) is None:
        raise ServerBinaryError(
            f"{cmd[0]} is not installed; install cmake and a C++ compiler (g++)"
        )
    build_log = build_log or Path(os.devnull)
    with open(build_log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while True:
            try:
                process.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                log(
                    f"[llama-server] still building ({time.monotonic() - started:.0f} s) {_last_progress(build_log)}"
                )
            except BaseException:
                process.kill()
                raise
    if process.returncode != 0:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-30:])
        raise ServerBinaryError(f"{' '.join(cmd[:4])} ... failed ({process.returncode}):\n{tail}")


def _last_progress(build_log: Path) -> str:
    try:
        lines = build_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.startswith("[")), "")


if __name__ == "__main__":
    try:
        print(ensure_llama_server(log=lambda m: print(m, file=sys.stderr, flush=True)))
    except ServerBinaryError as exc:
        sys.exit(f"error: {exc}")
