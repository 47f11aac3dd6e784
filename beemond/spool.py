"""The spool: beemond's durable queue on disk, and the one module that names its parts.

Layout under ``[daemon] spool_dir`` (each directory has one writer role and one deleter role)::

    staging/<sensor>/NAME             a record (csv, flac, wav, json, npy, ...)    written by that sensor's (or
    staging/<sensor>/NAME.meta.json   its metadata sidecar, written after it       processor's) worker; deleted
                                                                                   by the aggregator once the
                                                                                   bundle holding it is durable
    staging/<sensor>/.segment-MS.EXT.open (+ .json)   the open audio segment (fsynced every second) and
                                      its header: the audio worker writes, renames and removes them
    state/<sensor>/                   per-sensor state that must survive a restart (the open record's reading
                                      journal with the replay position, the audio's state.json): written and
                                      deleted by that worker
    outbox/HOST_START_GROUP_DIGEST.tar.age (+ .sig)   sealed bundles: written by the aggregator, deleted by
                                      the uploader (after the server confirmed them, or by the spool limits)
    uploaded/NAME (+ .sig)            uploaded copies (``keep_uploaded_bytes``): the uploader, both ways
    quarantine/NAME (+ .sig)          bundles the server refused for good: written by the uploader, deleted
                                      by a human
    failed/<who>/NAME (+ sidecar)     records that could not be staged or read: written by whoever found
                                      them (a worker's record writer, the aggregator), deleted by a human
    processing/<processor>/NAME       hard links of records for a processor: written by the orchestrator's
                                      router, deleted by that processor
    telemetry/NNNNNNNNNN.jsonl, cursor  readings waiting for the MQTT broker's acknowledgement: the
                                      telemetry worker, both ways (beemond.telemetry.buffer)
    .lock, .workers.lock              the spool locks (:meth:`Spool.lock`, :meth:`Spool.hold_worker_lock`)

Every file is written to a hidden temporary name (``.NAME.tmp-PID``), fsynced, renamed and its
directory fsynced (:func:`atomic_writer`); readers skip hidden names (:func:`is_internal`) and a start
removes leftovers (:func:`remove_stale_temps`).

Import-light on purpose (stdlib only): the orchestrator and the forkserver import it, and a 512 MB Pi
shares those pages with every worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path
from beemond.core.fsio import atomic_writer, is_internal
from beemond.core.names import META_SUFFIX
from beemond.errors import BusyError

STAGING = "staging"
STATE = "state"
OUTBOX = "outbox"
UPLOADED = "uploaded"
QUARANTINE = "quarantine"
FAILED = "failed"
PROCESSING = "processing"
TELEMETRY = "telemetry"
LOCK = ".lock"
WORKERS_LOCK = ".workers.lock"
JOURNAL = "readings.journal"
STATE_FILE = "state.json"
OPEN_SEGMENT_SUFFIX = ".open"

SIG_SUFFIX = ".sig"
# HOST_START_GROUP_DIGEST.tar.age: START the first record's start (UTC, ISO 8601 basic), GROUP "all" or
# the sensor, DIGEST the first 12 hex digits of the SHA-256 of the member names (beemond.aggregator).
BUNDLE_RE = re.compile(r"^(?P<host>.+)_(?P<start>\d{8}T\d{6}Z)_(?P<group>[A-Za-z0-9_-]+)_(?P<digest>[0-9a-f]{12})\.tar\.age$")


class SpoolBusy(BusyError, OSError):
    """A spool lock is held by someone else. ``held`` names it (:data:`LOCK`: another daemon or
    ``beemond upload --backlog``; :data:`WORKERS_LOCK`: workers of an earlier daemon still running)."""

    def __init__(self, spool: Path, held: str):
        self.spool, self.held = spool, held
        super().__init__(f"spool {spool}: {held} is held")


class SpoolLock:
    """The spool locks this process holds; :meth:`release` (or process exit) lets them go."""

    def __init__(self, fds: list[int]):
        self.fds = fds

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Spool:
    """The spool at *root* (``cfg.spool``). Building one touches nothing on disk; the directory
    accessors return paths and never create them (a writer creates its own with ``mkdir``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # ---- directories
    @property
    def staging(self) -> Path:
        """``staging/``: one sub-directory per sensor or processor (:meth:`staging_dir`)."""
        return self.root / STAGING

    def staging_dir(self, sensor: str) -> Path:
        """``staging/<sensor>/``: that sensor's (or processor's) finished records and their sidecars."""
        return self.staging / sensor

    def state_dir(self, sensor: str) -> Path:
        """``state/<sensor>/``: what *sensor*'s worker keeps across restarts besides records (its reading
        journal, its replay position). Written and deleted by that worker only; never bundled."""
        return self.root / STATE / sensor

    def journal_path(self, sensor: str) -> Path:
        """The append-only journal of the readings of *sensor*'s open record (``state/<sensor>/readings.journal``)."""
        return self.state_dir(sensor) / JOURNAL

    def state_file(self, sensor: str) -> Path:
        """A small JSON state of a sensor without a journal (audio: ``last_end``), ``state/<sensor>/state.json``."""
        return self.state_dir(sensor) / STATE_FILE

    def open_segment(self, sensor: str, stamp: str, ext: str) -> Path:
        """The audio segment being recorded, ``staging/<sensor>/.segment-STAMP.EXT.open``: hidden (no
        reader takes it for a record), and without the temporary mark (a start's clean-up leaves it for
        the salvage). It is renamed into place in the same directory when it closes."""
        return self.staging_dir(sensor) / f".segment-{stamp}.{ext}{OPEN_SEGMENT_SUFFIX}"

    def open_segments(self, sensor: str) -> list[Path]:
        """Open segments of *sensor* (left by a crash, at a start)."""
        return sorted(self.staging_dir(sensor).glob(f".segment-*{OPEN_SEGMENT_SUFFIX}"))

    def open_segment_headers(self, sensor: str) -> list[Path]:
        return sorted(self.staging_dir(sensor).glob(f".segment-*{OPEN_SEGMENT_SUFFIX}.json"))

    @property
    def outbox(self) -> Path:
        """``outbox/``: sealed bundles and their signatures, waiting for upload."""
        return self.root / OUTBOX

    @property
    def uploaded(self) -> Path:
        """``uploaded/``: copies of uploaded bundles kept under ``upload.keep_uploaded_bytes``."""
        return self.root / UPLOADED

    @property
    def quarantine(self) -> Path:
        """``quarantine/``: bundles the server refused for good, for a human."""
        return self.root / QUARANTINE

    def failed_dir(self, who: str = "") -> Path:
        """``failed/<who>/`` (``failed/`` for an empty *who*): records set aside for a human."""
        return self.root / FAILED / who if who else self.root / FAILED

    @property
    def processing(self) -> Path:
        """``processing/``: one inbox per processor (:meth:`processing_dir`)."""
        return self.root / PROCESSING

    def processing_dir(self, processor: str) -> Path:
        """``processing/<processor>/``: hard links of the records *processor* has still to read."""
        return self.processing / processor

    @property
    def telemetry(self) -> Path:
        """``telemetry/``: the telemetry worker's queue of readings for the MQTT broker."""
        return self.root / TELEMETRY

    # ---- locks
    def lock(self, wait_workers_s: float = 0.0, hold_workers: bool = False) -> SpoolLock:
        """Take the spool for one daemon (or ``beemond upload --backlog``).

        :data:`LOCK` is taken exclusively without waiting. :data:`WORKERS_LOCK` is held shared by every
        worker (:meth:`hold_worker_lock`), so after an orchestrator crash a new one waits up to
        *wait_workers_s* s for the old workers to finish their records; with *hold_workers* it stays
        held (no worker of any daemon may run meanwhile), else it is released at once for our own
        workers. Raises :class:`SpoolBusy` naming the lock that is held, ``OSError`` otherwise.
        """
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(self.root, LOCK) from None
        wfd = os.open(self.root / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_workers_s
        while True:
            try:
                fcntl.flock(wfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(wfd)
                    os.close(fd)
                    raise SpoolBusy(self.root, WORKERS_LOCK) from None
                time.sleep(0.2)
        if hold_workers:
            return SpoolLock([fd, wfd])
        os.close(wfd)
        return SpoolLock([fd])

    def hold_worker_lock(self) -> int:
        """Take :data:`WORKERS_LOCK` shared for the life of this worker process (blocks while a
        ``beemond upload --backlog`` holds it). Returns the descriptor; never close it."""
        fd = os.open(self.root / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    # ---- bundles
    def bundles(self, directory: Path | None = None) -> list[Path]:
        """The bundles in *directory* (default: the outbox), oldest first: by the start in the name,
        then by the time each was sealed. Signatures, temporaries and strangers are left out; a
        bundle's signature is :func:`signature_of`. A missing directory has none."""
        directory = self.outbox if directory is None else directory
        try:
            names = [p for p in directory.iterdir() if BUNDLE_RE.match(p.name)]
        except FileNotFoundError:
            return []
        return sorted(names, key=_bundle_age)

    def orphan_signatures(self, directory: Path | None = None, older_than_s: float = 0.0) -> list[Path]:
        """Signatures in *directory* (default: the outbox) whose bundle is not beside them, last changed
        more than *older_than_s* s ago. The aggregator renames a signature in just before its bundle,
        so a young orphan may be a bundle on its way: only an old one is left by a power cut."""
        directory = self.outbox if directory is None else directory
        now, out = time.time(), []
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return []
        for sig in entries:
            name = sig.name[:-len(SIG_SUFFIX)]
            if sig.name.endswith(SIG_SUFFIX) and BUNDLE_RE.match(name) and not sig.with_name(name).exists():
                try:
                    if now - sig.stat().st_mtime > older_than_s:
                        out.append(sig)
                except FileNotFoundError:
                    pass
        return out

    # ---- usage
    def usage(self, which: str) -> tuple[int, int]:
        """(files, bytes) waiting in ``spool/<which>`` (:data:`STAGING` or :data:`OUTBOX`, ...), as
        :func:`dir_usage` counts them; in the outbox and uploaded copies only bundles count."""
        pattern = BUNDLE_RE if which in (OUTBOX, UPLOADED) else None
        return dir_usage(self.root / which, pattern)

    def allocated(self) -> int:
        """Bytes allocated on disk (blocks, not sizes) to staged records, the outbox and the uploaded
        copies: what ``daemon.spool_max_bytes`` limits. Quarantined and set-aside files are a human's
        to clear and are not counted; nor is ``state/`` (a few KB per sensor)."""
        used = 0
        for root in (self.staging, self.outbox, self.uploaded):
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
        return used

    def free_bytes(self) -> int:
        """Bytes free for an unprivileged writer on the spool's file system (``statvfs`` ``f_bavail``)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


def open_segment_header(segment: Path) -> Path:
    """The JSON header beside an open segment (:meth:`Spool.open_segment`): start, trigger, device."""
    return segment.with_name(segment.name + ".json")


def open_segment_format(segment: Path) -> str:
    """The audio format (``flac``, ``wav``) of an open segment, from its name."""
    return Path(segment.name[:-len(OPEN_SEGMENT_SUFFIX)]).suffix.lstrip(".").lower()


def open_segment_record_name(segment: Path) -> str:
    """The visible name an open segment keeps when it is set aside (``segment-STAMP.EXT``)."""
    return segment.name.lstrip(".")[:-len(OPEN_SEGMENT_SUFFIX)]


def signature_of(bundle: Path) -> Path:
    """The detached signature beside *bundle*: ``NAME.sig``."""
    return bundle.with_name(bundle.name + SIG_SUFFIX)


def bundle_filename(host: str, start: str, group: str, digest: str) -> str:
    """``HOST_START_GROUP_DIGEST.tar.age`` (*start* UTC ISO 8601 basic, *digest* 12 hex digits); it
    always matches :data:`BUNDLE_RE`. Raises ``ValueError`` for parts that would not."""
    name = f"{host}_{start}_{group}_{digest}.tar.age"
    if not BUNDLE_RE.match(name):
        raise ValueError(f"not a bundle name: {name!r}")
    return name


def _bundle_age(path: Path) -> tuple:
    try:
        sealed = path.stat().st_mtime_ns
    except FileNotFoundError:
        sealed = 0
    return BUNDLE_RE.match(path.name)["start"], sealed


def dir_usage(root: Path, pattern: re.Pattern | None = None) -> tuple[int, int]:
    """(files, bytes) under *root*: data files only (no sidecars, temps or hidden files) for the
    count, every visible file for the bytes; *pattern* limits both to matching names."""
    files = size = 0
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not is_internal(d)]
        for name in names:
            if is_internal(name) or (pattern is not None and not pattern.match(name)):
                continue
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue  # bundled or uploaded meanwhile
            if not name.endswith(META_SUFFIX):
                files += 1
    return files, size


# ------------------------------------------------------------------------------------------ staged records

def sidecar_of(record: Path) -> Path:
    """A record's metadata sidecar: ``NAME.meta.json`` beside it."""
    return record.with_name(record.name + META_SUFFIX)


def write_sidecar(record: Path, metadata: dict) -> None:
    meta = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    with atomic_writer(sidecar_of(record), sync_dir=True) as f:
        f.write(meta)


def write_record(staging: Path, relname: str, metadata: dict, data_writer=None, tmp: Path | None = None) -> Path:
    """Write one record durably: data file first, then its sidecar, then one directory fsync.

    Either *data_writer* is called with an open binary temporary file, or *tmp* names a temporary
    file already written in *staging* (a stream written over minutes), which is fsynced and renamed.
    Returns the data file's path. Raises ``OSError``; then no record is left under *relname* (a
    data file without its sidecar would never be bundled, and a retry would write it twice): *tmp*
    is renamed back for the caller to retry or remove, a written data file is removed.
    """
    final = staging / relname
    if tmp is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:
        with atomic_writer(final, sync_dir=False) as f:
            data_writer(f)
    try:
        write_sidecar(final, metadata)
    except BaseException:
        if tmp is not None:
            os.replace(final, tmp)
        else:
            final.unlink(missing_ok=True)
        raise
    return final


def unique_name(directory: Path, rel: str) -> str:
    """*rel*, or ``STEM-N.EXT`` with the first free N: never overwrite a staged record that has not been
    bundled yet (two records, one name)."""
    if not (directory / rel).exists():
        return rel
    stem, dot, ext = rel.rpartition(".") if "." in rel.rsplit("/", 1)[-1] else (rel, "", "")
    n = 1
    while (directory / f"{stem}-{n}{dot}{ext}").exists():
        n += 1
    return f"{stem}-{n}{dot}{ext}"


def link_record(spool: Path, processor: str, record: Path) -> Path:
    """Hard-link *record* and its sidecar into the processor's inbox (the orchestrator's router calls this).

    Returns the linked data path. Raises ``OSError``. The sidecar is linked first and the data last,
    so a data link in the inbox always has its metadata beside it.
    """
    inbox = Spool(spool).processing_dir(processor)
    inbox.mkdir(parents=True, exist_ok=True)
    name, n = record.name, 0
    while (inbox / name).exists() or sidecar_of(inbox / name).exists():
        n += 1
        name = f"{n}-{record.name}"
    dest = inbox / name
    os.link(sidecar_of(record), sidecar_of(dest))
    os.link(record, dest)
    return dest
