"""Lab side: turn an upload tree of signed, encrypted bundles into a tidy data tree, at fleet scale.

For every ``*.tar.age`` under the upload tree (``.part`` files and hidden names are skipped):

1. skip it if the ledger knows this path with the same size, modification time and ``.sig`` (its
   SHA-256): a run over a tree where nothing is new costs a directory walk, a ``stat``, one small read
   of each ``.sig`` and one ledger look-up per directory, never a re-hash of a bundle;
2. read it once (:func:`beemond.bundle.format.read_bundle`): the same bytes feed the signature's SHA-512
   and age's decryption, members are unpacked into a private work directory within
   :class:`~beemond.bundle.format.Limits`, and nothing is published before the signature verified over
   exactly those bytes and every member matched the manifest;
3. check that the manifest's host is the trusted device's name: the stem of its key file in the
   trusted-devices directory (``hive-07.pub`` signs for host ``hive-07`` only);
4. skip it if the ledger already lists its SHA-512 (the same bundle under another path);
5. move its records into ``DATA_DIR/<host>/<date>/<sensor>/`` (``date``: the record's start, UTC), each
   with ``NAME.meta.json`` (its manifest entry, the bundle's name and the signer's fingerprint);
6. merge the rows of CSV records into one CSV per host, sensor and day,
   ``DATA_DIR/<host>/<date>/<sensor>/<host>@<date>.csv``: rows go to the day of their own time column,
   sorted by time, no duplicate rows; a column added later joins the header (empty before);
7. list the day's gaps in ``DATA_DIR/<host>/<date>/<sensor>/gaps.csv``: from the records' metadata
   (``gap_s``, ``after_restart``, written by the device) and from holes in the readings' times longer
   than :data:`~beemond.lab.tables.HOLE_FACTOR` sampling intervals (the median step of that day);
8. optionally mirror each touched day as Parquet (``--parquet``, DuckDB, ``beemond[lab]``) under
   ``DATA_DIR/parquet/host=H/sensor=S/date=D/data.parquet``, and push its new readings with their
   device timestamps as InfluxDB line protocol (``--push URL``).

A bundle failing any check is moved with its signature to ``DATA_DIR/rejected/`` beside
``NAME.reason`` (the check and the sentence), and the run continues. One that cannot be moved (an upload
tree the lab's user may only read) stays where it is, its ``NAME.reason`` written all the same, and is
reported again by every run (from the ledger: it is not read again until it changes).

Idempotent and crash-safe: records are renamed into place, each day's CSV is rewritten under a temporary
name, a ``sync()`` makes the batch durable, the CSVs are renamed over their predecessors and synced again,
and only then does the ledger
(``DATA_DIR/ledger.sqlite``, SQLite in WAL mode; an ``ingested.json`` from older versions is migrated once)
commit the batch. A crash before the commit makes the next run redo those bundles, which rewrites the
same files and adds no row (merging is a set union). Bundles in the upload tree are never deleted. One
run at a time per data tree: a second one finds ``DATA_DIR/.ingest.lock`` held and stops (:class:`Busy`).

Parallel (``jobs`` > 1): bundles are split by signing key (so by host) over worker processes, so one
host's daily CSVs are only ever written by one process; each worker commits its own batches to the
shared ledger (SQLite serialises the commits).

This module is the run (lock, scan, partition, processes, progress bar); :mod:`beemond.lab.ledger`
(the ledger, the scan, the report), :mod:`beemond.lab.unpack` (one worker: verify, unpack, reject,
flush), :mod:`beemond.lab.tables` (daily CSVs, gaps, Parquet, push) and :mod:`beemond.lab.readme` do
the rest. The lab imports :mod:`beemond.bundle` and neutral modules (names, clock, spool), never a
device-side worker.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from beemond.bundle import crypto
from beemond.errors import BusyError
from beemond.lab.ledger import LEDGER, OLD_LEDGER, Candidate, Ledger, Report, scan
from beemond.lab.readme import write_readme
from beemond.lab.tables import PUSH_PENDING, push
from beemond.lab.unpack import IngestWorker, Options
from beemond.core.fsio import remove_stale_temps

log = logging.getLogger(__name__)

LOCK = ".ingest.lock"
DIRTY = ".ingest.running"   # present while a run works: a crash leaves it, and the next run sweeps temps


class Busy(BusyError, RuntimeError):
    """Another ingest holds the data directory's lock (``DATA_DIR/.ingest.lock``)."""


def device_names(trusted_dir: Path) -> dict[str, str]:
    """{fingerprint: device name}: the stem of the ``*.pub`` file that holds the key (a single file:
    its keys' comments). Raises ``ValueError`` (:func:`crypto.load_trusted_keys`)."""
    trusted_dir = Path(trusted_dir)
    if not trusted_dir.is_dir():
        return {fp: label for fp, (_k, label) in crypto.load_trusted_keys(trusted_dir).items()}
    names: dict[str, str] = {}
    for f in sorted(trusted_dir.glob("*.pub")):
        for fp in crypto.load_trusted_keys(f):
            names[fp] = f.stem
    return names


def run(upload_tree, identity_file, trusted_dir, out, print=print, jobs: int = 1, options: Options | None = None,
        progress: bool | None = None) -> Report:
    """Ingest *upload_tree* into *out* with *jobs* processes. *progress*: draw a progress bar on stderr
    (default: when stderr is a terminal). Raises :class:`Busy`, ``crypto.IdentityError``, ``ValueError``
    (trusted keys), ``OSError``."""
    options = options or Options()
    identities = crypto.load_identities(identity_file)
    trusted = crypto.load_trusted_keys(trusted_dir)
    names = device_names(Path(trusted_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lock = open(out / LOCK, "a")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another beemond ingest is running on {out} (it holds {out / LOCK})") from None
        for stale in out.glob(".ingest-*"):  # a crashed run's work directories
            shutil.rmtree(stale, ignore_errors=True)
        if (out / DIRTY).exists():  # only after a crash: the data tree can hold millions of files
            remove_stale_temps(out)
        (out / DIRTY).touch()
        ledger = Ledger(out / LEDGER)
        try:
            migrated = ledger.migrate(out / OLD_LEDGER)
            if migrated:
                print(f"ledger: migrated {migrated} entries from {OLD_LEDGER}")
            report = Report()
            items = scan(Path(upload_tree), out, ledger, report, print)
        finally:
            ledger.close()
        bar = Progress(len(items), sum(c.size for c in items),
                       sys.stderr.isatty() if progress is None else progress)
        if jobs <= 1 or len(items) < 2:
            w = IngestWorker(out, identities, trusted, names, options, print, bar.add)
            report.merge(w.run(items))
        else:
            report.merge(_run_parallel(items, jobs, out, identity_file, trusted_dir, names, options, print, bar))
        bar.close()
        if options.push:  # what an earlier run (or a worker above) could not send
            report.pushed += push(options.push, out / PUSH_PENDING, report)
        write_readme(out, options.licence)
        (out / DIRTY).unlink(missing_ok=True)
    finally:
        lock.close()  # releases the flock
    log.info("ingest took %.2f s", time.monotonic() - t0)
    return report


def partition(items: list[Candidate], jobs: int, names: dict[str, str] | None = None) -> list[list[Candidate]]:
    """Split *items* into at most *jobs* lists, all of one host in one list (the device name of the
    signer in *names*, {fingerprint: name}: a host whose key was replaced has two), balanced by bytes
    (largest group first onto the lightest list)."""
    names = names or {}
    groups: dict[str, list[Candidate]] = {}
    for c in items:
        groups.setdefault(names.get(c.key, c.key), []).append(c)
    parts: list[list[Candidate]] = [[] for _ in range(jobs)]
    load = [0] * jobs
    for g in sorted(groups.values(), key=lambda g: -sum(c.size for c in g)):
        i = load.index(min(load))
        parts[i] += g
        load[i] += sum(c.size for c in g)
    return [p for p in parts if p]


def _job(index, items, out, identity_file, trusted_dir, names, options, q) -> None:
    def emit_line(text):
        q.put((index, "line", text))

    def emit_progress(files, nbytes):
        q.put((index, "progress", (files, nbytes)))

    try:
        w = IngestWorker(Path(out), crypto.load_identities(identity_file), crypto.load_trusted_keys(trusted_dir), names,
                   options, emit_line, emit_progress)
        q.put((index, "done", w.run(items)))
    except BaseException as e:  # reported by the parent as this job's failure
        q.put((index, "failed", f"{type(e).__name__}: {e}"))


def _run_parallel(items, jobs, out, identity_file, trusted_dir, names, options, print, bar) -> Report:
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("forkserver")  # no fork of a process that may hold threads
    q = ctx.Queue()
    parts = partition(items, jobs, names)
    procs = [ctx.Process(target=_job, args=(i, p, str(out), str(identity_file), str(trusted_dir), names, options, q),
                         name=f"ingest-{i}") for i, p in enumerate(parts)]
    for p in procs:
        p.start()
    report, finished, failures = Report(), set(), []
    while len(finished) < len(procs):
        try:
            index, kind, payload = q.get(timeout=1.0)
        except queue.Empty:
            # A job killed from outside (OOM killer, SIGKILL) sends nothing more: do not wait for it forever.
            for i, p in enumerate(procs):
                if i not in finished and p.exitcode is not None and q.empty():
                    finished.add(i)
                    failures.append(f"{p.name} ended with exit status {p.exitcode} before it reported")
            continue
        if kind == "line":
            print(payload)
        elif kind == "progress":
            bar.add(*payload)
        elif kind == "done":
            report.merge(payload)
            finished.add(index)
        else:
            failures.append(payload)
            finished.add(index)
    for p in procs:
        p.join()
    if failures:
        # What the other jobs did is committed; the failed job's bundles are redone by the next run.
        raise OSError(errno.EIO, f"{len(failures)} ingest job(s) failed: {failures[0]}")
    return report


class Progress:
    """A one-line progress bar on stderr (files, bytes, rate, ETA), redrawn at most 5 times a second;
    silent when *enabled* is false (under cron stderr is no terminal)."""

    def __init__(self, files: int, nbytes: int, enabled: bool):
        self.total_files, self.total_bytes, self.enabled = files, nbytes, enabled and files > 0
        self.files = self.bytes = 0
        self.t0 = self.drawn = time.monotonic()

    def add(self, files: int, nbytes: int) -> None:
        self.files += files
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.drawn > 0.2 or self.files == self.total_files):
            self.drawn = now
            sys.stderr.write("\r" + self.line(now) + "\033[K")
            sys.stderr.flush()

    def line(self, now: float) -> str:
        dt = max(now - self.t0, 1e-6)
        rate = self.files / dt
        eta = (self.total_files - self.files) / rate if rate > 0 else float("inf")
        width = 24
        done = int(width * self.files / self.total_files) if self.total_files else width
        eta_s = f"{eta:.0f} s" if math.isfinite(eta) else "?"
        return (f"[{'#' * done}{'.' * (width - done)}] {self.files}/{self.total_files} files "
                f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB {rate:.0f} files/s ETA {eta_s}")

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
