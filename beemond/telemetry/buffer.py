"""The telemetry worker's durable queue: readings waiting for the broker's acknowledgement.

paho-mqtt keeps a disconnected client's messages in memory only, so a daemon killed during a broker
outage would lose them. Every reading is therefore appended here first and leaves only when the
broker's PUBACK (QoS 1) for it arrived.

Layout: ``spool/telemetry/NNNNNNNNNN.jsonl`` segments, one JSON object per line, and ``cursor``
(``SEGMENT OFFSET``: everything before it is acknowledged). A position is ``(segment, byte offset)``.

- **Append** writes whole lines with ``O_APPEND``. A process start always opens a new segment, so a
  line torn by a power cut can only be the last line of an older segment; it is skipped and counted.
- **Durability**: :meth:`ReadingBuffer.sync` ``fdatasync``\\ s the open segment. The worker calls it
  about a second after an append if that reading is still unacknowledged, so while the broker answers
  within a second nothing is forced to the SD card (the segment is written, read back from the page
  cache and deleted); during an outage readings are durable within about a second, like a record's
  readings.
- **Acknowledgement**: entries are sent in order; the cursor is the start of the oldest entry sent and
  not yet acknowledged (or the next unsent one). Segments wholly before it are deleted. The cursor
  file is replaced without fsync: losing it in a power cut only re-publishes acknowledged readings
  (duplicates, which a subscriber drops by sensor and time), never loses one.
- **Bound**: over *max_bytes* the oldest segment goes, its unacknowledged readings counted in
  :attr:`ReadingBuffer.dropped` and named in one log line (how many, from which time to which).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from beemond.core import clock, fsio

log = logging.getLogger(__name__)

SEGMENT_BYTES = 256 * 1024   # the dropping granularity over the bound: ~1,300 readings
CURSOR = "cursor"
SUFFIX = ".jsonl"

Position = tuple[int, int]


class ReadingBuffer:
    """Append-only segments of JSON readings in *directory*, bounded to about *max_bytes* bytes."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 4))
        self.sizes: dict[int, int] = {}
        for p in self.dir.iterdir():
            if p.suffix == SUFFIX and p.stem.isdigit():
                self.sizes[int(p.stem)] = p.stat().st_size
            elif fsio.TMP_MARK in p.name:
                p.unlink(missing_ok=True)
        self.acked: Position = self._read_cursor()
        for n in [n for n in self.sizes if n < self.acked[0]]:
            self._remove(n)
        if self.sizes and self.acked[0] not in self.sizes:
            self.acked = (min(self.sizes), 0)
        self.sent: Position = self.acked
        self.write_seg = max(self.sizes, default=self.acked[0] - 1) + 1
        self._fd: int | None = None
        self._unsynced = False
        self._dir_synced = -1        # the segment whose directory entry was fsynced
        self._reader = None          # (segment, open file) read by next_unsent()
        self.inflight: dict[Position, Position] = {}   # start -> end of sent, unacknowledged entries
        self.dropped = 0             # readings lost to the bound or to a torn line
        self._cursor_saved = self.acked
        self.pending = self._count_from(self.acked)   # readings not yet acknowledged

    # ---- appending
    def append(self, entry: dict) -> None:
        """Queue one reading (a JSON-able dict). Raises ``OSError`` (disk full: the caller logs it)."""
        line = (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        if self._fd is not None and self.sizes.get(self.write_seg, 0) >= self.segment_bytes:
            self._close_writer()
            self.write_seg += 1
        if self._fd is None:
            self._fd = os.open(self._path(self.write_seg), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.sizes.setdefault(self.write_seg, 0)
        os.write(self._fd, line)
        self.sizes[self.write_seg] += len(line)
        self._unsynced = True
        self.pending += 1
        self._enforce_bound()

    def sync(self) -> None:
        """Make every appended reading durable (``fdatasync`` of the open segment, and its directory
        entry the first time)."""
        if self._fd is not None and self._unsynced:
            os.fdatasync(self._fd)
            if self._dir_synced != self.write_seg:
                fsio.fsync_dir(self.dir)
                self._dir_synced = self.write_seg
            self._unsynced = False

    @property
    def unsynced(self) -> bool:
        return self._unsynced

    # ---- sending
    def next_unsent(self) -> tuple[Position, dict] | None:
        """The next reading to publish and its start position (remembered as in flight), or None."""
        while True:
            seg, off = self.sent
            if seg not in self.sizes:
                later = [n for n in self.sizes if n > seg]
                if not later:
                    return None
                self.sent = (min(later), 0)
                continue
            if off >= self.sizes[seg]:
                if seg == self.write_seg:
                    return None
                self.sent = (seg + 1, 0)
                self._advance()   # a wholly acknowledged segment goes now
                continue
            f = self._open_reader(seg)
            f.seek(off)
            line = f.readline()
            end = (seg, off + len(line))
            if not line.endswith(b"\n"):
                if seg == self.write_seg:
                    return None   # cannot happen: our own appends are whole lines
                log.warning("telemetry buffer: skipping a torn line at the end of segment %d (a power cut)", seg)
                self.dropped += 1
                self.pending = max(0, self.pending - 1)
                self.sent = (seg + 1, 0)
                continue
            self.sent = end
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("telemetry buffer: skipping an unreadable line in segment %d", seg)
                self.dropped += 1
                self.pending = max(0, self.pending - 1)
                continue
            self.inflight[(seg, off)] = end
            return (seg, off), entry

    def ack(self, start: Position) -> bool:
        """The broker acknowledged the entry sent from *start*. False if it was unknown (dropped meanwhile)."""
        if self.inflight.pop(start, None) is None:
            return False
        self.pending = max(0, self.pending - 1)
        self._advance()
        return True

    def rewind(self) -> None:
        """Forget what is in flight: the next :meth:`next_unsent` starts again at the cursor."""
        self.inflight.clear()
        self.sent = self.acked

    def _advance(self) -> None:
        self.acked = next(iter(self.inflight)) if self.inflight else self.sent
        for n in [n for n in self.sizes if n < self.acked[0]]:
            self._remove(n)

    # ---- cursor
    def save_cursor(self) -> None:
        """Persist the acknowledged position if it moved (no fsync: see the module docstring)."""
        if self.acked == self._cursor_saved:
            return
        tmp = fsio.temp_name(self.dir, CURSOR)
        tmp.write_text(f"{self.acked[0]} {self.acked[1]}\n")
        os.replace(tmp, self.dir / CURSOR)
        self._cursor_saved = self.acked

    def _read_cursor(self) -> Position:
        try:
            seg, off = (self.dir / CURSOR).read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return (min(self.sizes, default=1), 0)

    def close(self) -> None:
        if self.write_seg in self.sizes and self.acked == (self.write_seg, self.sizes[self.write_seg]):
            self._remove(self.write_seg)   # all acknowledged: leave nothing to read at the next start
            self.acked = self.sent = (self.write_seg, 0)
        self.save_cursor()
        self._close_writer()
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None

    # ---- bound
    def _enforce_bound(self) -> None:
        while sum(self.sizes.values()) > self.max_bytes and len(self.sizes) > 1:
            oldest = min(self.sizes)
            start = self.acked[1] if self.acked[0] == oldest else 0
            lines = self._lines(oldest, start)
            times = [t for t in (_time_of(x) for x in lines) if t]
            self.dropped += len(lines)
            self.pending = max(0, self.pending - len(lines))
            log.warning("telemetry buffer over max_buffer_bytes (%d): dropped the %d oldest unpublished reading(s)%s",
                        self.max_bytes, len(lines), f", {times[0]} to {times[-1]}" if times else "")
            for key in [k for k in self.inflight if k[0] == oldest]:
                del self.inflight[key]
            self._remove(oldest)
            if self.sent[0] <= oldest:
                self.sent = (min(self.sizes), 0)
            self._advance()

    # ---- files
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:010d}{SUFFIX}"

    def _open_reader(self, seg: int):
        if self._reader is None or self._reader[0] != seg:
            if self._reader is not None:
                self._reader[1].close()
            self._reader = (seg, open(self._path(seg), "rb"))
        return self._reader[1]

    def _remove(self, seg: int) -> None:
        if self._reader is not None and self._reader[0] == seg:
            self._reader[1].close()
            self._reader = None
        if seg == self.write_seg:
            self._close_writer()
            self.write_seg += 1
        self._path(seg).unlink(missing_ok=True)
        self.sizes.pop(seg, None)

    def _close_writer(self) -> None:
        if self._fd is not None:
            if self._unsynced:
                os.fdatasync(self._fd)   # a rolled segment must not lose its tail to a later power cut
                self._unsynced = False
            os.close(self._fd)
            self._fd = None

    def _lines(self, seg: int, start: int) -> list[bytes]:
        try:
            with open(self._path(seg), "rb") as f:
                f.seek(start)
                return [x for x in f.read().split(b"\n") if x]
        except OSError:
            return []

    def _count_from(self, pos: Position) -> int:
        return sum(len(self._lines(n, pos[1] if n == pos[0] else 0)) for n in sorted(self.sizes) if n >= pos[0])


def _time_of(line: bytes) -> str:
    try:
        return clock.utc_iso(_utc(json.loads(line)["time"]))
    except (ValueError, KeyError, TypeError):
        return ""


def _utc(t: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(float(t), timezone.utc)
