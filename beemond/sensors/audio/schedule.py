"""When a scheduled sensor captures: a daily local-time window, a capture every ``every_s`` in it.

AppMAIS's hives record 60 s of audio every 300 s between 08:00 and 20:00 (the schedule issue 3
asks for as the default); that is ``CaptureWindow(time(8), time(20), 300)``.
Capture slots start at the window's opening and then every ``every_s``; a slot must start before
the window closes. A window whose end is earlier than its start crosses midnight (22:00–04:00); one
whose end equals its start lasts the whole day.

Slots are computed from the wall clock in the window's time zone (``zoneinfo``; ``None`` is the
system's local time), so DST changes move them with the clock on the wall. The caller waits on the
monotonic clock and calls :meth:`CaptureWindow.step` again after every wait: a Pi without an RTC
jumps its clock at NTP sync, and a jump must neither cause a burst of missed captures nor a negative
wait. Everything here is a pure function of the times it is given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo

HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")

# A slot whose time has passed by more than this when we look is skipped, not captured late: the
# clock jumped forward, or the worker was stopped (a capture starting seconds late is still fine).
LATE_S = 10.0


def parse_hhmm(text: str) -> time:
    """``"HH:MM"`` (24 h) -> :class:`datetime.time`. Raises ``ValueError`` naming the allowed form."""
    m = HHMM_RE.match(text)
    if not m:
        raise ValueError(f"must be HH:MM in 24-hour time (00:00 to 23:59), got {text!r}")
    return time(int(m.group(1)), int(m.group(2)))


def _local(day: date, at: time, tz: tzinfo | None) -> datetime:
    """The UTC instant of wall time *at* on *day* in *tz* (``None``: the system's local time)."""
    if tz is None:
        return datetime.combine(day, at).astimezone().astimezone(timezone.utc)
    return datetime.combine(day, at, tzinfo=tz).astimezone(timezone.utc)


@dataclass(frozen=True)
class CaptureWindow:
    start: time
    end: time
    every_s: float
    tz: tzinfo | None = None

    def windows_around(self, now: datetime):
        """(open, close) UTC instants of the windows that opened on the day before *now*'s local
        date, on that date and on the two days after, in order."""
        today = now.astimezone(self.tz).date() if self.tz else now.astimezone().date()
        for offset in (-1, 0, 1, 2):
            day = today + timedelta(days=offset)
            close_day = day if self.end > self.start else day + timedelta(days=1)
            yield _local(day, self.start, self.tz), _local(close_day, self.end, self.tz)

    def next_start(self, now: datetime) -> datetime:
        """The first capture slot at or after *now* (aware datetimes; the result is UTC)."""
        every = timedelta(seconds=self.every_s)
        for opens, closes in self.windows_around(now):
            if closes <= now:
                continue
            slot = opens if now <= opens else opens + every * math.ceil((now - opens) / every)
            if slot < closes:
                return slot
        raise AssertionError("a daily window always has a slot within three days")  # unreachable

    def in_window(self, now: datetime) -> bool:
        return any(opens <= now < closes for opens, closes in self.windows_around(now))

    def step(self, now: datetime, due: datetime | None) -> tuple[bool, datetime]:
        """Decide at wall time *now*, given the slot *due* we were waiting for (or ``None``).

        Returns ``(capture, due)``: ``capture`` is true when slot *due* has come (at most
        :data:`LATE_S` late), and the caller captures now and then asks again with the slot after it
        (:meth:`after`). Otherwise ``due`` is the slot to wait for: recomputed from *now*, so a
        clock that jumped back gets a nearer slot and one that jumped past slots skips them (logged
        by the caller when ``due`` moved forward) rather than catching up in a burst.
        """
        if due is not None and now >= due and (now - due).total_seconds() <= LATE_S:
            return True, due
        return False, self.next_start(now)

    def after(self, slot: datetime) -> datetime:
        """The slot following *slot* (used after a capture, however long it took)."""
        return self.next_start(slot + timedelta(microseconds=1))

    def wait_s(self, now: datetime, due: datetime) -> float:
        """Seconds to wait (on the monotonic clock) for *due*; never negative."""
        return max(0.0, (due - now).total_seconds())

    def describe(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"
