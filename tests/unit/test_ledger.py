"""The ledger's promises, broken on purpose: one run per file, never the input, nothing answered
twice, a changed request never silently skipped, any id writable, crash fragments dropped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.batch.ledger import Ledger, RunSettings, read_ledger
from prefect_llamacpp.batch.records import result_line
from prefect_llamacpp.exceptions import BatchPathError, LedgerInUseError, LedgerSettingsError

SETTINGS = RunSettings(model="tiny", max_tokens=16)


def item(custom_id: str, prompt: str = "hello", line: int = 1) -> BatchItem:
    return BatchItem(custom_id, line, [{"role": "user", "content": prompt}])


def success(entry: BatchItem, settings: RunSettings = SETTINGS):
    return result_line(
        entry.custom_id,
        entry.line,
        output="ok",
        input_fp=entry.input_fp,
        settings_fp=settings.fingerprint,
    )


def write_run(path, entries, settings: RunSettings = SETTINGS):
    with Ledger.open(path) as ledger:
        ledger.check_settings(settings)
        for entry in entries:
            ledger.write(success(entry, settings))


def test_a_second_run_on_the_same_output_is_refused_at_once(tmp_path):
    path = tmp_path / "out.jsonl"
    with Ledger.open(path):
        with pytest.raises(LedgerInUseError, match="in use by another batch run"):
            Ledger.open(path)
    with Ledger.open(path):  # released on close
        pass


def test_the_lock_is_held_against_other_processes_and_dies_with_them(tmp_path):
    path = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from prefect_llamacpp.batch.ledger import Ledger;"
            f"ledger = Ledger.open(Path({str(path)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + _repo_root()},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LedgerInUseError):
            Ledger.open(path)
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait(10)
        with Ledger.open(path):
            pass
        assert not list(tmp_path.glob("*.lock")), "no lock file is ever left behind"
    finally:
        holder.kill()


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])


def test_input_and_output_can_never_be_the_same_file(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    with pytest.raises(BatchPathError, match="same file"):
        Ledger.open(source, source)
    with pytest.raises(BatchPathError, match="same file"):
        Ledger.open(tmp_path / "sub" / ".." / "in.jsonl", source)
    os.link(source, tmp_path / "hard.jsonl")
    with pytest.raises(BatchPathError, match="same file"):
        Ledger.open(tmp_path / "hard.jsonl", source)
    (tmp_path / "soft.jsonl").symlink_to(source)
    with pytest.raises(BatchPathError, match="same file"):
        Ledger.open(tmp_path / "soft.jsonl", source)
    assert source.read_text() == '{"prompt": "x"}\n'
    with pytest.raises(BatchPathError, match="directory"):
        Ledger.open(tmp_path, source)


def test_no_id_ever_gets_a_second_success_line(tmp_path):
    path = tmp_path / "out.jsonl"
    first = item("a")
    with Ledger.open(path) as ledger:
        assert ledger.write(success(first))
        assert not ledger.write(success(first))  # e.g. a Prefect retry of a chunk
    with Ledger.open(path) as ledger:
        assert not ledger.write(success(first))
    assert len(path.read_text().splitlines()) == 1


def test_a_pack_of_lines_is_written_at_once_and_keeps_every_promise(tmp_path):
    path = tmp_path / "out.jsonl"
    a, b = item("a"), item("b")
    failed = result_line("c", 3, error=("server_error", "500"))
    with Ledger.open(path) as ledger:
        # the same id twice in one pack: written once
        assert ledger.write_all([success(a), success(b), success(a), failed]) == 3
        assert ledger.write_all([success(b)]) == 0  # and never again
        assert ledger.succeeded == {"a", "b"}
    assert [json.loads(line)["custom_id"] for line in path.read_text().splitlines()] == [
        "a",
        "b",
        "c",
    ]


def test_a_pack_with_a_line_that_cannot_be_encoded_marks_nothing_done(tmp_path):
    path = tmp_path / "out.jsonl"
    unwritable = {**success(item("b")), "output": object()}  # no JSON for it
    with Ledger.open(path) as ledger:
        with pytest.raises(TypeError):
            ledger.write_all([success(item("a")), unwritable])
        assert ledger.succeeded == set()  # a rerun (or a retry) sends both again
        assert ledger.write_all([success(item("a"))]) == 1
    assert len(path.read_text().splitlines()) == 1


def test_a_failed_write_then_a_retry_never_gives_an_id_two_lines(tmp_path):
    # A full disk, for real: a file size limit makes the pack's write fail (EFBIG, as ENOSPC
    # would), its bytes stay in the buffer and land at the next flush. Its own process: the
    # limit holds for every file the process writes.
    script = """
import json, resource, signal, sys
from collections import Counter
from pathlib import Path
from prefect_llamacpp.batch.ledger import Ledger
from prefect_llamacpp.batch.records import result_line

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out = Path(sys.argv[1])
def ok(i):
    return result_line(f"id{i}", i, output="x" * 200, input_fp="fp", settings_fp="s")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
with Ledger.open(out) as ledger:
    ledger.write(ok(0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (out.stat().st_size + 50, hard))
    try:
        ledger.write_all([ok(1), ok(2)])
    except OSError:
        pass
    else:
        raise SystemExit("the write did not fail")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    retry = [ok(i) for i in (1, 2) if f"id{i}" not in ledger.succeeded]  # a chunk retry
    ledger.write_all(retry)
ids = Counter(json.loads(line)["custom_id"] for line in out.read_bytes().splitlines())
print(json.dumps(ids))
"""
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": _repo_root()},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"id0": 1, "id1": 1, "id2": 1}


def test_a_changed_request_for_a_done_id_is_not_skipped(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a", "one"), item("b", "two")])
    with Ledger.open(path) as ledger:
        ledger.check_settings(SETTINGS)
        assert ledger.is_done("a", item("a", "one").input_fp) is True
        assert ledger.is_done("b", item("b", "CHANGED").input_fp) is False
        assert ledger.is_done("c", item("c").input_fp) is None


def test_other_run_settings_are_refused_naming_what_differs(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a")])
    other = RunSettings(model="tiny", max_tokens=64, system_prompt="be brief")
    with Ledger.open(path) as ledger, pytest.raises(LedgerSettingsError) as info:
        ledger.check_settings(other)
    message = str(info.value)
    assert "max_tokens 16 -> 64" in message and "system_prompt changed" in message
    assert "allow_settings_change" in message
    # With the override, the answers there stay done and later runs accept both settings.
    with Ledger.open(path) as ledger:
        assert ledger.check_settings(other, allow_change=True) == ["system_prompt", "max_tokens"]
        assert ledger.is_done("a", item("a").input_fp)
    with Ledger.open(path) as ledger:
        assert ledger.check_settings(other) == []
        assert ledger.is_done("a", item("a").input_fp)


def test_settings_are_checked_even_when_the_settings_file_is_gone(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a")])
    (tmp_path / "out.jsonl.settings.json").unlink()
    with Ledger.open(path) as ledger:
        assert ledger.check_settings(SETTINGS) == []  # the lines carry the fingerprint
    (tmp_path / "out.jsonl.settings.json").unlink()
    with Ledger.open(path) as ledger, pytest.raises(LedgerSettingsError, match="missing"):
        ledger.check_settings(RunSettings(model="other"))


@pytest.mark.parametrize("custom_id", ["a\ud800", "\udfff", "日本語", "line\nbreak", "\x00", "😀"])
def test_any_id_json_can_carry_is_written_and_read_back(tmp_path, custom_id):
    path = tmp_path / "out.jsonl"
    entry = item(custom_id)
    write_run(path, [entry])
    assert read_ledger(path).done == {custom_id: (entry.input_fp, SETTINGS.fingerprint)}
    assert len(path.read_bytes().splitlines()) == 1


def test_a_crash_fragment_is_dropped_and_a_complete_unterminated_line_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a")])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"custom_id": "d", "li')  # a crash mid-write
    with Ledger.open(path) as ledger:
        assert ledger.state.dropped_partial_line and set(ledger.state.done) == {"a"}
    assert path.read_bytes() == whole

    hand_edited = whole.rstrip(b"\n")  # complete, but no newline (edited or merged by hand)
    path.write_bytes(hand_edited)
    with Ledger.open(path) as ledger:
        assert ledger.state.kept_unterminated_line and not ledger.state.dropped_partial_line
        assert set(ledger.state.done) == {"a"}
        ledger.write(success(item("b")))
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["a", "b"]


def test_unreadable_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a")])
    with open(path, "ab") as out:
        out.write(b'not json\n[1,2]\n{"no_id": 1}\n\xff\xfe\n')
    with Ledger.open(path) as ledger:
        assert ledger.state.unreadable_lines == 4
        assert set(ledger.state.done) == {"a"}


def test_lines_are_on_disk_as_written(tmp_path):
    path = tmp_path / "out.jsonl"
    with Ledger.open(path) as ledger:
        ledger.write(success(item("a")))
        assert json.loads(path.read_text())["custom_id"] == "a"  # visible before close


def test_the_input_is_never_the_settings_file_either(tmp_path):
    source = tmp_path / "out.jsonl.settings.json"
    source.write_text('{"prompt": "mine"}\n')
    for output in (tmp_path / "out.jsonl", tmp_path / "out.jsonl.settings.json"):
        with pytest.raises(BatchPathError, match="same file"):
            Ledger.open(output, source)
    assert source.read_text() == '{"prompt": "mine"}\n'


def test_a_merged_ledger_needs_the_override(tmp_path):
    small, large = (
        RunSettings(model="tiny", max_tokens=4),
        RunSettings(model="tiny", max_tokens=256),
    )
    write_run(tmp_path / "a.jsonl", [item("a")], small)
    write_run(tmp_path / "b.jsonl", [item("b")], large)
    merged = tmp_path / "b.jsonl"
    merged.write_bytes(merged.read_bytes() + (tmp_path / "a.jsonl").read_bytes())
    with Ledger.open(merged) as ledger, pytest.raises(LedgerSettingsError, match="merged"):
        ledger.check_settings(large)
    with Ledger.open(merged) as ledger:
        ledger.check_settings(large, allow_change=True)
        assert ledger.is_done("a", item("a").input_fp) and ledger.is_done("b", item("b").input_fp)


def test_a_lock_taken_on_a_removed_file_is_not_kept(tmp_path):
    from prefect_llamacpp.batch.ledger import _is_still

    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    with open(path, "ab+") as stale:
        assert _is_still(stale, path)
        path.unlink()  # another run removed it after we opened it
        assert not _is_still(stale, path)
        path.write_bytes(b"")  # and a third created a new one
        assert not _is_still(stale, path)


def test_a_complete_last_line_that_is_not_a_result_is_kept_and_counted(tmp_path):
    path = tmp_path / "out.jsonl"
    write_run(path, [item("a")])
    path.write_bytes(path.read_bytes() + b'{"note": "reviewed by bob, keep"}')
    with Ledger.open(path) as ledger:
        assert ledger.state.unreadable_lines == 1 and not ledger.state.dropped_partial_line
    assert path.read_bytes().endswith(b'{"note": "reviewed by bob, keep"}\n')


def test_finished_at_is_the_time_now_to_the_millisecond_in_utc():
    before = datetime.now(UTC)
    stamps = [result_line("a", 1)["finished_at"] for _ in range(1000)]
    after = datetime.now(UTC)
    assert stamps == sorted(stamps)
    for stamp in (stamps[0], stamps[-1]):
        moment = datetime.fromisoformat(stamp)
        assert moment.utcoffset() == timedelta(0)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp)
        assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= moment <= after
