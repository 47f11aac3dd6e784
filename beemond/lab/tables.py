"""The lab's daily tables from the records of a batch: one CSV per host, sensor and UTC day, its
``gaps.csv``, an optional Parquet mirror, and new readings as InfluxDB line protocol.

Rows go to the day of their own time column, sorted by time, no duplicate rows; a column added later
joins the header (empty before). Gaps come from the records' metadata (``gap_s``, ``after_restart``,
written by the device) and from holes in the readings' times longer than :data:`HOLE_FACTOR` sampling
intervals (the median step of that day). Nothing here is durable by itself: :meth:`DailyTables.stage`
writes under temporary names, and the worker's flush syncs and renames them before the ledger commits.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beemond.core.clock import parse_iso, utc_iso
from beemond.lab.ledger import Report
from beemond.core.fsio import temp_name

PARQUET = "parquet"
PUSH_PENDING = ".push-pending"
GAPS = "gaps.csv"
HOLE_FACTOR = 3.0           # a step over this many median sampling intervals is a gap


@dataclass
class Day:
    header: list[str]
    rows: set[tuple[str, ...]] = field(default_factory=set)
    gaps: set[tuple[str, str, str, str]] = field(default_factory=set)   # (start, end, duration_s, source)


class DailyTables:
    """The days one worker's batch touched, merged in memory until :meth:`stage` writes them.

    *out*: the data tree; *options*: :class:`beemond.lab.unpack.Options` (``parquet``, ``push``);
    *report*: counts new rows (``rows``)."""

    def __init__(self, out: Path, options, report: Report):
        self.out, self.opt, self.report = out, options, report
        self.days: dict[tuple[str, str, str], Day] = {}
        self.push_lines: list[str] = []
        self._duck = None

    def _day(self, host: str, sensor: str, date: str, header: list[str] | None = None) -> Day:
        key = (host, sensor, date)
        cur = self.days.get(key)
        if cur is None:
            cur = self.days[key] = Day(list(header or []))
        return cur

    def gap_from_metadata(self, host: str, sensor: str, date: str, rec: dict) -> None:
        """A gap the device declared (``gap_s``: seconds since its last durable reading of this sensor;
        ``after_restart``: the first record after a restart) ends at the record's start."""
        meta = rec.get("metadata") or {}
        gap_s, restart = meta.get("gap_s"), meta.get("after_restart") is True
        if not isinstance(rec.get("start"), str):
            return
        if not isinstance(gap_s, (int, float)) or isinstance(gap_s, bool) or not math.isfinite(gap_s) or gap_s < 0:
            gap_s = None
        if gap_s is None and not restart:
            return
        try:
            end = parse_iso(rec.get("start", ""))
        except (ValueError, TypeError):
            return
        try:
            start = end if gap_s is None else datetime.fromtimestamp(end.timestamp() - gap_s, timezone.utc)
        except (OverflowError, ValueError, OSError):  # a gap reaching before year 1: no such gap
            return
        day = self._day(host, sensor, date)
        day.gaps.add((utc_iso(start), utc_iso(end), "" if gap_s is None else f"{gap_s:g}",
                      "after_restart" if restart else "device"))

    def merge_rows(self, host: str, sensor: str, date: str, rows: list[list[str]]) -> None:
        if not rows:
            return
        header, body = rows[0], rows[1:]
        for row in body:
            if not any(row):
                continue  # a blank line is no reading
            cur = self._day(host, sensor, date_of(row[0]) or date, header)
            if not cur.header:
                cur.header = list(header)
            if header != cur.header:
                cur.header, cur.rows = union(cur.header, cur.rows, header)
            pos = [cur.header.index(c) for c in header]
            full = [""] * len(cur.header)
            for p, v in zip(pos, row):
                full[p] = v
            cur.rows.add(tuple(full))

    def stage(self) -> tuple[list[tuple[Path, Path]], list[tuple[str, str, str, Path]], Path | None]:
        """Write every pending day's CSV and gaps under temporary names, and the new readings to push
        (kept on disk in ``PUSH_PENDING``), then forget the days. Returns ``(staged, mirrors, kept)``:
        (temporary, final) pairs to rename, in that order, once synced; the days to mirror as Parquet
        after that; the line-protocol file to push after the ledger commit (or None)."""
        staged: list[tuple[Path, Path]] = []
        mirrors: list[tuple[str, str, str, Path]] = []
        for (host, sensor, date), day in sorted(self.days.items()):
            folder = self.out / host / date / sensor
            path = folder / f"{host}@{date}.csv"
            header, rows, before, old_rows = day.header, day.rows, 0, set()
            if path.exists():
                with open(path, newline="", encoding="utf-8") as f:
                    old = list(csv.reader(f))
                if old:
                    before = len(old) - 1
                    old_rows = {tuple(r) for r in old[1:]}
                    header, rows = union(old[0], old_rows, day.header, day.rows) if day.header else (old[0], old_rows)
            folder.mkdir(parents=True, exist_ok=True)
            if rows:
                self.report.rows += len(rows) - before
                buf = io.StringIO()
                w = csv.writer(buf, lineterminator="\n")
                w.writerow(header)
                ordered = sorted(rows)
                w.writerows(ordered)
                staged.append((stage_file(path, buf.getvalue().encode()), path))
                if self.opt.parquet:
                    mirrors.append((host, sensor, date, path))
                if self.opt.push and len(rows) > before:
                    new = rows - union(old[0], old_rows, header)[1] if old_rows else rows
                    self.push_lines += line_protocol(host, sensor, header, new)
            else:
                ordered = []
            self._write_gaps(folder, header, ordered, day.gaps, staged)
        self.days.clear()
        kept = None
        if self.push_lines:
            # Kept on disk before any CSV shows these rows: once a CSV holds them they are no longer new,
            # so a run killed while pushing would otherwise never send them. Renamed first, so a CSV
            # rename that survives a crash implies this one did.
            kept = self.out / PUSH_PENDING / f"{time.time_ns()}-{os.getpid()}.lp"
            kept.parent.mkdir(exist_ok=True)
            staged.insert(0, (stage_file(kept, ("\n".join(self.push_lines) + "\n").encode()), kept))
            self.push_lines = []
        return staged, mirrors, kept

    def _write_gaps(self, folder: Path, header: list[str], rows: list[tuple], declared: set,
                    staged: list[tuple[Path, Path]]) -> None:
        path = folder / GAPS
        kept = set(declared)
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                kept |= {tuple(r) for r in list(csv.reader(f))[1:] if r and r[3] != "timestamps"}
        holes = timestamp_holes([r[0] for r in rows]) if rows and header and header[0] == "time" else []
        if not kept and not holes and not path.exists():
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["start", "end", "duration_s", "source"])
        w.writerows(sorted(kept | set(holes)))
        staged.append((stage_file(path, buf.getvalue().encode()), path))

    def parquet(self, host: str, sensor: str, date: str, csv_path: Path) -> Path:
        """Mirror one day's CSV as Parquet (DuckDB). Returns the Parquet file's path."""
        if self._duck is None:
            import duckdb  # beemond[lab]; checked by the CLI before any work

            self._duck = duckdb.connect()
        dest = self.out / PARQUET / f"host={host}" / f"sensor={sensor}" / f"date={date}" / "data.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(dest.parent, dest.name)
        # Names are checked (HOST_RE, NAME_RE, a date): safe inside SQL string literals.
        # sample_size=-1: column types from every row, so a column that turns to text late in the day
        # is text, not a conversion error on every run from then on.
        self._duck.execute(f"COPY (SELECT * FROM read_csv('{csv_path}', header=true, auto_detect=true, "
                           f"sample_size=-1)) TO '{tmp}' (FORMAT parquet)")
        os.replace(tmp, dest)
        return dest


def timestamp_holes(times: list[str], factor: float = HOLE_FACTOR) -> list[tuple[str, str, str, str]]:
    """Gaps in sorted ISO 8601 *times*: each step longer than *factor* times the median step, as
    (start, end, duration_s, ``"timestamps"``). Fewer than 3 readings: none."""
    ts = []
    for t in times:
        try:
            ts.append((parse_iso(t).timestamp(), t))
        except (ValueError, TypeError):
            continue
    if len(ts) < 3:
        return []
    steps = [b[0] - a[0] for a, b in zip(ts, ts[1:])]
    median = statistics.median(s for s in steps if s > 0) if any(s > 0 for s in steps) else 0
    if median <= 0:
        return []
    return [(a[1], b[1], f"{b[0] - a[0]:g}", "timestamps") for (a, b), s in zip(zip(ts, ts[1:]), steps)
            if s > factor * median]


def line_protocol(host: str, sensor: str, header: list[str], rows) -> list[str]:
    """InfluxDB line protocol, one line per reading: measurement ``beemond``, tags ``host`` and
    ``sensor``, every numeric column a field, the device's time in ns. (VictoriaMetrics stores field F
    as metric ``beemond_F``.) Rows without a parsable time or a numeric value are left out."""
    lines = []
    cols = header[1:]
    for row in rows:
        try:
            t = parse_iso(row[0])
        except (ValueError, TypeError, IndexError):
            continue
        fields = []
        for c, v in zip(cols, row[1:]):
            try:
                x = float(v)
            except ValueError:
                continue
            if math.isfinite(x) and c.replace("_", "").isalnum():
                fields.append(f"{c}={x!r}")
        if fields:
            ns = int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
            lines.append(f"beemond,host={host},sensor={sensor} {','.join(fields)} {ns}")
    return lines


def push(url: str, pending: Path, report: Report, chunk: int = 20000, files: list[Path] | None = None) -> int:
    """POST the line-protocol files *files* (default: every ``*.lp`` kept in *pending*; one process
    only, the end of a run) to *url* in batches of *chunk* lines. A file is removed once all its lines
    were accepted, and kept for the next run otherwise (the error in ``report.push_errors``): at least
    once, since a point sent twice has the same series and time. Returns the number of lines sent."""
    import urllib.error
    import urllib.request

    sent = 0
    if files is None:
        files = sorted(pending.glob("*.lp")) if pending.is_dir() else []
    for path in files:
        lines, failed = path.read_text().splitlines(), False
        for i in range(0, len(lines), chunk):
            batch = lines[i:i + chunk]
            try:
                req = urllib.request.Request(url, data=("\n".join(batch) + "\n").encode(), method="POST")
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
            except (urllib.error.URLError, OSError) as e:
                report.push_errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
                failed = True
                break
            sent += len(batch)
        if failed:  # the server is down or stalls: the rest waits for the next run too
            break
        path.unlink()
    return sent


def stage_file(path: Path, data: bytes) -> Path:
    """*data* written under a temporary name beside *path* (swept by the next run after a crash)."""
    tmp = temp_name(path.parent, path.name)
    tmp.write_bytes(data)
    return tmp


def union(header: list[str], rows: set, other: list[str], other_rows: set = frozenset()):
    """Columns of *header* then the new ones of *other*; both row sets re-laid on that header."""
    cols = list(header) + [c for c in other if c not in header]

    def relay(h, rs):
        if h == cols:
            return set(rs)
        pos = [cols.index(c) for c in h]
        out = set()
        for r in rs:
            full = [""] * len(cols)
            for p, v in zip(pos, r):
                full[p] = v
            out.add(tuple(full))
        return out

    return cols, relay(header, rows) | relay(other, other_rows)


def date_of(text: str) -> str | None:
    """``YYYY-MM-DD`` (UTC) of an ISO 8601 time, or None (also for a manifest's null or number)."""
    if not isinstance(text, str):
        return None
    try:
        return parse_iso(text).strftime("%Y-%m-%d")
    except (ValueError, TypeError):
        return None
