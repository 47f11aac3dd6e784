"""The orchestrator's restart decision (beemond.supervisor.state): first scenarios with plain monotonic
times (backoff, crash loop, the slow retry of a failed worker, when its history is forgotten), then
each transition on its own with a fake clock, the way supervisor tests its process.py: set up the
history a worker would have, make one exit, check the decision and the history it leaves."""

from __future__ import annotations

import collections
import math

import pytest

from beemond.core.clock import Backoff
from beemond.supervisor.state import (ALIVE, HEALTHY_AFTER_S, RestartPolicy, RestartState, WorkerProcess,
                                      WorkerState)

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



# ---------------------------------------------------------------- transition by transition, fake clock

class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 10_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy(clock) -> RestartPolicy:
    return RestartPolicy(backoff_initial_s=2, backoff_max_s=30, crash_loop_limit=3, crash_loop_window_s=600,
                         failed_retry_s=3600, clock=clock)


def history(failures: int = 0, restarts=(), retrying: bool = False) -> RestartState:
    return RestartState(failures, collections.deque(restarts), retrying)


def test_transition_running_to_backoff_on_a_first_exit(policy, clock):
    st = history()
    started = clock.now
    clock.advance(5)
    d = policy.after_exit(st, started)
    assert (d.state, d.delay, d.at, d.crash_loop) == (WorkerState.BACKOFF, 2, clock.now + 2, False)
    assert (st.failures, list(st.restarts), st.retrying) == (1, [clock.now], False)


def test_transition_running_to_backoff_doubles_the_delay_per_consecutive_failure(policy, clock):
    st = history(failures=2, restarts=[clock.now - 20, clock.now - 10])   # two quick crashes behind it
    started = clock.now
    d = policy.after_exit(st, started, clock.advance(1))
    assert (d.state, d.delay) == (WorkerState.BACKOFF, 8)                 # 2, 4, then 8 s
    assert st.failures == 3 and len(st.restarts) == 3


def test_transition_running_to_backoff_delay_is_capped_at_the_maximum(clock):
    policy = RestartPolicy(2, 30, crash_loop_limit=1000, crash_loop_window_s=600, failed_retry_s=3600, clock=clock)
    st = history(failures=40)
    d = policy.after_exit(st, clock.now, clock.advance(1))
    assert (d.state, d.delay) == (WorkerState.BACKOFF, 30)


def test_transition_running_to_backoff_after_a_healthy_run_starts_the_doubling_over(policy, clock):
    st = history(failures=4, restarts=[clock.now - 500])
    started = clock.now
    d = policy.after_exit(st, started, clock.advance(HEALTHY_AFTER_S))
    assert (d.state, d.delay) == (WorkerState.BACKOFF, 2)
    assert st.failures == 1
    assert list(st.restarts) == [clock.now - HEALTHY_AFTER_S - 500, clock.now]   # the window still counts it


def test_transition_running_to_failed_when_the_crash_loop_limit_is_reached(policy, clock):
    st = history(failures=3, restarts=[clock.now - 30, clock.now - 20, clock.now - 10])
    d = policy.after_exit(st, clock.now, clock.advance(1))
    assert (d.state, d.delay, d.at, d.crash_loop) == (WorkerState.FAILED, 3600, clock.now + 3600, True)
    assert len(st.restarts) == 3, "a failed worker's restart is not one more in the window"


def test_transition_running_to_backoff_when_earlier_restarts_left_the_window(policy, clock):
    st = history(failures=3, restarts=[clock.now - 700, clock.now - 650, clock.now - 10])
    d = policy.after_exit(st, clock.now, clock.advance(1))
    assert d.state == WorkerState.BACKOFF
    assert list(st.restarts) == [clock.now - 11, clock.now]               # the two old ones dropped


def test_transition_failed_retry_to_failed_again_waits_a_whole_cadence(policy, clock):
    st = history(failures=3, restarts=[clock.now - 30, clock.now - 20, clock.now - 10])
    RestartPolicy.retry(st)                                              # the hourly try starts it
    assert st.retrying
    d = policy.after_exit(st, clock.now, clock.advance(HEALTHY_AFTER_S - 1))
    assert (d.state, d.delay, d.crash_loop) == (WorkerState.FAILED, 3600, False)
    assert st.retrying and st.failures == 3, "one try per cadence, no new crash loop counted"


def test_transition_failed_retry_to_backoff_once_it_ran_healthy(policy, clock):
    st = history(failures=3, restarts=[clock.now - 30, clock.now - 20, clock.now - 10], retrying=True)
    started = clock.now
    d = policy.after_exit(st, started, clock.advance(HEALTHY_AFTER_S))
    assert (d.state, d.delay) == (WorkerState.BACKOFF, 2)
    assert (st.failures, list(st.restarts), st.retrying) == (1, [clock.now], False)


def test_transition_to_a_fresh_start_on_reload_forgets_the_history(policy, clock):
    st = history(failures=3, restarts=[clock.now - 30, clock.now - 20, clock.now - 10], retrying=True)
    RestartPolicy.reset(st)
    assert (st.failures, list(st.restarts), st.retrying) == (0, [], False)
    d = policy.after_exit(st, clock.now, clock.advance(1))
    assert (d.state, d.delay) == (WorkerState.BACKOFF, 2)


def test_the_decision_reads_the_injected_clock(policy, clock):
    st = history()
    started = clock.now
    clock.advance(123.0)
    d = policy.after_exit(st, started)
    assert d.at == clock.now + 2 and list(st.restarts) == [clock.now]


def test_worker_states_cover_every_state_the_orchestrator_sets():
    assert {s.value for s in WorkerState} == {"starting", "running", "backoff", "failed", "stopped",
                                              "restarting", "removing"}
    assert ALIVE == {WorkerState.RUNNING, WorkerState.RESTARTING, WorkerState.REMOVING}
    assert [s for s in WorkerState if s.retried] == [WorkerState.BACKOFF, WorkerState.FAILED]
    assert WorkerState.RESTARTING == "restarting" and f"{WorkerState.REMOVING}" == "removing"
    assert WorkerProcess("sensor", "x").state is WorkerState.STARTING


# ---------------------------------------------------------------- the one backoff formula

def test_backoff_doubles_from_the_first_failure_and_is_capped():
    b = Backoff(0.5, 4.0)
    assert [b.delay(n) for n in range(0, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_survives_a_link_down_for_days():
    assert Backoff(2.0, 300.0).delay(100_000) == 300.0                  # no OverflowError
    assert math.isfinite(Backoff(2.0, math.inf).delay(100_000))


def test_jittered_backoff_draws_between_half_and_the_whole_delay():
    b = Backoff(2.0, 300.0)
    assert b.jittered(3, uniform=lambda lo, hi: (lo, hi)) == (4.0, 8.0)
    assert all(4.0 <= b.jittered(3) <= 8.0 for _ in range(100))
