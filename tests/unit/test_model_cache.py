"""The model cache: a URL downloaded once, checked by size and SHA-256, never served half-written.

The URLs here are fsspec's in-memory filesystem (memory://); tests/integration/test_managed_server
serves a model from the local S3 server and over HTTP."""

from __future__ import annotations

import hashlib
import threading

import fsspec
import pytest

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.model_cache import fetch_model, model_cache_dir

BYTES = b"GGUF" + bytes(range(256)) * 64
SHA = hashlib.sha256(BYTES).hexdigest()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACPP_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def url(request):
    fs = fsspec.filesystem("memory")
    path = f"/models-{request.node.name.translate({ord('['): '-', ord(']'): None})}/tiny.gguf"
    fs.pipe(path, BYTES)
    yield f"memory://{path}"
    fs.rm(path)


def reads(monkeypatch) -> list[str]:
    """Count the opens of the source: a cached model is not read again."""
    opened = []
    memory = type(fsspec.filesystem("memory"))
    original = memory._open

    def counting(self, path, *args, **kwargs):
        opened.append(path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(memory, "_open", counting)
    return opened


def test_the_cache_directory_follows_the_environment(cache, monkeypatch):
    assert model_cache_dir() == cache
    monkeypatch.delenv("LLAMACPP_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert str(model_cache_dir()) == "/x/prefect-llamacpp/models"


def test_a_url_is_downloaded_once_and_checked(url, cache, monkeypatch):
    opened = reads(monkeypatch)
    seen = []
    path = fetch_model(url, sha256=SHA.upper(), size=len(BYTES), progress=lambda *a: seen.append(a))
    assert path.parent == cache and path.read_bytes() == BYTES and path.name.endswith("tiny.gguf")
    assert seen[-1] == (len(BYTES), len(BYTES))
    assert fetch_model(url, sha256=SHA) == path
    assert fetch_model(url) == path
    assert len(opened) == 1
    assert not list(cache.glob("*.part"))


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(url, cache):
    with pytest.raises(ConfigurationError, match=f"SHA-256 {SHA}.*expects 0{{64}}"):
        fetch_model(url, sha256="0" * 64)
    assert not list(cache.glob("*.gguf")) and not list(cache.glob("*.part"))
    with pytest.raises(ConfigurationError, match=f"{len(BYTES)} bytes.*says 5"):
        fetch_model(url, size=5)


def test_the_checksum_recorded_at_download_serves_later_checks(url, monkeypatch):
    path = fetch_model(url)  # no checksum asked: the digest is recorded all the same
    opened = reads(monkeypatch)
    assert fetch_model(url, sha256=SHA) == path
    assert opened == []
    with pytest.raises(ConfigurationError, match="expects 1{64}"):
        fetch_model(url, sha256="1" * 64)  # fetched again to be sure, and refused
    assert len(opened) == 1 and path.read_bytes() == BYTES


def test_a_source_that_changed_size_is_fetched_again(url):
    path = fetch_model(url)
    fsspec.filesystem("memory").pipe(url.removeprefix("memory://"), BYTES + b"more")
    assert fetch_model(url) == path and path.read_bytes() == BYTES + b"more"


def test_a_cached_file_cut_short_is_fetched_again(url):
    path = fetch_model(url)
    path.chmod(0o644)  # the cache keeps it read-only
    path.write_bytes(BYTES[:10])
    assert fetch_model(url).read_bytes() == BYTES


@pytest.mark.parametrize("sha256", ["", SHA], ids=["unchecked", "checked"])
def test_a_cached_file_damaged_in_place_is_fetched_again(url, monkeypatch, sha256):
    path = fetch_model(url, sha256=sha256)
    assert path.stat().st_mode & 0o222 == 0  # read-only: not to be edited in place
    path.chmod(0o644)
    damaged = bytearray(BYTES)
    damaged[100] ^= 0xFF  # one byte, same size
    path.write_bytes(bytes(damaged))
    opened = reads(monkeypatch)
    assert fetch_model(url, sha256=sha256).read_bytes() == BYTES
    assert len(opened) == 1  # hashed, found changed, downloaded again


def test_an_untouched_cached_file_is_not_hashed_again(url, monkeypatch):
    import prefect_llamacpp.model_cache as model_cache

    fetch_model(url, sha256=SHA)
    hashed = []
    monkeypatch.setattr(model_cache, "_file_sha256", lambda p: hashed.append(p) or SHA)
    fetch_model(url, sha256=SHA)
    assert hashed == []  # a multi-GB model is not read at every launch


def test_a_wrong_size_is_refused_before_downloading(url, cache, monkeypatch):
    opened = reads(monkeypatch)
    with pytest.raises(ConfigurationError, match=f"has {len(BYTES)} bytes, the launch spec says 7"):
        fetch_model(url, size=7)
    assert opened == [] and not list(cache.glob("*.part"))


def test_a_download_that_fails_midway_names_the_fix_and_leaves_nothing(url, cache, monkeypatch):
    memory = type(fsspec.filesystem("memory"))

    def broken(self, path, *args, **kwargs):
        raise ValueError("the HTTP server doesn't appear to support range requests")

    monkeypatch.setattr(memory, "_open", broken)
    with pytest.raises(ConfigurationError, match="cannot download the model memory://"):
        fetch_model(url)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_two_launches_at_once_download_once(url, monkeypatch):
    opened = reads(monkeypatch)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(fetch_model(url))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and len(opened) == 1


def test_a_missing_url_and_a_missing_path_name_the_fix(tmp_path):
    with pytest.raises(ConfigurationError, match="no model at memory://nowhere/x.gguf"):
        fetch_model("memory://nowhere/x.gguf")
    with pytest.raises(ConfigurationError, match="does not exist"):
        fetch_model(str(tmp_path / "absent.gguf"))


def test_a_local_path_is_used_in_place_and_checked_when_asked(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(BYTES)
    assert fetch_model(str(path)) == path
    assert fetch_model(str(path), sha256=SHA, size=len(BYTES)) == path
    with pytest.raises(ConfigurationError, match="SHA-256"):
        fetch_model(str(path), sha256="1" * 64)
