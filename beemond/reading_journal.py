"""The reading journal: every reading durable within about a second of being taken.

A polled sensor batches a ``record_window_s`` of readings into one record; until that record is
written they would live only in memory (a power cut lost up to ten minutes). So each reading is also
appended to an append-only journal, ``state/<sensor>/readings.journal`` (:meth:`beemond.spool.Spool.journal_path`), one JSON
line per reading, and ``fdatasync``'ed at most ``journal_sync_s`` after it was appended (a reading
that comes after a quiet spell is synced at once; readings that come faster are synced as a group,
at most one sync per ``journal_sync_s``).

File format (UTF-8 JSON lines)::

    {"journal": 1, "last_reading": ISO|null, "replay": {...}|null}      header (written atomically)
    {"t": ISO, "v": [values], "g": tag, "u": 0|1, "e": N, "m": N, "r": {...}}   one per reading

``t`` is the reading's UTC time, ``v`` its values (``null`` for a missing one), ``g`` the driver's
per-reading provenance (the replayed row), ``u`` 1 when the clock was not synchronised, ``e``/``m``
the worker's error and missed counts so far, ``r`` the replay position after the reading. The header
says when the last reading already in a record was taken, and where the replay stood then.

When the record is written the journal is replaced (temporary name, fsync, rename, directory fsync)
by a header alone (if that fails, a header is appended instead: a header line means every reading
before it is in a record). After a crash the next start reads the journal (a torn or unsynced tail line is
skipped), writes its readings as a record (:meth:`beemond.sensors.base.PolledSensorWorker.fold_journal`)
and only then replaces it: a crash while folding folds again under the same idempotent name.

The names of the journal, the state file and the audio worker's open segment belong to
:mod:`beemond.spool`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from beemond.core import clock, fsio

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


# ------------------------------------------------------------------------------------------ journal

@dataclass
class Recovered:
    """What a journal held at start-up."""

    existed: bool = False                 # a previous run left a journal (a header at least)
    last_reading: str | None = None       # ISO time of the last reading already in a record
    replay: dict | None = None            # replay position in the header
    entries: list[dict] = field(default_factory=list)
    skipped_lines: int = 0                # torn or unreadable lines (a cut during a write)


class ReadingJournal:
    """The append-only journal of one sensor. Raises ``OSError`` from the file system."""

    def __init__(self, path: Path, sync_s: float = 1.0):
        self.path = Path(path)
        self.sync_s = sync_s
        self.fd: int | None = None
        self.pending_since: float | None = None   # monotonic time of the oldest unsynced append
        self.last_sync = float("-inf")
        self.bytes_written = 0
        self.syncs = 0
        self.new_entry = False   # the file was created and its directory not yet synced

    def recover(self) -> Recovered:
        """Read what a previous run left (nothing is changed)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Recovered()
        except OSError as e:   # a broken staging directory: record on, the write errors will tell
            log.warning("cannot read the reading journal %s: %s", self.path, e)
            return Recovered()
        rec = Recovered(existed=True)
        torn = False
        for line in data.split(b"\n"):
            if not line.strip(b"\x00 \r\t"):
                continue
            if torn:
                # Only the prefix before the first bad line is known durable: after a power cut the
                # page cache may have reached the disk out of order, so a later line can survive an
                # earlier, lost one. Later lines were not synced either (syncs are in order): drop
                # them, and the replay serves their rows again.
                rec.skipped_lines += 1
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                rec.skipped_lines += 1   # a torn line (or zeros an unsynced extent left behind)
                torn = True
                continue
            if "journal" in obj:
                # A header after readings: they are in a record (a reset that failed appended it).
                rec.last_reading, rec.replay = obj.get("last_reading"), obj.get("replay")
                rec.entries.clear()
            elif "t" in obj and "v" in obj:
                rec.entries.append(obj)
            else:
                rec.skipped_lines += 1
        return rec

    def reset(self, last_reading: str | None, replay: dict | None) -> None:
        """Replace the journal by a header alone, durably (its readings are in a record now)."""
        self.close()
        header = _header(last_reading, replay)
        with fsio.atomic_writer(self.path) as f:
            f.write(header)
        self.bytes_written += len(header)
        self.syncs += 2   # the file and its directory
        self.pending_since = None

    def mark_recorded(self, last_reading: str | None, replay: dict | None) -> None:
        """Append a header, synced at once: when :meth:`reset` failed (a full disk has no block for a new
        file, but often room in the journal's last one), the readings before it are known recorded
        and a later fold skips them instead of recording them again under a wider name."""
        header = _header(last_reading, replay)
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.write(self.fd, header)
        os.fdatasync(self.fd)
        self.bytes_written += len(header)
        self.syncs += 1
        self.last_sync = time.monotonic()
        self.pending_since = None

    def append(self, entry: dict) -> None:
        """Append one reading; synced now if the last sync is ``sync_s`` old, else by :meth:`due`."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:   # a first run: the journal starts with a header, and its name needs a directory sync
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                line = _header(None, None) + line
                self.new_entry = True
            except FileExistsError:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.write(self.fd, line)
        self.bytes_written += len(line)
        now = time.monotonic()
        if self.pending_since is None:
            self.pending_since = now
        if now - self.last_sync >= self.sync_s:
            self.sync()

    def due(self) -> float | None:
        """Monotonic time by which the unsynced readings must be synced (None: nothing pending)."""
        return None if self.pending_since is None else self.pending_since + self.sync_s

    def sync_if_due(self, now: float | None = None) -> None:
        due = self.due()
        if due is not None and (now if now is not None else time.monotonic()) >= due:
            self.sync()

    def sync(self) -> None:
        if self.fd is None or self.pending_since is None:
            return
        os.fdatasync(self.fd)
        self.syncs += 1
        if self.new_entry:
            fsio.fsync_dir(self.path.parent)
            self.syncs += 1
            self.new_entry = False
        self.last_sync = time.monotonic()
        self.pending_since = None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _header(last_reading: str | None, replay: dict | None) -> bytes:
    return json.dumps({"journal": JOURNAL_VERSION, "last_reading": last_reading, "replay": replay},
                      sort_keys=True, separators=(",", ":")).encode() + b"\n"


def entry(stamp, values, tag, unsynchronized: bool, errors: int, missed: int, replay: dict | None) -> dict:
    """One journal line for a reading taken at UTC *stamp* (see the module docstring)."""
    out = {"t": clock.utc_iso(stamp), "v": list(values), "u": int(unsynchronized), "e": errors, "m": missed}
    if tag is not None:
        out["g"] = tag
    if replay is not None:
        out["r"] = replay
    return out


def gap_metadata(last_reading: str | None, first_new) -> dict:
    """``after_restart`` and ``gap_s`` (seconds from the last durable reading before this run to *first_new*,
    a UTC datetime) for the first record of a run that follows an earlier one; ``{}`` for a first run."""
    if last_reading is None:
        return {"after_restart": True}
    gap = (first_new - clock.parse_iso(last_reading)).total_seconds()
    return {"after_restart": True, "gap_s": round(max(0.0, gap), 3)}


def write_state(path: Path, state: dict) -> None:
    """Durably replace a sensor's state file (:meth:`beemond.spool.Spool.state_file`)."""
    with fsio.atomic_writer(path) as f:
        f.write(json.dumps(state, sort_keys=True).encode())


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("unreadable state file %s (%s); ignoring it", path, e)
        return None
