"""Wall-clock time on a machine without a real-time clock.

A Raspberry Pi boots with the time fake-hwclock saved at the last shutdown (or 1970) and steps it when
NTP synchronises, forwards or, rarely, backwards. Two consequences handled here:

- :func:`synchronized` says whether the kernel considers the clock synchronised, so that records made
  before synchronisation carry ``"clock_synchronized": false`` in their metadata. Sources, first
  that answers: systemd-timesyncd's flag file ``/run/systemd/timesync/synchronized`` (exists once it
  synchronised; systemd-timesyncd.service(8)); otherwise the kernel NTP state from ``adjtimex(2)``
  with ``modes = 0`` (read only; systemd/beemond.service allows this call back in its seccomp filter
  and so has no ProtectClock=): unsynchronised when it returns ``TIME_ERROR`` or ``status`` has
  ``STA_UNSYNC`` (chronyd and ntpd clear it once they discipline the clock).
- :class:`Clock` hands out per-sensor UTC stamps that never go backwards: after a backwards step of
  the wall clock, a stamp is the previous stamp plus the monotonic time elapsed since it (so
  intervals stay true), until the wall clock catches up. Each such clamp is counted, so a record
  says its times were adjusted. Intervals themselves are always timed on ``time.monotonic()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"
TIME_ERROR = 5          # adjtimex(2) return value: clock not synchronised
STA_UNSYNC = 0x0040     # <linux/timex.h>
STEP_TOLERANCE_S = 1.0  # a smaller backwards difference is jitter/slew, clamped without a warning


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (glibc); ``c_long`` fields give the right layout on both
    32-bit (armhf) and 64-bit (aarch64, x86_64) Linux."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11)]


_libc = None


def kernel_synchronized() -> bool | None:
    """The kernel's view from ``adjtimex(2)``; ``None`` if the call is unavailable."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()  # modes = 0: query only, needs no privilege
        state = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError) as e:
        _warn_unreadable(str(e))
        return None
    if state < 0:
        _warn_unreadable(os.strerror(ctypes.get_errno()))
        return None
    return state != TIME_ERROR and not tx.status & STA_UNSYNC


_warned = False


def _warn_unreadable(why: str) -> None:
    """Say once per process why records will say ``clock_synchronized: false`` (e.g. EPERM from a
    seccomp filter such as ProtectClock=yes in a drop-in)."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot read the kernel clock state (adjtimex: %s); without %s every record says "
                    "clock_synchronized=false", why, TIMESYNC_FLAG)


def synchronized(flag_file: str = TIMESYNC_FLAG) -> bool:
    """True if the system clock is synchronised (timesyncd's flag file, else the kernel NTP state).
    Unknown counts as not synchronised: a false "false" costs a flag, a false "true" costs trust."""
    if os.path.exists(flag_file):
        return True
    return bool(kernel_synchronized())


class Clock:
    """Monotonic UTC stamps for one sensor. *wall*, *monotonic* and *sync_check* are the time sources
    (``time.time``, ``time.monotonic``, :func:`synchronized`); tests pass their own to step the clock."""

    def __init__(self, wall=time.time, monotonic=time.monotonic, sync_check=synchronized):
        self.wall, self.monotonic, self.sync_check = wall, monotonic, sync_check
        self._last: float | None = None
        self._last_mono = 0.0
        self.clamped = 0          # stamps adjusted because the wall clock went backwards (cumulative)

    def now(self) -> datetime:
        """The current UTC time, never earlier than the previous stamp from this clock."""
        return datetime.fromtimestamp(self.stamp(), timezone.utc)

    def stamp(self) -> float:
        """:meth:`now` as Unix seconds."""
        w, m = self.wall(), self.monotonic()
        if self._last is not None:
            floor = self._last + max(0.0, m - self._last_mono)
            if w < floor:
                if floor - w > STEP_TOLERANCE_S:
                    self.clamped += 1
                    if self.clamped == 1 or self.clamped % 1000 == 0:
                        log.warning("wall clock stepped back by %.1f s; stamps continue on the monotonic clock "
                                    "until it catches up (%d clamped)", floor - w, self.clamped)
                w = floor
        self._last, self._last_mono = w, m
        return w

    def floor(self, t: datetime) -> datetime:
        """*t*, or the previous stamp if *t* is earlier (for times computed elsewhere, like an audio
        block's arrival); records the result as the new previous stamp."""
        ts = t.timestamp()
        if self._last is not None and ts < self._last:
            if self._last - ts > STEP_TOLERANCE_S:
                self.clamped += 1
            ts = self._last
            t = datetime.fromtimestamp(ts, timezone.utc)
        self._last, self._last_mono = ts, self.monotonic()
        return t

    def synchronized(self) -> bool:
        return bool(self.sync_check())


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: *initial_s* seconds after the first consecutive failure, doubling per
    further failure, never more than *max_s*. The one formula every retry in beemond uses (worker
    restarts, upload retries, device re-opens, sensor read retries, record write retries).

    The exponent is capped at 64, so a link down for days (thousands of failures) cannot overflow a
    float; ``max_s`` has long been reached by then.
    """

    initial_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        """Seconds to wait after *failures* consecutive failures (1 for the first; 0 or less: 0 s)."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.initial_s * 2.0 ** min(failures - 1, 64))

    def jittered(self, failures: int, uniform=random.uniform) -> float:
        """:meth:`delay` drawn uniformly from [d/2, d] ("equal jitter"): a fleet of hives that lost the
        same server must not retry in step. *uniform* is ``random.uniform``; tests pass their own."""
        d = self.delay(failures)
        return uniform(d / 2, d)


def parse_iso(text: str) -> datetime:
    """Inverse of :func:`utc_iso` (accepts any ISO 8601 with offset or ``Z``); naive means UTC."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def utc_iso(t: datetime) -> str:
    """ISO 8601 extended format in UTC with milliseconds, e.g. ``2021-06-19T00:04:58.000Z``."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
