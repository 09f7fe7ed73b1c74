"""The output file is the ledger: one result line per input line, appended as items finish.

Rules (each one a promise the tests break on purpose):

- One run per ledger: `Ledger.open` takes an exclusive `flock` on the output file for the run's
  life; the kernel drops it when the process ends, SIGKILL included, so no stale lock file is
  ever left. A second run fails at once with `LedgerInUseError`.
- Input and output are never the same file (same resolved path or same inode: `BatchPathError`).
- Each result line records `input_fp` (what the line asked) and `settings_fp` (the run's
  settings: model, system prompt, schema, sampling). A rerun skips an id only when both match:
  a changed line gets a `ledger_mismatch` error line, never a silent skip. The run's settings are
  kept beside the ledger in `<output>.settings.json`; a run whose settings differ is refused,
  naming what differs, unless it passes `allow_settings_change` (then the done ids stay done).
- A last line cut short by a crash is dropped; a complete last line without a newline is kept.
  Unreadable lines are counted. Lines are flushed as written and fsynced at chunk ends.
- No id ever gets a second success line: the writer refuses one.
- Lines are written in one output format, ours or OpenAI's (`openai_output.py`), recorded in the
  settings file. Reading takes either, line by line; a run asking for another format than the
  lines already there is refused (`LedgerFormatError`). In the OpenAI format every failed line
  also goes to `<output>.errors.jsonl`, after the output (so on open, failed lines the output has
  and the errors file lacks, a crash's gap, are appended there).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prefect_llamacpp import fast_json
from prefect_llamacpp.batch.openai_output import (
    ErrorsFile,
    is_openai_line,
    read_openai_line,
    render_openai_line,
)
from prefect_llamacpp.batch.records import INPUT_ERROR_KINDS, OutputFormat, ResultLine
from prefect_llamacpp.exceptions import (
    BatchPathError,
    LedgerFormatError,
    LedgerInUseError,
    LedgerSettingsError,
)
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.request import canonical_json, fingerprint

logger = get_logger_with_context("ledger")


@dataclass
class LedgerState:
    """What earlier runs left in the ledger."""

    done: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    """custom_id -> (input_fp, settings_fp) of its success line."""
    settings_fps: set[str] = field(default_factory=set)
    written_input_errors: set[tuple[str, int]] = field(default_factory=set)
    written_mismatches: set[tuple[str, str | None]] = field(default_factory=set)
    lines: int = 0
    unreadable_lines: int = 0
    dropped_partial_line: bool = False
    kept_unterminated_line: bool = False
    formats: set[OutputFormat] = field(default_factory=set)
    """The output formats of the result lines read."""
    duplicate_successes: int = 0
    """Success lines for an id that already had one (two runs wrote one output: the first is
    the answer; `unique_lines` leaves the others out)."""
    errors_behind: int = 0
    errors_stale: bool = False  # the errors file's last line is not in the output
    """OpenAI-format failed lines after the last one the errors file holds (a crash's gap)."""


@dataclass(frozen=True)
class RunSettings:
    """The run-level settings that shape every request; their fingerprint goes on each line."""

    model: str
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra_body: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        settings = {
            "model": self.model,
            "system_prompt": self.system_prompt,
            "output_schema": self.output_schema,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "extra_body": self.extra_body,
        }
        # Added later: only when set, so the fingerprints of existing ledgers stay as they were.
        if self.chat_template_kwargs is not None:
            settings["chat_template_kwargs"] = self.chat_template_kwargs
        return settings

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.as_dict())


class Ledger:
    """An open, locked ledger: its past (`state`) and the writer for this run's lines."""

    def __init__(
        self,
        path: Path,
        file: IO[bytes],
        state: LedgerState,
        output_format: OutputFormat = "native",
        errors: ErrorsFile | None = None,
    ) -> None:
        self.path = path
        self.state = state
        self.output_format: OutputFormat = output_format
        self._file = file
        # The OpenAI format's errors file: written under the output's lock, never locked itself.
        self._errors = errors
        self.succeeded: set[str] = set(state.done)
        self.lines_written = 0
        self.accepted_settings: set[str] = set()
        self._created = False

    @classmethod
    def open(
        cls,
        output: Path,
        input_path: Path | None = None,
        *,
        output_format: OutputFormat = "native",
    ) -> Ledger:
        """Lock `output` (created if missing) and read what earlier runs wrote; this run writes
        its lines in `output_format`.

        Raises `BatchPathError` when `output` is `input_path` or a directory (or the input is a
        file the batch writes beside it), `LedgerInUseError` when another run holds it,
        `LedgerFormatError` when its lines are in another format. Nothing is written before the
        lock is held.
        """
        if output.is_dir():
            raise BatchPathError(f"output {output} is a directory; give a file path")
        errors_path = errors_path_of(output) if output_format == "openai" else None
        if errors_path is not None and _same_file(errors_path, output):
            raise BatchPathError(
                f"{errors_path}, where the batch writes failed lines, is the output {output} "
                "itself (a link?); give the output another path"
            )
        if input_path is not None:
            for written in _written_beside(output, errors_path):
                if _same_file(input_path, written):
                    raise BatchPathError(
                        f"input {input_path} is the same file as {written}, which the batch "
                        "writes; give the output another path"
                    )
        output.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            created = not output.exists()
            file = open(output, "ab+")
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise LedgerInUseError(
                    f"output {output} is in use by another batch run (it holds the file's lock); "
                    "wait for that run to end or give another output path. Nothing was sent."
                ) from None
            if _is_still(file, output):
                break
            file.close()  # the path was removed or replaced while we opened it: take the new one
        else:
            raise LedgerInUseError(
                f"output {output} keeps being replaced; is another run using it?"
            )
        errors = ErrorsFile(errors_path) if errors_path is not None else None
        try:
            errors_tail = errors.open() if errors is not None else None
            state = _read_state(file, errors_tail=errors_tail)
            _check_format(output, state, output_format)
        except BaseException:
            if errors is not None:
                errors.close()
            file.close()
            raise
        ledger = cls(output, file, state, output_format, errors)
        ledger._created = created
        if state.kept_unterminated_line:
            ledger._append(b"\n")
        if errors is not None and state.errors_stale:
            # The output is the truth: an errors file from an output since removed or replaced
            # would list failures this ledger never had.
            logger.warning(
                "The errors file does not match the output (replaced?); rebuilt from the output",
                errors_file=str(errors.path),
            )
            errors.rebuild(file)
        elif errors is not None and state.errors_behind:
            logger.warning(
                "Failed lines missing from the errors file are added",
                count=state.errors_behind,
                errors_file=str(errors.path),
            )
            errors.catch_up(file, errors_tail)
        return ledger

    # -- settings ----------------------------------------------------------------------------

    @property
    def settings_path(self) -> Path:
        return settings_path_of(self.path)

    @property
    def errors_path(self) -> Path | None:
        """Where failed lines also go (OpenAI format only; the file exists once one failed)."""
        return errors_path_of(self.path) if self.output_format == "openai" else None

    def check_settings(self, settings: RunSettings, *, allow_change: bool = False) -> list[str]:
        """Accept `settings` for this run, or raise `LedgerSettingsError` saying what differs.

        Accepted: the settings of this run, and those the settings file lists (the first run's,
        and any a run took with `allow_change`). Answers made under any other settings (another
        run's, a merged file) need `allow_change`. Returns what changed (only with `allow_change`).
        """
        current = settings.fingerprint
        in_lines = {fp for fp in self.state.settings_fps if fp}
        stored = self._stored_settings() if in_lines else None
        known: dict[str, Any] = {}
        if stored and isinstance(stored.get("accepted"), dict):
            known.update(stored["accepted"])
        foreign = in_lines - set(known) - {current}
        new = in_lines and current not in known and current not in in_lines
        changed: list[str] = []
        if foreign or new:
            last = stored.get("settings") if stored else None
            if isinstance(last, dict) and current not in known:
                new = settings.as_dict()
                differences = {
                    name: (last.get(name), new[name])
                    for name in new
                    if canonical_json(last.get(name)) != canonical_json(new[name])
                }
            elif stored is None:
                missing = "missing or unreadable"
                differences = {f"(unknown: {self.settings_path.name} is {missing})": (None, None)}
            else:
                count = sum(1 for _, fp in self.state.done.values() if fp in foreign)
                differences = {
                    f"({count} answers were made with settings this ledger never accepted: "
                    "a merged or copied file?)": (None, None)
                }
            changed = list(differences)
            if not allow_change:
                raise LedgerSettingsError(
                    f"the ledger {self.path} was written with other settings: "
                    f"{_describe(differences)}. Rerun with the same settings, give a new output "
                    "path, or pass allow_settings_change (--allow-settings-change) to keep the "
                    "answers already there and run the rest with the new settings.",
                    differences=differences,
                )
            logger.warning(
                "Settings changed; earlier answers are kept", ledger=str(self.path), changed=changed
            )
            known.update(dict.fromkeys(foreign))
        known[current] = settings.as_dict()
        self.accepted_settings = set(known)
        _write_json_atomic(
            self.settings_path,
            {
                "settings": settings.as_dict(),
                "fingerprint": current,
                "accepted": known,
                "output_format": self.output_format,
            },
        )
        return changed

    def _stored_settings(self) -> dict[str, Any] | None:
        try:
            stored = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            logger.warning("Unreadable settings file ignored", path=str(self.settings_path))
            return None
        return stored if isinstance(stored, dict) else None

    def is_done(self, custom_id: str, input_fp: str) -> bool | None:
        """True: answered for this very request. False: answered, but for another request.
        None: not answered yet."""
        if custom_id not in self.succeeded:
            return None
        answered = self.state.done.get(custom_id)
        if answered is None:
            return True  # answered in this run
        line_fp, settings_fp = answered
        if line_fp is None:
            return True  # written before fingerprints existed; counted in `legacy_lines`
        return line_fp == input_fp and settings_fp in self.accepted_settings

    # -- writing -----------------------------------------------------------------------------

    def write(self, record: ResultLine) -> bool:
        """Append one result line and flush it. Returns False (and writes nothing) for a second
        success line for the same id."""
        return self.write_all([record]) == 1

    def write_all(self, records: list[ResultLine]) -> int:
        """Append result lines (one request's: a pack of embeddings) in one write and flush.
        A second success line for an id is left out. Returns the lines written."""
        lines, errors, answered = [], [], set()
        for record in records:
            custom_id, ok = record["custom_id"], record["error"] is None
            if ok and (custom_id in self.succeeded or custom_id in answered):
                logger.warning("Refused a second success line", custom_id=custom_id)
                continue
            if self.output_format == "openai":
                shaped: dict[str, Any] = render_openai_line(record)
            elif "response" in record:  # the server's raw answer: only the OpenAI format keeps it
                shaped = {key: value for key, value in record.items() if key != "response"}
            else:
                shaped = record
            data = fast_json.dumps(shaped) + b"\n"
            lines.append(data)
            if ok:
                answered.add(custom_id)
            elif self._errors is not None:
                errors.append(data)
        # Done before the write: a write that fails (a full disk) may leave its bytes in the
        # buffer, to land at the next flush; a retry must not write them twice. (A line that
        # could not be encoded, above, raised before anything was marked or written.)
        self.succeeded |= answered
        if lines:
            self._append(b"".join(lines))
        if errors:  # after the output: a crash between leaves a gap `open` fills
            self._errors.append(b"".join(errors))
        self.lines_written += len(lines)
        return len(lines)

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    def sync(self) -> None:
        """Flush to the disk, not only to the OS (at chunk ends: survives a machine crash too)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._errors is not None:
            self._errors.sync()

    def close(self) -> None:
        """Sync and close; the lock goes with the file. A ledger this run created and never
        wrote to is removed, so a run that failed before its first result leaves nothing."""
        if self._file.closed:
            return
        self.sync()
        if self._created and self.lines_written == 0 and self.path.stat().st_size == 0:
            self.path.unlink(missing_ok=True)
            self.settings_path.unlink(missing_ok=True)
        if self._errors is not None:
            self._errors.close()
        self._file.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def legacy_lines(self) -> int:
        return sum(1 for line_fp, _ in self.state.done.values() if line_fp is None)


def read_ledger(path: Path) -> LedgerState:
    """What a ledger holds, read without a lock and without changing it (for reports and tests)."""
    if not path.exists():
        return LedgerState()
    with open(path, "rb") as file:
        return _read_state(file, repair=False)


def unique_lines(file: IO[bytes]) -> Iterator[bytes]:
    """The ledger's lines from the start, less every success line for an id that had one
    before (the first answer is the one kept, as `LedgerState.done` keeps it)."""
    answered: set[str] = set()
    file.seek(0)
    for raw in file:
        record = _parse(raw)
        if record is not None and is_openai_line(record):
            record = read_openai_line(record)
        if record is not None and record.get("error") is None:
            if record["custom_id"] in answered:
                continue
            answered.add(record["custom_id"])
        yield raw


def _read_state(
    file: IO[bytes], *, repair: bool = True, errors_tail: str | None = None
) -> LedgerState:
    """Read a ledger line by line, in either format. `errors_tail`: the `id` of the errors
    file's last line; OpenAI-format failed lines after it are counted in `errors_behind`."""
    state = LedgerState()
    file.seek(0)
    complete_bytes = 0
    errors_seen = errors_tail is None
    for raw in file:
        if not raw.endswith(b"\n"):
            if not _is_json(raw):
                state.dropped_partial_line = True  # a crash mid-write; the item runs again
                break
            state.kept_unterminated_line = True  # complete, written without a newline: keep it
        complete_bytes += len(raw)
        state.lines += 1
        record = _parse(raw)
        if record is None:
            state.unreadable_lines += 1
            continue
        if is_openai_line(record):
            state.formats.add("openai")
            # The errors file lags the output only by lines after its last one (written after).
            if record.get("error") is not None:
                if errors_seen:
                    state.errors_behind += 1
                elif record.get("id") == errors_tail:
                    errors_seen = True
            record = read_openai_line(record)
        else:
            state.formats.add("native")
        _note(state, record)
    if repair and state.dropped_partial_line:
        file.truncate(complete_bytes)
    state.errors_stale = not errors_seen
    if state.unreadable_lines:
        logger.warning("Unreadable ledger lines skipped", count=state.unreadable_lines)
    return state


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return None
    return record


def _note(state: LedgerState, record: dict[str, Any]) -> None:
    custom_id = record["custom_id"]
    error = record.get("error")
    if error is None:
        if custom_id in state.done:
            state.duplicate_successes += 1
            return
        state.done[custom_id] = (record.get("input_fp"), record.get("settings_fp"))
        state.settings_fps.add(record.get("settings_fp"))
        return
    kind = error.get("kind") if isinstance(error, dict) else None
    if kind in INPUT_ERROR_KINDS:
        state.written_input_errors.add((custom_id, record.get("line")))
    elif kind == "ledger_mismatch":
        state.written_mismatches.add((custom_id, record.get("input_fp")))


def _check_format(output: Path, state: LedgerState, wanted: OutputFormat) -> None:
    others = state.formats - {wanted}
    if others:
        written = " and ".join(sorted(state.formats))
        raise LedgerFormatError(
            f"the ledger {output} holds lines in the {written} output format; this run asks for "
            f"{wanted!r}. Resume it with output_format={sorted(others)[0]!r} (--output-format "
            f"{sorted(others)[0]}), or give a new output path for the {wanted!r} format. "
            "Nothing was sent."
        )


# The ledger's path names, all here: the settings file and the OpenAI format's errors file go
# beside the output under its full name plus a suffix, so `out.jsonl` and `out.json` never share
# one (a stem-based `out.errors.jsonl` would).
def settings_path_of(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def errors_path_of(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def _written_beside(output: Path, errors_path: Path | None) -> list[Path]:
    """Every file a run on `output` may write (the input must be none of them)."""
    settings_path = settings_path_of(output)
    written = [output, settings_path, settings_path.with_name(settings_path.name + ".tmp")]
    return written + ([errors_path] if errors_path is not None else [])


def _is_still(file: IO[bytes], path: Path) -> bool:
    """True when the open `file` is still what `path` names (not removed or replaced)."""
    try:
        opened, named = os.fstat(file.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return opened.st_nlink > 0 and (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return b.exists() and a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=True), encoding="utf-8")
    os.replace(tmp, path)


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
    parts = []
    for name, (before, after) in differences.items():
        if name.startswith("("):
            parts.append(name)
        elif name == "output_schema" or name == "system_prompt" or name == "extra_body":
            parts.append(f"{name} changed")
        else:
            parts.append(f"{name} {before!r} -> {after!r}")
    return ", ".join(parts)
