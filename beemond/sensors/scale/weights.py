"""The weight CSV a simulated scale replays (``[sensors.NAME.replay]`` of a scale: time, weight in kg).

Read by the emulator (:class:`beemond.sensors.scale.emulator.WeightReplay`) and, to check the file at
load, by the config section; imports only the standard library and :mod:`beemond.sensors.replay`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime

from beemond.sensors.replay import CsvReplay, _parse_time


@dataclass(frozen=True)
class WeightRow:
    index: int
    time: datetime
    weight_kg: float


def load_weight_rows(rc) -> list[WeightRow]:
    """The rows of a weight CSV (a :class:`beemond.sensors.scale.section.WeightReplayConfig`), sorted by time.
    Raises ``ValueError`` naming the line or column at fault."""
    rows = []
    with open(rc.file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in (rc.time_column, rc.weight_column):
            if col not in header:
                raise ValueError(f"no column {col!r} in {rc.file.name} (has: {', '.join(header)})")
        for n, rec in enumerate(reader, start=2):
            try:
                kg = float(rec[rc.weight_column])
                if not math.isfinite(kg):
                    raise ValueError(f"weight {kg}")
                rows.append((_parse_time(rec[rc.time_column]), kg))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{rc.file.name} line {n}: {e}") from None
    rows.sort(key=lambda r: r[0])
    return [WeightRow(i, t, kg) for i, (t, kg) in enumerate(rows)]


def weight_replay(rc) -> CsvReplay:
    """The rows of *rc*'s file paced as it says (``start``, ``speedup``, ``loop``). Raises ``ValueError``
    (a bad line, a missing column, no rows, a start after the last row), ``OSError``."""
    return CsvReplay(load_weight_rows(rc), start=_parse_time(rc.start) if rc.start else None,
                     speedup=rc.speedup, loop=rc.loop)
