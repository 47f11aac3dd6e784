"""Replay of real measurements from a CSV file into an emulated sensor.

Made for the UrBAN 2021 in-hive data in ``shared/data/urban-2021/`` (see its README.md: columns
``Date`` (UTC), ``Tag number``, ``temperature`` in °C, ``humidity`` in %RH; CC BY 4.0, Abdollahi et
al. 2024, doi:10.20383/103.0972), but every column name and the row filter are configurable.

Two pacing modes:

Exact duplicate rows (same time and values) are replayed once: the UrBAN subset lists every row of
a hive twice.

- ``speedup = 0`` (sequential): each measurement is served the next row, so every row in the run
  reaches the driver exactly once. This is what the end-to-end tests check.
- ``speedup > 0`` (clock): replay time runs ``speedup`` times faster than the monotonic clock since
  the replay started, and a measurement sees the latest row at or before replay time (a sample-and-
  hold of the real signal), so rows may repeat or be skipped, as with a real sensor.
"""

from __future__ import annotations

import bisect
import csv
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Row:
    index: int          # position among the filtered rows, from 0
    time: datetime      # UTC
    temperature_c: float
    humidity_rh: float
    pressure_pa: float | None = None   # only with a pressure column


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class CsvReplay:
    """Filtered rows of a CSV file and a cursor over them. Raises ``ValueError`` on a bad file."""

    def __init__(self, rows: list[Row], start: datetime | None = None, speedup: float = 0.0, loop: bool = True):
        if not rows:
            raise ValueError("the replay file has no rows after filtering")
        self.rows = rows
        self.speedup = speedup
        self.loop = loop
        self._times = [r.time.timestamp() for r in rows]
        self._first = 0 if start is None else max(0, bisect.bisect_left(self._times, start.timestamp()))
        if self._first >= len(rows):
            raise ValueError(f"start {start.isoformat()} is after the last row ({rows[-1].time.isoformat()})")
        self._next = self._first
        self._t0 = time.monotonic()

    @classmethod
    def from_config(cls, rc) -> "CsvReplay":
        return cls(load_rows(rc.file, rc.time_column, rc.temperature_column, rc.humidity_column,
                             rc.filter_column, rc.filter_value, rc.pressure_column),
                   start=_parse_time(rc.start) if rc.start else None, speedup=rc.speedup, loop=rc.loop)

    def next_row(self) -> Row:
        """The row the next measurement sees."""
        if self.speedup > 0:
            replay_t = self._times[self._first] + (time.monotonic() - self._t0) * self.speedup
            span = self._times[-1] - self._times[self._first]
            if self.loop and span > 0:
                replay_t = self._times[self._first] + (replay_t - self._times[self._first]) % span
            i = max(self._first, bisect.bisect_right(self._times, replay_t) - 1)
            return self.rows[i]
        if self._next >= len(self.rows):
            if not self.loop:
                return self.rows[-1]
            self._next = self._first
        row = self.rows[self._next]
        self._next += 1
        return row


def read_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first line)."""
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def load_rows(path: Path, time_column: str, temperature_column: str, humidity_column: str,
              filter_column: str = "", filter_value: str = "", pressure_column: str = "") -> list[Row]:
    """Read the rows of *path* whose *filter_column* equals *filter_value* (all rows if unset);
    *pressure_column* (Pa), if given, fills ``Row.pressure_pa``."""
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        optional = [c for c in (filter_column, pressure_column) if c]
        for col in (time_column, temperature_column, humidity_column, *optional):
            if col not in header:
                raise ValueError(f"column {col!r} not in {path.name} (has: {', '.join(header)})")
        for n, rec in enumerate(reader, start=2):
            if filter_column and rec[filter_column].strip() != filter_value:
                continue
            try:
                rows.append(Row(len(rows), _parse_time(rec[time_column]),
                                float(rec[temperature_column]), float(rec[humidity_column]),
                                float(rec[pressure_column]) if pressure_column else None))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path.name} line {n}: {e}") from None
    # The UrBAN subset lists each row of a hive twice; a sensor measures a moment once.
    unique = sorted({(r.time, r.temperature_c, r.humidity_rh, r.pressure_pa) for r in rows},
                    key=lambda u: (*u[:3], u[3] or 0.0))
    return [Row(i, *u) for i, u in enumerate(unique)]
