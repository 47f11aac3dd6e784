"""A worker's states (:class:`WorkerState`), the orchestrator's record of each worker
(:class:`WorkerProcess`), and when a worker that stopped on its own starts again (:class:`RestartPolicy`: free
of processes, its clock injected, so that it is tested transition by transition with a fake clock).

- A worker that exits (or is killed for a stale heartbeat) is restarted after an exponential backoff:
  ``restart_backoff_initial_s`` doubling per consecutive failure up to ``restart_backoff_max_s``. A
  worker that ran ``HEALTHY_AFTER_S`` before it failed starts the doubling over.
- More than ``crash_loop_limit`` restarts within ``crash_loop_window_s`` mark it **failed**. A failed
  worker is not abandoned: it is tried again every ``failed_retry_s`` (an hour by default) for as
  long as the daemon runs, so a scale unplugged for a week records again once it is plugged back.
  A retry that fails before it ran ``HEALTHY_AFTER_S`` goes straight back to failed (one try per
  cadence, not a new crash loop); one that ran that long is healthy again and its history is reset.

All times are ``time.monotonic()`` seconds (never the wall clock, which a Pi without an RTC steps at
NTP sync), read from the policy's injected *clock* unless the caller passes them.
"""

from __future__ import annotations

import collections
import enum
import multiprocessing
import multiprocessing.connection
import time
from dataclasses import dataclass, field
from typing import Callable

from beemond.core.clock import Backoff

HEALTHY_AFTER_S = 60.0   # a worker that ran this long has its backoff and crash-loop history reset


class WorkerState(enum.StrEnum):
    """Every state a supervised worker can be in. A ``StrEnum``: it compares equal to its value, which
    is what the status socket, the logs and ``beemond_worker_state{state=...}`` show."""

    STARTING = "starting"        # known, not yet spawned
    RUNNING = "running"          # its process runs
    BACKOFF = "backoff"          # exited; restarts at ``WorkerProcess.restart_at``
    FAILED = "failed"            # crash loop; a sensor or processor is tried again at ``restart_at``
    STOPPED = "stopped"          # the daemon is shutting down and the process has gone
    RESTARTING = "restarting"    # stopping, to start again with a reloaded config
    REMOVING = "removing"        # stopping for good: its sensor or processor left the config

    @property
    def alive(self) -> bool:
        """A process exists: its events are read, its heartbeat watched, its exit reaped."""
        return self in ALIVE

    @property
    def retried(self) -> bool:
        """It has a next start (``WorkerProcess.restart_at``)."""
        return self in (WorkerState.BACKOFF, WorkerState.FAILED)


ALIVE = frozenset({WorkerState.RUNNING, WorkerState.RESTARTING, WorkerState.REMOVING})


@dataclass
class RestartState:
    """One worker's restart history (the part of the orchestrator's WorkerProcess this module reads/writes)."""

    failures: int = 0                # consecutive, for the backoff
    restarts: collections.deque = field(default_factory=collections.deque)   # monotonic times
    retrying: bool = False           # this run is a retry of a failed worker


@dataclass(frozen=True)
class Decision:
    state: WorkerState  # BACKOFF or FAILED
    at: float         # monotonic time of the next start
    delay: float      # seconds from now to that start
    crash_loop: bool  # this exit ended a crash loop (the worker is newly failed)


@dataclass(frozen=True)
class RestartPolicy:
    """The restart decision. *clock* gives monotonic seconds (``time.monotonic``; tests pass a fake)."""

    backoff_initial_s: float
    backoff_max_s: float
    crash_loop_limit: int
    crash_loop_window_s: float
    failed_retry_s: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def from_config(cls, d, clock: Callable[[], float] = time.monotonic) -> "RestartPolicy":
        """From a :class:`beemond.config.DaemonConfig`."""
        return cls(d.restart_backoff_initial_s, d.restart_backoff_max_s, d.crash_loop_limit,
                   d.crash_loop_window_s, d.failed_retry_s, clock)

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.backoff_initial_s, self.backoff_max_s)

    def after_exit(self, st: RestartState, started: float, now: float | None = None) -> Decision:
        """The worker started at *started* stopped at *now* (default: the clock's now): when it starts
        again. Updates *st*."""
        if now is None:
            now = self.clock()
        if now - started >= HEALTHY_AFTER_S:
            st.failures = 0
            if st.retrying:  # the device is back: a later failure gets the fast restarts again
                st.retrying = False
                st.restarts.clear()
        if st.retrying:  # a retry of a failed worker that failed again: wait a whole cadence
            return Decision(WorkerState.FAILED, now + self.failed_retry_s, self.failed_retry_s, False)
        st.failures += 1
        while st.restarts and now - st.restarts[0] > self.crash_loop_window_s:
            st.restarts.popleft()
        if len(st.restarts) >= self.crash_loop_limit:
            return Decision(WorkerState.FAILED, now + self.failed_retry_s, self.failed_retry_s, True)
        delay = self.backoff.delay(st.failures)
        st.restarts.append(now)
        return Decision(WorkerState.BACKOFF, now + delay, delay, False)

    @staticmethod
    def retry(st: RestartState) -> None:
        """A failed worker is being started again on the slow cadence."""
        st.retrying = True

    @staticmethod
    def reset(st: RestartState) -> None:
        """A fresh start (new settings after a reload): forget the history."""
        st.failures, st.retrying = 0, False
        st.restarts.clear()


@dataclass
class WorkerProcess:
    """The orchestrator's record of one worker and its process."""

    role: str                    # sensor | processor | aggregator | uploader | telemetry
    name: str
    process: multiprocessing.process.BaseProcess | None = None
    commands: object = None
    events: multiprocessing.connection.Connection | None = None
    state: WorkerState = WorkerState.STARTING
    started: float = 0.0
    last_heartbeat: float = 0.0
    history: RestartState = field(default_factory=RestartState)
    restart_at: float = 0.0      # monotonic time of the next start (in backoff, or the retry of a failed one)
    last_event: dict = field(default_factory=dict)
    starts: int = 0              # process starts since the daemon started (restarts = starts - 1)
    paused: bool = False         # stopped by `beemond pause` (a restarted process records again)
    reported: bool = False       # has sent an event since its last start (READY=1 waits for all)
