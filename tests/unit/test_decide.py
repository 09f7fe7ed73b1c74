"""The runner's retry and crash rules, one row each: fault and tries in, action out."""

from __future__ import annotations

import pytest

from prefect_llamacpp.batch.decide import Action, Fault, GiveUpReason, Limits, Tries, decide

LIMITS = Limits(max_attempts=3, max_crashes=2)  # limit: 10 sends
A, S, R, W, G, C = (
    Action.SEND_AGAIN,
    Action.SPLIT,
    Action.RETRY,
    Action.WAIT_FOR_SERVER,
    Action.GIVE_UP,
    Action.CHECK_SERVER,
)


def t(attempts=1, failures=0, crashes=0) -> Tries:
    return Tries(attempts, failures, crashes)


# (fault, tries, pack, down) -> (action, tries after, kind, reason, crashed, retire)
TABLE = [
    # A pack the server dropped, did not finish or refused: each line alone finds the culprit.
    (Fault.DROPPED, t(), True, None, S, t(), None, None, False, False),
    (Fault.TIMEOUT, t(), True, None, S, t(), None, None, False, False),
    (Fault.REFUSED, t(), True, None, S, t(), None, None, False, False),
    (Fault.LOADING, t(), True, None, W, t(), None, None, False, False),
    # ...unless it has used up its sends (a split would send each line once more).
    (Fault.REFUSED, t(10), True, None, G, t(10), None, GiveUpReason.SERVER_REFUSED, False, False),
    (Fault.DROPPED, t(10), True, None, C, t(10), None, None, False, False),
    # Dropped: first find out whether the server went down.
    (Fault.DROPPED, t(), False, None, C, t(), None, None, False, False),
    # In flight with others: a crash either way; it runs alone from now on.
    (Fault.DROPPED, t(), False, True, A, t(crashes=1), None, None, True, False),
    (Fault.DROPPED, t(), False, False, A, t(crashes=1), None, None, True, False),
    # Alone, the server went down: its second crash gives it up.
    (
        Fault.DROPPED,
        t(2, 0, 1),
        False,
        True,
        G,
        t(2, 0, 2),
        "server_crash",
        GiveUpReason.CRASHED_ALONE,
        True,
        False,
    ),
    # Alone, but the server stayed up: the network cut it, retried like a transient fault.
    (Fault.DROPPED, t(2, 0, 1), False, False, R, t(2, 1, 1), None, None, False, False),
    (
        Fault.DROPPED,
        t(4, 2, 1),
        False,
        False,
        G,
        t(4, 3, 1),
        "server_crash",
        GiveUpReason.DROPPED_ALONE,
        False,
        False,
    ),
    # In flight at crashes until the send limit: unreachable, not blamed.
    (
        Fault.DROPPED,
        t(10),
        False,
        True,
        G,
        t(10, 0, 1),
        "unreachable",
        GiveUpReason.FAULT,
        True,
        False,
    ),
    # Timed out: the server gone, another may run it; the server up, back off and retry.
    (Fault.TIMEOUT, t(), False, None, C, t(), None, None, False, False),
    (Fault.TIMEOUT, t(), False, True, A, t(), None, None, False, False),
    (Fault.TIMEOUT, t(10), False, True, G, t(10), "timeout", GiveUpReason.FAULT, False, False),
    (Fault.TIMEOUT, t(), False, False, R, t(1, 1), None, None, False, False),
    (Fault.TIMEOUT, t(3, 2), False, False, G, t(3, 3), "timeout", GiveUpReason.FAULT, False, False),
    # Never sent, or loading: wait for the server, bounded by the send limit.
    (Fault.NOT_SENT, t(), False, None, W, t(), None, None, False, False),
    (Fault.NOT_SENT, t(10), False, None, G, t(10), "unreachable", GiveUpReason.FAULT, False, False),
    (Fault.LOADING, t(), False, None, W, t(), None, None, False, False),
    (
        Fault.LOADING,
        t(10),
        False,
        None,
        G,
        t(10),
        "server_unavailable",
        GiveUpReason.FAULT,
        False,
        False,
    ),
    # A wrong key takes the server out for good; the request goes elsewhere.
    (Fault.UNAUTHORIZED, t(), False, None, A, t(), None, None, False, True),
    (
        Fault.UNAUTHORIZED,
        t(10),
        False,
        None,
        G,
        t(10),
        "unreachable",
        GiveUpReason.FAULT,
        False,
        True,
    ),
    # The server's own refusal: given up at once, with its reason.
    (Fault.REFUSED, t(), False, None, G, t(), None, GiveUpReason.SERVER_REFUSED, False, False),
    # A proxy's transient status: back off; at max_attempts, is the server gone?
    (Fault.TRANSIENT, t(), False, None, R, t(1, 1), None, None, False, False),
    (Fault.TRANSIENT, t(3, 2), False, None, C, t(3, 3), None, None, False, False),
    (Fault.TRANSIENT, t(3, 3), False, True, A, t(3, 0), None, None, False, False),
    (
        Fault.TRANSIENT,
        t(3, 3),
        False,
        False,
        G,
        t(3, 3),
        "server_unavailable",
        GiveUpReason.FAULT,
        False,
        False,
    ),
    (
        Fault.TRANSIENT,
        t(10, 1),
        False,
        None,
        G,
        t(10, 2),
        "server_unavailable",
        GiveUpReason.FAULT,
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("fault", "tries", "pack", "down", "action", "after", "kind", "reason", "crashed", "retire"),
    TABLE,
)
def test_decision(fault, tries, pack, down, action, after, kind, reason, crashed, retire):
    decision = decide(fault, tries, LIMITS, pack=pack, down=down)
    assert decision.action is action
    assert decision.tries == after
    assert decision.crashed is crashed and decision.retire is retire
    if action is Action.GIVE_UP:
        assert (decision.kind, decision.reason) == (kind, reason)


@pytest.mark.parametrize("fault", list(Fault))
def test_no_fault_sends_a_request_more_than_the_limit(fault):
    """Whatever the server does, a request is given up by its `limit`-th send."""
    for down in (True, False):
        tries = Tries()
        for _ in range(LIMITS.limit):
            tries = Tries(tries.attempts + 1, tries.failures, tries.crashes)
            decision = decide(fault, tries, LIMITS)
            if decision.action is Action.CHECK_SERVER:
                decision = decide(fault, decision.tries, LIMITS, down=down)
            tries = decision.tries
            if decision.action is Action.GIVE_UP:
                break
        else:
            pytest.fail(f"{fault} (server down: {down}) was sent {LIMITS.limit} times")


def test_every_fault_and_action_is_in_the_table():
    assert {row[0] for row in TABLE} == set(Fault)
    assert {row[4] for row in TABLE} == set(Action)
