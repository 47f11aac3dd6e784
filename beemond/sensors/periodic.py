"""Small building blocks for sensors that poll values or batch them (after wacryptolib's ``sensor``
module: PeriodicValuePoller, JsonDataAggregator, TarfileRecordAggregator), in beemond's terms.

- :class:`PeriodicValuePoller` calls a function every ``interval_s`` on the monotonic clock. Due times
  are ``t0 + k * interval_s``, so a slow call never shifts the later ones (no drift), and intervals
  missed during a stall are skipped, never run in a burst.
- :class:`TimeWindow` is the time limit both aggregators share: it opens at the first item and is due
  ``max_duration_s`` later (monotonic, so a wall-clock jump at NTP sync neither closes nor stretches it).
- :class:`JsonDataAggregator` collects dicts and, once its window is due, writes them as one JSON
  record (:class:`beemond.records.JsonArchiver`) named ``<sensor>_<from>_<to>.json`` through any writer
  callable (normally a :class:`beemond.records.BackgroundWriter`).
- :class:`TarRecordAggregator` collects small in-memory records into one uncompressed tar whose members
  are named ``<sensor>_<from>_<to><ext>`` (:func:`beemond.core.names.member_name`), handed to a callable
  when the window is due. (The daemon's own bundles are built from spool files by
  :mod:`beemond.aggregator`, whose default record names are the same.)

All of them are driven by their owner's loop: ``due()`` says when to call ``poll()``/``flush_if_due()``,
so a worker keeps its single ``channel.receive(timeout)`` wait and needs no extra thread.
"""

from __future__ import annotations

import io
import tarfile
import time
from datetime import datetime, timezone

from beemond import records
from beemond.core import names
from beemond.core.clock import utc_iso


class PeriodicValuePoller:
    """Calls *task* every *interval_s* seconds and passes each result to *sink*.

    ``poll(now)`` runs the task if it is due and returns the next due time (monotonic seconds). A task
    raising an exception propagates it; the schedule is kept (the next call is still on the grid).
    *sink* may be None (a task that stores its own result).
    """

    def __init__(self, interval_s: float, task, sink=None, clock=time.monotonic):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s, self.task, self.sink, self.clock = interval_s, task, sink, clock
        self.next_due = clock()
        self.skipped = 0

    def due(self) -> float:
        return self.next_due

    def restart(self) -> None:
        """A new grid from now (after a pause)."""
        self.next_due = self.clock()

    def poll(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        if now >= self.next_due:
            self.next_due += self.interval_s
            if self.next_due < now:  # a stall: skip the missed slots, stay on the grid
                missed = int((now - self.next_due) // self.interval_s) + 1
                self.skipped += missed
                self.next_due += missed * self.interval_s
            result = self.task()
            if self.sink is not None:
                self.sink(result)
        return self.next_due


class TimeWindow:
    """Opens at the first item, due *max_duration_s* later (monotonic seconds)."""

    def __init__(self, max_duration_s: float, clock=time.monotonic):
        if max_duration_s <= 0:
            raise ValueError("max_duration_s must be > 0")
        self.max_duration_s, self.clock = max_duration_s, clock
        self.opened: float | None = None

    def touch(self) -> None:
        if self.opened is None:
            self.opened = self.clock()

    def due(self) -> float | None:
        return None if self.opened is None else self.opened + self.max_duration_s

    def expired(self, now: float | None = None) -> bool:
        due = self.due()
        return due is not None and (self.clock() if now is None else now) >= due

    def reset(self) -> None:
        self.opened = None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Windowed:
    """An aggregator whose batch is written when its :class:`TimeWindow` is due."""

    window: TimeWindow

    def flush(self) -> None:
        raise NotImplementedError

    def flush_if_due(self) -> bool:
        """Flush if the window is due (call it when ``window.due()`` passes); True if it flushed."""
        if self.window.expired():
            self.flush()
            return True
        return False


class JsonDataAggregator(_Windowed):
    """Batches dicts into JSON records of one time window each.

    ``add_data(d)`` first flushes a window that is due (so a record never spans more than
    *max_duration_s*), then appends *d*. ``flush()`` writes the batch, if any, by calling
    ``write(relname, metadata, data_writer)`` (e.g. :meth:`beemond.records.BackgroundWriter.submit`).
    The record is ``{"data": [dicts...], "metadata": {...}}`` (:class:`~beemond.records.JsonArchiver`
    with ``merge_metadata``); *metadata* holds sensor, start, end (UTC ISO 8601) and count, over
    *default_metadata*.
    """

    def __init__(self, sensor: str, max_duration_s: float, write, default_metadata: dict | None = None,
                 merge_metadata: bool = True, clock=time.monotonic, now=_utcnow):
        self.sensor, self.write, self.now = sensor, write, now
        self.default_metadata = default_metadata or {}
        self.archiver = records.JsonArchiver(merge_metadata)
        self.window = TimeWindow(max_duration_s, clock)
        self.dataset: list[dict] = []
        self.started: datetime | None = None

    def add_data(self, data: dict) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        self.flush_if_due()
        if not self.dataset:
            self.started = self.now()
        self.window.touch()
        self.dataset.append(data)

    def flush(self) -> None:
        if not self.dataset:
            self.window.reset()
            return
        data, start, end = self.dataset, self.started, self.now()
        self.dataset, self.started = [], None
        self.window.reset()
        metadata = records.with_default_metadata(self.default_metadata, {
            "sensor": self.sensor, "start": utc_iso(start), "end": utc_iso(end), "count": len(data)})
        relname = names.member_name(self.sensor, start, end, "." + self.archiver.ext)
        self.write(relname, metadata, self.archiver.data_writer(data, metadata))


class TarRecordAggregator(_Windowed):
    """Collects in-memory records into one uncompressed tar per time window.

    ``add_record(sensor, start, end, ext, payload)`` adds a member ``<sensor>_<from>_<to><ext>``
    (a later record of the same name is stored too; the last one wins on extraction). When the window is
    due, ``flush()`` hands ``(tar bytes, [member names], start, end)`` to *sink*. Memory: the window's
    payloads, once.
    """

    def __init__(self, max_duration_s: float, sink, clock=time.monotonic, now=_utcnow):
        self.sink, self.now = sink, now
        self.window = TimeWindow(max_duration_s, clock)
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self.members: list[str] = []
        self.started: datetime | None = None

    def add_record(self, sensor: str, start: datetime, end: datetime, ext: str, payload: bytes) -> str:
        if end < start:
            raise ValueError("a record cannot end before it starts")
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("record times must be timezone-aware (UTC)")
        if self.window.expired():
            self.flush()
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
            self.started = self.now()
        self.window.touch()
        name = names.member_name(sensor, start, end, ext)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), int(end.timestamp()), 0o644
        self._tar.addfile(info, io.BytesIO(payload))
        self.members.append(name)
        return name

    def flush(self) -> None:
        if self._tar is None:
            self.window.reset()
            return
        self._tar.close()
        data, members, start = self._buf.getvalue(), self.members, self.started
        self._tar, self._buf, self.members, self.started = None, None, [], None
        self.window.reset()
        self.sink(data, members, start, self.now())
