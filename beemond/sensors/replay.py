"""Replay of real measurements from a CSV file into an emulated sensor.

Made for the UrBAN 2021 in-hive data in ``data/urban-2021/`` (see its README.md: columns
``Date`` (UTC), ``Tag number``, ``temperature`` in °C, ``humidity`` in %RH; CC BY 4.0, Abdollahi et
al. 2024, doi:10.20383/103.0972), but every column name and the row filter are configurable, and any
quantity can be replayed: a sensor reads a mapping quantity -> CSV column (``{"temperature_c":
"temperature", "co2_ppm": "co2"}``, see :class:`beemond.sensors.section.ReplayConfig`), and each
:class:`Row` holds those quantities by name.

Fidelity: rows keep their file order, stably sorted by time only (never by value); rows that share a
timestamp are all kept; only exact duplicate lines are dropped (the UrBAN subset lists every row of
a hive twice). A sensor reads only the columns it uses (a DS18B20 needs no humidity column). An empty
or unparseable cell drops its row from the replay of a sensor that uses that column, and is counted
(``CsvReplay.skipped``, per column); it never rejects the file. Timestamps without an offset are in
``timezone`` (an IANA name; UTC by default).

Two pacing modes:

- ``speedup = 0`` (sequential): each measurement is served the next row, so every row in the run
  reaches the driver exactly once. This is what the end-to-end tests check.
- ``speedup > 0`` (clock): replay time runs ``speedup`` times faster than the monotonic clock since
  the replay started, and a measurement sees the latest row at or before replay time (a sample-and-
  hold of the real signal), so rows may repeat or be skipped, as with a real sensor.

Resume: :meth:`CsvReplay.position` is kept with each reading in the sensor's journal
(:mod:`beemond.reading_journal`); after a restart or a worker crash :meth:`CsvReplay.resume`
continues with the row after the last durable reading instead of replaying from ``start``.
"""

from __future__ import annotations

import array
import bisect
import collections
import csv
import logging
import time
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Row:
    """One replayed row: ``row.temperature_c`` (or ``row.values["temperature_c"]``) is the value of
    that quantity's column; :meth:`get` gives ``None`` for a quantity the replay does not read.

    The values are a tuple beside one tuple of quantity names shared by every row of a replay, not a
    dict per row: a replay holds every row of its file for months, and a dict costs ~180 bytes more
    per row (5 MB per worker for the UrBAN file, measured with bench/footprint.py)."""

    index: int          # position among the replayed rows, from 0
    time: datetime      # UTC
    quantities: tuple   # quantity names, the same tuple object for every row of one replay
    numbers: tuple      # float per quantity, in the order of quantities

    @property
    def values(self) -> dict:
        """quantity -> float."""
        return dict(zip(self.quantities, self.numbers))

    def __getattr__(self, quantity: str) -> float:
        if quantity in ("quantities", "numbers"):   # not set yet (copy, unpickle): no recursion
            raise AttributeError(quantity)
        try:
            return self.numbers[self.quantities.index(quantity)]
        except ValueError:
            raise AttributeError(f"the replay reads no {quantity!r} (it reads {', '.join(self.quantities)})") from None

    def get(self, quantity: str, default=None):
        try:
            return self.numbers[self.quantities.index(quantity)]
        except ValueError:
            return default


class RowTable(Sequence):
    """The rows of a replay as flat arrays: 8 bytes per time and per value, where a :class:`Row`
    object with its datetime, tuple and floats costs ~220 bytes (1.2 MB per replay of the UrBAN file,
    held for months). Indexing makes the :class:`Row` (a slice: a list of them).

    *micros*: each row's UTC time in microseconds since the epoch, sorted; *numbers*: the values of
    row ``i`` at ``[i * len(quantities):(i + 1) * len(quantities)]``, in the order of *quantities*."""

    def __init__(self, quantities: tuple, micros: array.array, numbers: array.array):
        self.quantities, self.micros, self.numbers = quantities, micros, numbers

    def __len__(self) -> int:
        return len(self.micros)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("row index out of range")
        width = len(self.quantities)
        return Row(i, _EPOCH + timedelta(microseconds=self.micros[i]), self.quantities,
                   tuple(self.numbers[i * width:(i + 1) * width]))

    def timestamps(self) -> array.array:
        """Each row's time in POSIX seconds (``row.time.timestamp()``)."""
        return array.array("d", (us / 1e6 for us in self.micros))


def _parse_time(text: str, tz: tzinfo = timezone.utc) -> datetime:
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=tz)).astimezone(timezone.utc)


def zone(name: str) -> tzinfo:
    """The zone of naive timestamps: an IANA name (``""`` or ``"UTC"``: UTC). Raises ``ValueError``."""
    if not name or name.upper() == "UTC":
        return timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {name!r} (e.g. Europe/Paris, UTC)") from None


class CsvReplay:
    """Filtered rows of a CSV file and a cursor over them. Raises ``ValueError`` on a bad file."""

    def __init__(self, rows: Sequence, start: datetime | None = None, speedup: float = 0.0, loop: bool = True,
                 skipped: dict[str, int] | None = None):
        if not rows:
            raise ValueError("the replay file has no rows after filtering")
        self.rows = rows
        self.speedup = speedup
        self.loop = loop
        self.skipped = dict(skipped or {})   # column -> cells that were empty or unparseable
        # POSIX seconds per row; a RowTable gives them without making every Row
        self._times = rows.timestamps() if isinstance(rows, RowTable) else [r.time.timestamp() for r in rows]
        self._first = 0 if start is None else max(0, bisect.bisect_left(self._times, start.timestamp()))
        if self._first >= len(rows):
            raise ValueError(f"start {start.isoformat()} is after the last row ({rows[-1].time.isoformat()})")
        self._next = self._first
        self._t0 = time.monotonic()
        self._served: Row | None = None

    @classmethod
    def from_config(cls, rc, columns: dict[str, str]) -> "CsvReplay":
        """The replay a ``[replay]`` table *rc* describes, reading *columns* (quantity -> CSV column:
        the sensor section's ``replay_columns()``). Raises ``ValueError``, ``OSError``."""
        skipped: dict[str, int] = {}
        rows = load_rows(rc.file, rc.time_column, columns, rc.filter_column, rc.filter_value,
                         tz=zone(getattr(rc, "timezone", "")), skipped=skipped)
        if skipped:
            log.warning("replay %s: skipped %s", rc.file.name,
                        ", ".join(f"{n} unreadable {col!r} cell(s)" for col, n in skipped.items()))
        return cls(rows, start=_parse_time(rc.start) if rc.start else None, speedup=rc.speedup, loop=rc.loop,
                   skipped=skipped)

    def next_row(self) -> Row:
        """The row the next measurement sees."""
        if self.speedup > 0:
            replay_t = self._times[self._first] + (time.monotonic() - self._t0) * self.speedup
            span = self._times[-1] - self._times[self._first]
            if self.loop and span > 0:
                replay_t = self._times[self._first] + (replay_t - self._times[self._first]) % span
            i = max(self._first, bisect.bisect_right(self._times, replay_t) - 1)
            self._served = self.rows[i]
            return self._served
        if self._next >= len(self.rows):
            if not self.loop:
                self._served = self.rows[-1]
                return self._served
            self._next = self._first
        row = self.rows[self._next]
        self._next += 1
        self._served = row
        return row

    def position(self) -> dict | None:
        """Where the replay stands (JSON): the last row served, by index and time; None before any."""
        if self._served is None:
            return None
        return {"row": self._served.index, "time": self._served.time.isoformat()}

    def resume(self, position: dict) -> None:
        """Continue after the row *position* names (:meth:`position`). If the file changed (that row
        index has another time), continue after the last row at or before that time."""
        try:
            i, t = int(position["row"]), datetime.fromisoformat(position["time"])
        except (KeyError, TypeError, ValueError):
            log.warning("replay: ignoring an unreadable position %r", position)
            return
        if not (0 <= i < len(self.rows) and self.rows[i].time == t):
            i = bisect.bisect_right(self._times, t.timestamp()) - 1
            log.warning("replay: the file changed; resuming after the row at or before %s", t.isoformat())
            if i < 0:
                return
        if self.speedup > 0:
            # replay time continues from the row served last
            self._t0 = time.monotonic() - (self._times[i] - self._times[self._first]) / self.speedup
        else:
            self._next = i + 1
        self._served = self.rows[i]
        log.info("replay resumes after row %d (%s)", i, self.rows[i].time.isoformat())


def read_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first line)."""
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def load_rows(path: Path, time_column: str, columns: dict[str, str], filter_column: str = "",
              filter_value: str = "", tz: tzinfo = timezone.utc, skipped: dict[str, int] | None = None) -> RowTable:
    """Read the rows of *path* whose *filter_column* equals *filter_value* (all rows if unset), as a
    :class:`RowTable` whose rows are :class:`Row` objects of the quantities in *columns* (quantity ->
    CSV column).

    Only the named columns are read; a missing named column raises ``ValueError``. A row whose time or
    a named value is empty or unparseable is left out and counted in *skipped* (column -> count).
    Exact duplicate lines are dropped; the rest keep their file order, stably sorted by time. Naive
    times are in *tz*.
    """
    skipped = skipped if skipped is not None else {}
    counts = collections.Counter()
    # Flat arrays (RowTable), not an object per row: made during the parse, the rows that stay for
    # months would be scattered over every memory arena the parse's temporaries (csv fields, the
    # duplicate set) used and keep them all (~10 MB per replay of the UrBAN file against ~1.5 MB of
    # rows; measured with bench/footprint.py).
    micros = array.array("q")    # each kept line's UTC time, microseconds since the epoch
    numbers = array.array("d")   # its values, len(columns) per line
    seen: set = set()   # kept lines, each as one string (or a tuple)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        named = [c for c in (time_column, *columns.values(), filter_column) if c]
        for col in named:
            if col not in header:
                raise ValueError(f"column {col!r} not in {Path(path).name} (has: {', '.join(header)})")
        at = {c: header.index(c) for c in named}
        for fields in reader:
            if len(fields) < len(header):
                padded = fields + [""] * (len(header) - len(fields))
            else:
                padded = fields
            if filter_column and padded[at[filter_column]].strip() != filter_value:
                continue
            key = "\x1f".join(fields)   # one string per line is lighter than a tuple of fields;
            if key.count("\x1f") != len(fields) - 1:   # a field holding the separator: exact all the same
                key = tuple(fields)
            if key in seen:   # an exact duplicate line
                continue
            seen.add(key)
            try:
                t = _parse_time(padded[at[time_column]], tz)
            except ValueError:
                counts[time_column] += 1
                continue
            values = []
            for col in columns.values():
                try:
                    values.append(float(padded[at[col]]))
                except ValueError:
                    counts[col] += 1
                    values = None
                    break
            if values is not None:
                micros.append((t - _EPOCH) // _MICROSECOND)
                numbers.extend(values)
    del seen
    skipped.update(counts)
    quantities, width = tuple(columns), len(columns)
    if any(b < a for a, b in zip(micros, micros[1:])):
        order = sorted(range(len(micros)), key=micros.__getitem__)   # stable: rows of one time keep their file order
        micros = array.array("q", (micros[j] for j in order))
        numbers = array.array("d", (v for j in order for v in numbers[j * width:(j + 1) * width]))
    return RowTable(quantities, micros, numbers)
