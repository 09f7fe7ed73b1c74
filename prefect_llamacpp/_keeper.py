"""The keeper: starts one llama-server and stops it when the process that launched it is gone.

Run as a script (`python -I _keeper.py LOG -- COMMAND...`), standard library only, by
`prefect_llamacpp.managed`. Its stdin is a pipe whose other end only the launching process
holds: the kernel closes that end when the launcher exits in any way, SIGKILL included, and the
keeper then stops the server (SIGTERM, then SIGKILL after a grace period). A line `kill` on
stdin stops it at once (a wedged server will not shut down cleanly). The server leads its own
process group and is sent SIGKILL by the kernel if the keeper itself dies (Linux). The keeper
prints the server's PID on its first line and exits with the server's exit code when the server
exits on its own.
"""

import ctypes
import os
import select
import signal
import subprocess
import sys

GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_keeper() -> None:
    # In the child before exec; the keeper is single-threaded, so this is safe here.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe still stops the server when the launcher goes


def _stop(server: subprocess.Popen, grace: float) -> None:
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM if grace else signal.SIGKILL)
        os.killpg(server.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only awake
    except ProcessLookupError:
        return
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def main(argv: list[str]) -> int:
    log_path, separator, *command = argv
    if separator != "--" or not command:
        print("usage: _keeper.py LOG -- COMMAND...", file=sys.stderr)
        return 2
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_keeper if sys.platform == "linux" else None,
        )
    print(server.pid, flush=True)
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.append(GRACE_SECONDS))
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    while not stop:
        code = server.poll()
        if code is not None:
            return code
        try:
            readable, _, _ = select.select([stdin], [], [], 0.2)
        except InterruptedError:
            continue
        if readable:
            line = stdin.readline()
            stop.append(0.0 if line.strip() == b"kill" else GRACE_SECONDS)
    _stop(server, stop[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
