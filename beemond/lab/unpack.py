"""One ingest worker: read, verify and unpack bundles into the data tree, in durable batches.

Per bundle (:meth:`IngestWorker.one`): read it once (:func:`beemond.bundle.format.read_bundle`: the same
bytes feed the signature's SHA-512 and age's decryption, members are unpacked into a private work
directory within :class:`~beemond.bundle.format.Limits`, and nothing is published before the signature
verified over exactly those bytes and every member matched the manifest); check that the manifest's
host is the trusted device's name; skip it if the ledger already lists its SHA-512; move its records
into ``DATA_DIR/<host>/<date>/<sensor>/`` with ``NAME.meta.json``, and merge their rows and gaps into
the day's tables (:mod:`beemond.lab.tables`). A bundle failing a check is moved with its signature to
``DATA_DIR/rejected/`` beside ``NAME.reason``.

Per batch (:meth:`IngestWorker.flush`, every :data:`FLUSH_BUNDLES` bundles or :data:`FLUSH_S` seconds):
the tables are written under temporary names, one ``sync()`` makes the batch durable, they are renamed
over their predecessors and synced again, and only then does the ledger commit the batch.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from beemond.bundle import crypto, format as bundle_format
from beemond.core.clock import utc_iso
from beemond.errors import FormatError
from beemond.lab.ledger import COMMIT_BUNDLES, LEDGER, REJECTED, Candidate, Ledger, Report
from beemond.lab.tables import GAPS, DailyTables, date_of, push, stage_file
from beemond.core.names import HOST_RE, NAME_RE
from beemond.core.fsio import atomic_writer
from beemond.spool import sidecar_of

log = logging.getLogger("beemond.lab.ingest")

FLUSH_BUNDLES = 2000        # bundles between durable batches: bounds memory and the work a crash repeats
FLUSH_S = 30.0              # ... or seconds


class Rejected(FormatError):
    """A bundle that fails a check. ``reason``: ``unsigned``, ``malformed``, ``untrusted``, ``truncated``,
    ``mismatch`` (signature); ``undecryptable``; ``manifest`` (hashes, members, signing key); ``oversize``
    (over a limit, or more than the bundle can hold); ``unsafe`` (a member name or type, or a host or
    sensor name unfit for a path); ``csv`` (a CSV record that is not UTF-8 CSV); ``host`` (the manifest's host is not the signing device's name)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Options:
    """What a run writes besides the CSVs: ``parquet`` mirror, ``push`` URL (InfluxDB ``/write``),
    ``limits`` on each bundle, ``licence`` named in the data tree's README."""

    parquet: bool = False
    push: str | None = None
    limits: bundle_format.Limits = bundle_format.DEFAULT_LIMITS
    licence: str = ""


class IngestWorker:
    """Ingests a list of :class:`Candidate` (one partition) into *out*; one per process."""

    def __init__(self, out: Path, identities, trusted: dict, names: dict[str, str], options: Options,
                 print=print, progress=None):
        self.out, self.identities, self.trusted, self.names, self.opt = out, identities, trusted, names, options
        self.print, self.progress = print, progress or (lambda files, nbytes: None)
        self.ledger = Ledger(out / LEDGER)
        self.report = Report()
        self.tables = DailyTables(out, options, self.report)
        self.pending_bundles: list[tuple] = []
        self.pending_files: list[tuple] = []
        self.digests: set[str] = set()
        self.touched: set[Path] = set()

    def run(self, items: list[Candidate]) -> Report:
        last = time.monotonic()
        n = 0
        try:
            for c in items:
                self.one(c)
                self.progress(1, c.size)
                n += 1
                if n >= FLUSH_BUNDLES or time.monotonic() - last > FLUSH_S:
                    self.flush()
                    n, last = 0, time.monotonic()
            self.flush()
        finally:
            self.ledger.close()
        return self.report

    def one(self, c: Candidate) -> None:
        bundle = Path(c.path)
        try:
            n = self._ingest(bundle, c)
        except Rejected as e:
            self._reject(bundle, c, e.reason, str(e))
            return
        except OSError as e:  # an unreadable bundle or a full lab disk: not the device's fault; next run
            self.print(f"error {bundle.name}: {e.strerror or e}; left in place")
            self.report.rejected.append((bundle.name, "unreadable", str(e)))
            return
        if n is None:
            self.report.skipped.append(bundle.name)
            self.print(f"skip {bundle.name}: already ingested (same content under another name)")
        else:
            self.report.ingested.append(bundle.name)
            self.report.records += n
        self.report.bytes += c.size

    def _ingest(self, bundle: Path, c: Candidate) -> int | None:
        work = Path(tempfile.mkdtemp(prefix=".ingest-", dir=self.out))
        try:
            try:
                got = bundle_format.read_bundle(bundle, self.identities, work, self.trusted, self.opt.limits)
            except crypto.SignatureError as e:
                raise Rejected(e.reason, str(e)) from None
            except crypto.DecryptError as e:
                raise Rejected("undecryptable", f"cannot decrypt (no identity matches, or damaged): {e}") from None
            except bundle_format.BundleError as e:
                raise Rejected(e.reason, f"the contents do not match the manifest: {e}" if e.reason == "manifest"
                               else str(e)) from None
            manifest, fp = got.manifest, got.signer
            host = manifest["host"]
            if not HOST_RE.match(host):
                raise Rejected("unsafe", f"host {host!r} is not a valid host name")
            if self.names.get(fp) != host:
                raise Rejected("host", f"the manifest says host {host!r} but the bundle is signed by "
                                       f"{self.names.get(fp)!r}'s key ({fp})")
            file_row = (str(bundle.parent), bundle.name, c.size, c.mtime_ns, c.sig, "ingested")
            if got.digest in self.digests or self.ledger.has_bundle(got.digest):
                self.pending_files.append(file_row)
                return None
            moves = []
            for rec in manifest["records"]:
                sensor = str(rec.get("sensor", ""))
                if not NAME_RE.match(sensor) or not rec["path"].startswith(sensor + "/"):
                    raise Rejected("unsafe", f"record {rec['path']!r} has an invalid sensor {sensor!r}")
                date = date_of(rec.get("start", "")) or date_of(manifest.get("start", "")) or "unknown-date"
                if rec["path"][len(sensor) + 1:] in (f"{host}@{date}.csv", GAPS):
                    # moved into place, it would replace the day's merged readings or gaps
                    raise Rejected("unsafe", f"record {rec['path']!r} is named like the lab's own {host}@{date}.csv "
                                             f"or {GAPS}")
                moves.append((rec, date, sensor, rec["path"][len(sensor) + 1:]))
                in_the_way = _in_the_way(self.out / host / date / sensor / moves[-1][3], self.out / host)
                if in_the_way is not None:
                    raise Rejected("unsafe", f"record {rec['path']!r} cannot go where {in_the_way} is")
            # Read before anything is published: a CSV that cannot be read rejects the whole bundle.
            tables = {rec["path"]: _read_csv(work / rec["path"]) for rec, *_ in moves
                      if Path(rec["path"]).suffix.lower() == ".csv"}
            for rec, date, sensor, rel in moves:
                dest = _free_name(self.out / host / date / sensor / rel, rec["sha256"])
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(work / rec["path"], dest)
                self.touched.add(dest)
                meta = {**rec, "bundle": manifest.get("name", bundle.name), "signing_key": fp}
                _replace(sidecar_of(dest), json.dumps(meta, indent=1, sort_keys=True).encode())
                self.tables.gap_from_metadata(host, sensor, date, rec)
                if rec["path"] in tables:
                    self.tables.merge_rows(host, sensor, date, tables[rec["path"]])
            self.digests.add(got.digest)
            self.pending_bundles.append((got.digest, bundle.name, host, len(moves), fp,
                                         utc_iso(datetime.now(timezone.utc))))
            self.pending_files.append(file_row)
            self.print(f"ok {bundle.name}: {len(moves)} record(s), signed by {got.label} ({fp})")
            return len(moves)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def flush(self) -> None:
        """Write the pending days' CSVs, gaps and mirrors, make every new file durable, then commit the
        batch to the ledger, then push its new readings.

        A day's CSV and gaps.csv also hold what earlier, committed batches merged, which no rerun would
        redo: each replaces its predecessor only once its own data is on the disk (written under a
        temporary name, ``sync()``, renamed, ``sync()`` again before the ledger commit)."""
        staged, mirrors, kept = self.tables.stage()
        if self.touched or staged:
            # One sync() for the batch instead of an fsync per file: thousands of small files per run,
            # and the ledger below must not claim a bundle whose files are still in the page cache.
            os.sync()
            self.touched.clear()
        for tmp, path in staged:
            os.replace(tmp, path)
        for mirror in mirrors:
            self.touched.add(self.tables.parquet(*mirror))
        if staged or mirrors:
            os.sync()
        b, f = self.pending_bundles, self.pending_files
        for i in range(0, max(len(b), len(f)), COMMIT_BUNDLES):
            self.ledger.commit(b[i:i + COMMIT_BUNDLES], f[i:i + COMMIT_BUNDLES])
        self.pending_bundles, self.pending_files = [], []
        if kept is not None:
            self.report.pushed += push(self.opt.push, kept.parent, self.report, files=[kept])

    def _reject(self, bundle: Path, c: Candidate, reason: str, message: str) -> None:
        self.report.rejected.append((bundle.name, reason, message))
        self.print(f"rejected {bundle.name}: {message}")
        log.warning("rejected %s (%s): %s", bundle, reason, message)
        dest_dir = self.out / REJECTED
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / bundle.name
        n = 0
        while dest.exists():
            n += 1
            dest = dest_dir / f"{bundle.name}.{n}"
        sig = bundle.with_name(bundle.name + crypto.SIG_SUFFIX)
        with atomic_writer(dest.with_name(dest.name + ".reason"), "w") as f:
            f.write(f"reason: {reason}\n{message}\nfrom: {bundle}\nat: {utc_iso(datetime.now(timezone.utc))}\n")
        # The bundle before its signature: a crash between leaves a stray .sig (never scanned), not a
        # bundle that the next run would call unsigned.
        try:
            _move_aside(bundle, dest)
        except OSError as e:  # an upload tree the lab's user may only read (the FTP server's): report, go on
            self.print(f"  {bundle.name} left in place (cannot move it aside: {e.strerror or e}); "
                       f"reason in {dest.name}.reason")
            log.warning("cannot move rejected %s to %s: %s", bundle, dest_dir, e)
            # remembered, so the next run reports it from the ledger instead of reading it again
            self.pending_files.append((str(bundle.parent), bundle.name, c.size, c.mtime_ns, c.sig, reason))
            return
        try:
            if sig.exists():
                _move_aside(sig, dest.with_name(dest.name + crypto.SIG_SUFFIX))
        except OSError as e:
            log.warning("cannot move the signature of rejected %s: %s", bundle, e)


def _move_aside(src: Path, dest: Path) -> None:
    """Rename *src* to *dest*; across file systems a durable copy, then the unlink. Raises ``OSError``
    and then leaves *src* as it was and no copy behind (never two of one bundle)."""
    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    with open(src, "rb") as f, atomic_writer(dest, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    try:
        os.unlink(src)
    except OSError:
        dest.unlink(missing_ok=True)
        raise


def _replace(path: Path, data: bytes) -> None:
    """Temp name, then rename: a reader never sees half a file; durability comes from flush's sync()."""
    os.replace(stage_file(path, data), path)


def _in_the_way(dest: Path, top: Path) -> Path | None:
    """What keeps a record from *dest*: a directory there, or a file where one of its folders below
    *top* would be (an earlier record ``s/a`` for ``s/a/b``). None when nothing does."""
    if dest.is_dir():
        return dest
    for folder in dest.parents:
        if folder == top:
            return None
        if folder.exists() and not folder.is_dir():
            return folder
    return None


def _free_name(dest: Path, sha256: str) -> Path:
    """Where a record of SHA-256 *sha256* (hex) goes: *dest*, unless that holds another record (a name
    the device used again after its clock stepped back), then ``NAME~<sha256[:12]>.EXT`` beside it.
    Only a name that is taken costs a read of the file there."""
    for candidate in (dest, dest.with_name(f"{dest.stem}~{sha256[:12]}{dest.suffix}")):
        if not candidate.exists() or _sha256_of(candidate) == sha256:
            return candidate
    return candidate  # the same 48 bits of two different records: overwrite the alternate, not the first


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_csv(path: Path) -> list[list[str]]:
    """The rows of a CSV record. Raises :class:`Rejected` (``csv``) for one that is not UTF-8 CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise Rejected("csv", f"{path.name} is not a UTF-8 CSV: {str(e)[:80]}") from None
