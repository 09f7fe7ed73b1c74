"""Flows started from a terminal with no Prefect server to talk to.

Without `PREFECT_API_URL`, Prefect starts a temporary API server for the run and gives it 20 s
to answer. Beside a llama-server that uses every core it can need longer, and the run then
failed with "Timed out while attempting to connect to ephemeral Prefect API server". The command
line entry points give it `STARTUP_TIMEOUT_S` (unless the user chose a value of their own) and,
if it still does not start, say what to do instead of printing a traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.settings.models.server.ephemeral import ServerEphemeralSettings
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

STARTUP_TIMEOUT_S = 120
_PREFECT_DEFAULT = ServerEphemeralSettings.model_fields["startup_timeout_seconds"].default
# What Prefect's RuntimeError says when its temporary server did not answer in time.
_STARTUP_FAILED = "ephemeral Prefect API server"

STARTUP_HINT = (
    "Prefect's temporary API server did not start in time (the machine may be busy, a "
    "llama-server using every core). Start a Prefect server once and point runs at it:\n"
    "    prefect server start   # in another terminal\n"
    "    export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
    "or give the temporary server longer: "
    f"export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS={STARTUP_TIMEOUT_S * 2}"
)


@contextmanager
def local_prefect_api() -> Iterator[None]:
    """Within it, Prefect's temporary API server (used when no `PREFECT_API_URL` is set) gets
    `STARTUP_TIMEOUT_S` to start, unless a startup timeout was set by the user."""
    updates = {}
    chosen = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    if not PREFECT_API_URL.value() and chosen == _PREFECT_DEFAULT:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = STARTUP_TIMEOUT_S
    with temporary_settings(updates=updates):
        yield


def run_cli(main: Callable[[], int]) -> int:
    """Run a command line entry point's `main` inside `local_prefect_api`; its exit code, or 2
    with `STARTUP_HINT` on standard error when the temporary API server did not start."""
    with local_prefect_api():
        try:
            return main()
        except RuntimeError as exc:
            if _STARTUP_FAILED not in str(exc):
                raise
            print(f"error: {STARTUP_HINT}", file=sys.stderr)
            return 2


def cli_problem(exc: Exception) -> str:
    """A command line's bad value in one line, naming the flag (for a model-built CLI)."""
    if not isinstance(exc, ValidationError):
        # pydantic-settings names a value it cannot parse by its path; say it as the flag.
        text = str(exc)
        if match := re.match(r"Parsing error encountered for ([\w.]+)", text):
            return f"--{match.group(1).replace('_', '-')}: not a JSON object"
        if match := re.match(r'error parsing value for field "([\w.]+)"', text):
            return f"--{match.group(1).replace('_', '-')}: not a JSON object"
        return text.removeprefix("error parsing CLI: ")
    return "; ".join(
        f"--{'.'.join(map(str, error['loc'])).replace('_', '-')}: "
        + error["msg"].removeprefix("Value error, ")
        for error in exc.errors()
    )


def cli_config(prog: str, shortcuts: dict[str, str]) -> SettingsConfigDict:
    """How a command line built from a model reads: kebab-case flags, `--no-x` for booleans,
    groups from the models' docstrings, and `shortcuts` (field path: short name, in snake case)."""
    return SettingsConfigDict(
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_use_class_docs_for_groups=True,
        cli_hide_none_type=True,
        cli_parse_none_str="null",
        cli_exit_on_error=False,  # a bad flag is one line and exit 2, as a bad value is
        hide_input_in_errors=True,  # a refused value may hold a key or a password
        cli_shortcuts={
            path.replace("_", "-"): short.replace("_", "-") for path, short in shortcuts.items()
        },
    )
