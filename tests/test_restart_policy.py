"""The orchestrator's restart decision (beemond.supervisor.state) with plain monotonic times: backoff, crash
loop, the slow retry of a failed worker, and when its history is forgotten."""

from __future__ import annotations

from beemond.supervisor.state import HEALTHY_AFTER_S, RestartPolicy, RestartState

POLICY = RestartPolicy(backoff_initial_s=1, backoff_max_s=8, crash_loop_limit=3, crash_loop_window_s=600,
                       failed_retry_s=3600)


def crash_until_failed(st: RestartState, t: float = 1000.0) -> tuple[list[str], list[float], float]:
    states, delays = [], []
    started = t
    for _ in range(10):
        t = started + 0.5                       # each run lasts half a second
        d = POLICY.after_exit(st, started, t)
        states.append(d.state)
        delays.append(d.delay)
        if d.state == "failed":
            return states, delays, t
        started = d.at
    raise AssertionError("never failed")


def test_backoff_doubles_then_a_crash_loop_fails_with_the_retry_cadence():
    st = RestartState()
    states, delays, t = crash_until_failed(st)
    assert states == ["backoff", "backoff", "backoff", "failed"]
    assert delays == [1, 2, 4, 3600]


def test_backoff_is_capped():
    policy = RestartPolicy(1, 8, crash_loop_limit=100, crash_loop_window_s=600, failed_retry_s=3600)
    st, t, delays = RestartState(), 0.0, []
    for _ in range(6):
        d = policy.after_exit(st, t, t + 0.1)
        delays.append(d.delay)
        t = d.at
    assert delays == [1, 2, 4, 8, 8, 8]


def test_a_failed_retry_waits_a_whole_cadence_not_a_new_crash_loop():
    st = RestartState()
    *_, t = crash_until_failed(st)
    for hour in range(1, 4):                     # unplugged for hours: one try an hour
        started = t + 3600
        RestartPolicy.retry(st)
        d = POLICY.after_exit(st, started, started + 5)
        assert (d.state, d.delay, d.crash_loop) == ("failed", 3600, False), hour
        t = started + 5


def test_a_retry_that_runs_healthy_gets_fast_restarts_again():
    st = RestartState()
    *_, t = crash_until_failed(st)
    started = t + 3600
    RestartPolicy.retry(st)                      # plugged back in: it runs for a day, then crashes once
    d = POLICY.after_exit(st, started, started + 86400)
    assert (d.state, d.delay) == ("backoff", 1)
    assert not st.retrying and list(st.restarts) == [started + 86400]


def test_a_healthy_run_resets_the_backoff_but_a_slow_crash_loop_still_fails():
    st, t = RestartState(), 0.0
    states = []
    for _ in range(4):                           # runs just long enough to count as healthy, 4x in 600 s
        d = POLICY.after_exit(st, t, t + HEALTHY_AFTER_S)
        states.append((d.state, d.delay))
        t = d.at
    assert states[:3] == [("backoff", 1)] * 3
    assert states[3] == ("failed", 3600)


def test_restarts_older_than_the_window_are_forgotten():
    st = RestartState()
    for t in (0.0, 1.0, 2.0):
        POLICY.after_exit(st, t, t + 0.5)
    d = POLICY.after_exit(st, 700.0, 700.5)      # the three earlier restarts left the 600 s window
    assert d.state == "backoff"


def test_reset_forgets_everything():
    st = RestartState()
    crash_until_failed(st)
    RestartPolicy.retry(st)
    RestartPolicy.reset(st)
    assert (st.failures, list(st.restarts), st.retrying) == (0, [], False)
    assert POLICY.after_exit(st, 0.0, 0.5).state == "backoff"
