"""What to do after a request failed: a pure decision, fault and tries in, action out.

The runner classifies the fault, asks `decide`, carries the action out and asks again after the
next send. Kept free of I/O so that every rule is a row of a table test
(tests/unit/test_decide.py); the one thing a rule may need to know from the server, whether it
went down with the request, the runner finds out when asked (`Action.CHECK_SERVER`) and passes
back as `down`.

The rules, in words:

- a pack (several embedding lines in one request) that was dropped, timed out or refused is
  split, unless it has used up its sends: each line alone finds the one to blame;
- dropped unanswered (or a proxy's 502 for it): a crash, unless the request ran alone and the
  server is still up (then the network cut it: retried like a transient fault). A request in
  flight at a crash runs alone from then on; alone, its `max_crashes`-th crash gives it up as
  `server_crash`;
- timed out: the server is checked; gone, the request is sent again (another server may run
  it); still up, it is retried with backoff up to `max_attempts`;
- never sent (refused, DNS) or the server is loading: wait for the server, send again;
- wrong key: the server is taken out of the run for good, the request goes elsewhere;
- the server's own 4xx/5xx for this request: given up at once with the server's reason;
- a proxy's transient 408/429/5xx: retried with backoff; at `max_attempts` the server is
  checked, and a server that is gone is waited for instead of blaming the request;
- whatever happens, no request is sent more than `limit` times.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from prefect_llamacpp.batch.records import ErrorKind


class Fault(StrEnum):
    """A failed send, as the decision sees it."""

    DROPPED = "dropped"  # the connection closed unanswered, or a proxy's 502 for that
    TIMEOUT = "timeout"  # sent, no answer in time
    NOT_SENT = "not_sent"  # refused, DNS: the request never reached the server
    LOADING = "loading"  # 503 "Loading model"
    UNAUTHORIZED = "unauthorized"  # 401: the key is missing or wrong
    REFUSED = "refused"  # the server's own 4xx/5xx for this request
    TRANSIENT = "transient"  # 408/429/5xx from a proxy: try again later


class Action(StrEnum):
    SPLIT = "split"  # run each line of the pack on its own
    CHECK_SERVER = "check_server"  # find out whether the server is down, then decide again
    RETRY = "retry"  # back off (by `failures`), then send again
    SEND_AGAIN = "send_again"  # send again now (to whichever server is ready)
    WAIT_FOR_SERVER = "wait_for_server"  # take the server out until it is ready, send again
    GIVE_UP = "give_up"  # an error line of `kind`


class GiveUpReason(StrEnum):
    """Why a request was given up, when the fault's own message is not the whole story."""

    FAULT = "fault"  # the fault says it
    CRASHED_ALONE = "crashed_alone"  # the server went down while it ran alone, max_crashes times
    DROPPED_ALONE = "dropped_alone"  # dropped alone while the server stayed up, max_attempts times
    SERVER_REFUSED = "server_refused"  # the server's own reason for refusing it


@dataclass(frozen=True)
class Tries:
    """What a request has been through: sends, transient failures, crashes it was in flight at."""

    attempts: int = 0
    failures: int = 0
    crashes: int = 0

    @property
    def alone(self) -> bool:
        """A crash suspect runs with nothing else in flight on its server."""
        return self.crashes > 0


@dataclass(frozen=True)
class Limits:
    max_attempts: int
    max_crashes: int

    @property
    def limit(self) -> int:
        """Most sends of one request, whatever happens."""
        return 2 * (self.max_attempts + self.max_crashes)


@dataclass(frozen=True)
class Decision:
    action: Action
    tries: Tries
    kind: ErrorKind | None = None  # GIVE_UP: the error line's kind
    reason: GiveUpReason = GiveUpReason.FAULT
    crashed: bool = False  # this fault counts as a crash (to count and log, whatever the action)
    retire: bool = False  # take the server out of the run for good (a wrong key)


def decide(
    fault: Fault, tries: Tries, limits: Limits, *, pack: bool = False, down: bool | None = None
) -> Decision:
    """The next step for a request whose send (its `tries.attempts`-th) failed with `fault`.

    `down`: whether the server went down, once a `CHECK_SERVER` decision made the runner look;
    decide again with that decision's `tries`.
    """
    at_limit = tries.attempts >= limits.limit
    if pack and fault in (Fault.DROPPED, Fault.TIMEOUT, Fault.REFUSED) and not at_limit:
        return Decision(Action.SPLIT, tries)  # (at the limit, the rules below give it up)
    if fault is Fault.DROPPED:
        if down is None:
            return Decision(Action.CHECK_SERVER, tries)
        alone = tries.alone  # sent with nothing else in flight, to a server that was ready
        if alone and not down:
            return _transient(tries, limits, "server_crash", GiveUpReason.DROPPED_ALONE)
        tries = replace(tries, crashes=tries.crashes + 1)
        if alone and tries.crashes >= limits.max_crashes:
            return _give_up(tries, "server_crash", GiveUpReason.CRASHED_ALONE, crashed=True)
        if at_limit:
            return _give_up(tries, "unreachable", crashed=True)
        return Decision(Action.SEND_AGAIN, tries, crashed=True)
    if fault is Fault.TIMEOUT:
        if down is None:
            return Decision(Action.CHECK_SERVER, tries)
        if down:
            return _give_up(tries, "timeout") if at_limit else Decision(Action.SEND_AGAIN, tries)
        return _transient(tries, limits, "timeout")
    if fault in (Fault.NOT_SENT, Fault.LOADING):
        if at_limit:
            return _give_up(
                tries, "unreachable" if fault is Fault.NOT_SENT else "server_unavailable"
            )
        return Decision(Action.WAIT_FOR_SERVER, tries)
    if fault is Fault.UNAUTHORIZED:
        if at_limit:
            return replace(_give_up(tries, "unreachable"), retire=True)
        return Decision(Action.SEND_AGAIN, tries, retire=True)
    if fault is Fault.REFUSED:
        return _give_up(tries, None, GiveUpReason.SERVER_REFUSED)
    # Fault.TRANSIENT
    if down is None:
        tries = replace(tries, failures=tries.failures + 1)
        if at_limit:
            return _give_up(tries, "server_unavailable")
        if tries.failures < limits.max_attempts:
            return Decision(Action.RETRY, tries)
        return Decision(Action.CHECK_SERVER, tries)
    if not down:
        return _give_up(tries, "server_unavailable")
    # A proxy in front of a server that is gone: wait for the server, not a fault of the request.
    return Decision(Action.SEND_AGAIN, replace(tries, failures=0))


def _transient(
    tries: Tries, limits: Limits, kind: ErrorKind, reason: GiveUpReason = GiveUpReason.FAULT
) -> Decision:
    tries = replace(tries, failures=tries.failures + 1)
    if tries.failures >= limits.max_attempts or tries.attempts >= limits.limit:
        return _give_up(tries, kind, reason)
    return Decision(Action.RETRY, tries)


def _give_up(
    tries: Tries,
    kind: ErrorKind | None,
    reason: GiveUpReason = GiveUpReason.FAULT,
    crashed: bool = False,
) -> Decision:
    return Decision(Action.GIVE_UP, tries, kind=kind, reason=reason, crashed=crashed)
