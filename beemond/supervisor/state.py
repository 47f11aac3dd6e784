"""When a worker that stopped on its own starts again: the orchestrator's restart decision, kept free
of processes and clocks so that it can be tested with plain numbers.

- A worker that exits (or is killed for a stale heartbeat) is restarted after an exponential backoff:
  ``restart_backoff_initial_s`` doubling per consecutive failure up to ``restart_backoff_max_s``. A
  worker that ran ``HEALTHY_AFTER_S`` before it failed starts the doubling over.
- More than ``crash_loop_limit`` restarts within ``crash_loop_window_s`` mark it **failed**. A failed
  worker is not abandoned: it is tried again every ``failed_retry_s`` (an hour by default) for as
  long as the daemon runs, so a scale unplugged for a week records again once it is plugged back.
  A retry that fails before it ran ``HEALTHY_AFTER_S`` goes straight back to failed (one try per
  cadence, not a new crash loop); one that ran that long is healthy again and its history is reset.

All times are ``time.monotonic()`` seconds (never the wall clock, which a Pi without an RTC steps at
NTP sync), passed in by the caller.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

HEALTHY_AFTER_S = 60.0   # a worker that ran this long has its backoff and crash-loop history reset


@dataclass
class RestartState:
    """One worker's restart history (the part of the orchestrator's Worker this module reads/writes)."""

    failures: int = 0                # consecutive, for the backoff
    restarts: collections.deque = field(default_factory=collections.deque)   # monotonic times
    retrying: bool = False           # this run is a retry of a failed worker


@dataclass(frozen=True)
class Decision:
    state: str        # "backoff" or "failed"
    at: float         # monotonic time of the next start
    delay: float      # seconds from now to that start
    crash_loop: bool  # this exit ended a crash loop (the worker is newly failed)


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float
    backoff_max_s: float
    crash_loop_limit: int
    crash_loop_window_s: float
    failed_retry_s: float

    @classmethod
    def from_config(cls, d) -> "RestartPolicy":
        """From a :class:`beemond.config.DaemonConfig`."""
        return cls(d.restart_backoff_initial_s, d.restart_backoff_max_s, d.crash_loop_limit,
                   d.crash_loop_window_s, d.failed_retry_s)

    def after_exit(self, st: RestartState, started: float, now: float) -> Decision:
        """The worker started at *started* stopped at *now*: when it starts again. Updates *st*."""
        if now - started >= HEALTHY_AFTER_S:
            st.failures = 0
            if st.retrying:  # the device is back: a later failure gets the fast restarts again
                st.retrying = False
                st.restarts.clear()
        if st.retrying:  # a retry of a failed worker that failed again: wait a whole cadence
            return Decision("failed", now + self.failed_retry_s, self.failed_retry_s, False)
        st.failures += 1
        while st.restarts and now - st.restarts[0] > self.crash_loop_window_s:
            st.restarts.popleft()
        if len(st.restarts) >= self.crash_loop_limit:
            return Decision("failed", now + self.failed_retry_s, self.failed_retry_s, True)
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (st.failures - 1))
        st.restarts.append(now)
        return Decision("backoff", now + delay, delay, False)

    @staticmethod
    def retry(st: RestartState) -> None:
        """A failed worker is being started again on the slow cadence."""
        st.retrying = True

    @staticmethod
    def reset(st: RestartState) -> None:
        """A fresh start (new settings after a reload): forget the history."""
        st.failures, st.retrying = 0, False
        st.restarts.clear()
