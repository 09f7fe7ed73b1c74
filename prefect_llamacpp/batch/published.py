"""A ledger whose truth is on object storage: an output URL (`s3://...`) any node can resume.

Objects cannot be appended to or locked, so:

- the live ledger is a local file as for a local output (`Ledger`, on the node's disk under
  `$TMPDIR/prefect-llamacpp/`), rebuilt from the published parts when a run starts;
- at each checkpoint (a chunk's end, and every `checkpoint_seconds`) the complete lines written
  since the last one are published as an immutable part, `<output>.parts/part-000007.jsonl`,
  with a create-only write: a retried publish that had landed finds its own bytes there, and a
  part another run wrote first (a run that lost its lease) stops this one;
- a run's end joins the parts into the output object (and, in the OpenAI format, the errors
  object), keeping the first success line of any id. The parts stay: they are the ledger, the
  output is built from them; with no parts, an existing output object is the ledger (a rerun
  after the parts were removed).

A run killed at any moment loses the lines since its last part; they run again. One run per
output across nodes is the caller's lease (`flows/output_lease.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from prefect_llamacpp.batch.ledger import Ledger, errors_path_of, settings_path_of, unique_lines
from prefect_llamacpp.exceptions import ConfigurationError, LedgerInUseError
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.storage import canonical_url, filesystem, shown, unreachable

logger = get_logger_with_context("published")

# The most one part holds: a part is read into memory to be written in one create-only request.
MAX_PART_BYTES = 64 * 1024 * 1024
_PART_NAME = re.compile(r"part-(\d{6,})\.jsonl$")
_TRIES = 3  # per part, on a storage fault; the lines stay in the local ledger meanwhile


class PublishedLedger:
    """The object-storage side of one output URL: restore, publish, join."""

    def __init__(self, url: str, *, staging: Path | None = None) -> None:
        self.url = url
        self.fs, self._object = filesystem(url)
        _check_create_only(self.fs)
        if "/" not in self._object.strip("/"):
            raise ConfigurationError(
                f"output {shown(url)} names a bucket, not an object in it; give a key, e.g. "
                f"{shown(url).rstrip('/')}/results.jsonl"
            )
        self._parts_dir = self._object + ".parts"
        key = hashlib.sha256(canonical_url(url).encode()).hexdigest()[:16]
        root = staging or Path(tempfile.gettempdir()) / "prefect-llamacpp" / "staging"
        name = Path(self._object).name or "output.jsonl"
        self.local = root / key / name
        """The live ledger on this node's disk."""
        self.parts = 0  # published so far, by every run (the next part's number)
        self._published = 0  # bytes of the local ledger that are in parts
        self._settings_sent: bytes | None = None
        self._lock = asyncio.Lock()

    @property
    def errors_url(self) -> str:
        return self.url + ".errors.jsonl"

    def restore(self) -> int:
        """Rebuild the local ledger from the parts (or, with none, from the output object) and
        fetch the settings file. Returns the parts read. Call it holding the output's lease."""
        self.local.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.local, settings_path_of(self.local), errors_path_of(self.local)):
            stale.unlink(missing_ok=True)  # whatever an earlier run left here is not the truth
        try:
            self.fs.invalidate_cache()  # listings cached by an earlier run in this process
            parts = self._listed_parts()
            with open(self.local, "wb") as local:
                for _, part in parts:
                    with self.fs.open(part, "rb") as remote:
                        shutil.copyfileobj(remote, local, 8 * 1024 * 1024)
                if not parts and self.fs.isfile(self._object):
                    # The output is the ledger: copied here, published as the first part.
                    with self.fs.open(self._object, "rb") as remote:
                        shutil.copyfileobj(remote, local, 8 * 1024 * 1024)
            self.parts = parts[-1][0] + 1 if parts else 0
            self._published = _cut_to_whole_lines(self.local) if parts else 0
            settings = self._object + ".settings.json"
            if self.fs.isfile(settings):
                self._settings_sent = self.fs.cat_file(settings)
                settings_path_of(self.local).write_bytes(self._settings_sent)
        except Exception as exc:  # each storage library raises its own
            raise unreachable(self.url, exc, "read the output") from None
        return len(parts)

    def _listed_parts(self) -> list[tuple[int, str]]:
        try:
            names = self.fs.ls(self._parts_dir, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        numbered = []
        for name in names:
            match = _PART_NAME.search(name)
            if match:
                numbered.append((int(match.group(1)), name))
        return sorted(numbered)

    async def publish(self) -> int:
        """Publish the complete lines written since the last part (with the settings file,
        when it changed, first). Returns the parts written. Raises `LedgerInUseError` when
        another run wrote a part of this output, `ConfigurationError` when storage refuses."""
        async with self._lock:
            await self._publish_settings()
            written = 0
            while data := await asyncio.to_thread(self._unpublished):
                await self._put_part(self.parts, data)
                self.parts += 1
                self._published += len(data)
                written += 1
            return written

    def _unpublished(self) -> bytes:
        """The complete lines after the last part, at most `MAX_PART_BYTES` of them (a line
        still being written waits for the next part)."""
        with open(self.local, "rb") as local:
            local.seek(self._published)
            data = local.read(MAX_PART_BYTES)
            if len(data) == MAX_PART_BYTES and b"\n" not in data:
                data += local.readline()  # one line longer than a part: it is the part
        return data[: data.rfind(b"\n") + 1]

    async def _publish_settings(self) -> None:
        path = settings_path_of(self.local)
        settings = path.read_bytes() if path.exists() else None
        if settings is not None and settings != self._settings_sent:
            await self._call("write", self.fs.pipe_file, self._object + ".settings.json", settings)
            self._settings_sent = settings

    async def _put_part(self, number: int, data: bytes) -> None:
        name = f"{self._parts_dir}/part-{number:06d}.jsonl"
        try:
            await self._call("write", self.fs.pipe_file, name, data, mode="create")
        except FileExistsError:
            # Our own earlier try that landed, or another run's part: only ours is identical.
            if await asyncio.to_thread(self.fs.cat_file, name) != data:
                raise LedgerInUseError(
                    f"part {number} of {shown(self.url)} was written by another run (one whose "
                    "lease had lapsed?); this run stops. Its lines since the last part run "
                    "again on the next run; nothing is answered twice in the output."
                ) from None

    async def _call(self, doing: str, function, *args, **kwargs):
        for attempt in range(1, _TRIES + 1):
            try:
                return await asyncio.to_thread(function, *args, **kwargs)
            except FileExistsError:
                raise
            except Exception as exc:  # each storage library raises its own
                # No bucket, no permission: no second try will find one.
                if attempt == _TRIES or isinstance(exc, FileNotFoundError | PermissionError):
                    raise unreachable(self.url, exc, doing) from None
                logger.warning(
                    "Object storage fault; trying again",
                    output=shown(self.url),
                    fault=type(exc).__name__,
                    attempt=attempt,
                )
                await asyncio.sleep(attempt)

    async def join(self, ledger: Ledger) -> None:
        """Publish what is left, then write the output object from the ledger (each id's first
        success line only) and, in the OpenAI format, the errors object. Raises
        `LedgerInUseError` when another run published parts this run has not read."""
        await self.publish()
        if self.parts == 0:
            return  # nothing was ever written: no output object
        listed = await asyncio.to_thread(self._listed_parts)
        if listed and listed[-1][0] >= self.parts:
            raise LedgerInUseError(
                f"another run published parts of {shown(self.url)} after this one started (its "
                "lease had lapsed?); this run does not write the output over them. Rerun to "
                "join them all."
            )
        if ledger.state.duplicate_successes:
            joined = await asyncio.to_thread(self._deduplicated)
            await self._call("write", self.fs.put_file, str(joined), self._object)
            joined.unlink()
        else:
            await self._call("write", self.fs.put_file, str(self.local), self._object)
        errors = ledger.errors_path
        if errors is not None and errors.exists():
            await self._call("write", self.fs.put_file, str(errors), self._object + ".errors.jsonl")

    async def put_beside(self, suffix: str, data: bytes) -> None:
        """Write `<output><suffix>` (a run's summary, say)."""
        await self._call("write", self.fs.pipe_file, self._object + suffix, data)

    def _deduplicated(self) -> Path:
        joined = self.local.with_name(self.local.name + ".joined")
        with open(self.local, "rb") as source, open(joined, "wb") as target:
            target.writelines(unique_lines(source))
        return joined


def _check_create_only(fs) -> None:
    """Refuse a storage library that would take a create-only write for an overwrite."""
    if type(fs).__module__.startswith("s3fs"):
        import s3fs
        from packaging.version import Version

        if Version(s3fs.__version__) < Version("2024.12.0"):
            raise ConfigurationError(
                f"s3fs {s3fs.__version__} overwrites where a batch's output must write "
                "create-only; upgrade it: pip install 's3fs>=2024.12'"
            )


def _cut_to_whole_lines(local: Path) -> int:
    """Drop a cut last line from the restored ledger (a part damaged by hand): the bytes kept
    end on a newline, so the next part starts on a line. Returns the size kept."""
    size = local.stat().st_size
    if size == 0:
        return 0
    with open(local, "rb+") as file:
        file.seek(max(0, size - 1))
        if file.read(1) == b"\n":
            return size
        kept, end = 0, size
        while end > 0:  # back from the end, a MB at a time: the ledger may be large
            start = max(0, end - 1024 * 1024)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                kept = start + newline + 1
                break
            end = start
        file.truncate(kept)
    logger.warning("Dropped a cut last line of the published parts; it runs again")
    return kept
