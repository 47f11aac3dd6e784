"""Lab side: turn an upload tree of signed, encrypted bundles into a tidy data tree.

For every ``*.tar.age`` under the upload tree (``.part`` files and hidden names are skipped):

1. verify its detached signature ``NAME.sig`` against the trusted device keys (:func:`crypto.verify_file`);
2. skip it if the ledger already lists its SHA-512 (the digest the signature covers);
3. decrypt it and check every member against the manifest (:func:`aggregator.extract_bundle`), and check
   that the manifest names the key that signed the bundle;
4. move its records into ``DATA_DIR/<host>/<date>/<sensor>/`` (``date``: the record's start, UTC), each
   with ``NAME.meta.json`` (its manifest entry, the bundle's name and the signer's fingerprint);
5. merge the rows of CSV records (batched readings) into one CSV per host, sensor and day,
   ``DATA_DIR/<host>/<date>/<sensor>/<host>@<date>.csv`` (AppMAIS style): rows go to the day of their own
   time column, sorted by time, no duplicate rows; a column added later joins the header (empty before).

A bundle failing any check is moved with its signature to ``DATA_DIR/rejected/`` beside
``NAME.reason`` (the check and the sentence), and the run continues. One that cannot be moved (an upload
tree the lab's user may only read) stays where it is, its ``NAME.reason`` written all the same, and is
reported again by every run.

Idempotent and crash-safe: records are renamed into place, each day's CSV is rewritten under a temporary
name and renamed, a ``sync()`` makes the batch durable, and only then is the ledger ``DATA_DIR/ingested.json`` ({SHA-512: {name, host, records,
signer, ingested}}) rewritten atomically. A crash before the ledger write makes the next run redo those
bundles, which rewrites the same files and adds no row (merging is a set union). Bundles in the upload
tree are never deleted. One run at a time per data tree: a second one finds ``DATA_DIR/.ingest.lock`` held
and stops (:class:`Busy`) before touching anything.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beemond import aggregator, archive, crypto
from beemond.config import HOST_RE, NAME_RE

log = logging.getLogger(__name__)

LEDGER = "ingested.json"
LOCK = ".ingest.lock"
REJECTED = "rejected"
FLUSH_EVERY = 200          # bundles between ledger writes: bounds memory and the work a crash repeats


class Busy(RuntimeError):
    """Another ingest holds the data directory's lock (``DATA_DIR/.ingest.lock``)."""


class Rejected(Exception):
    """A bundle that fails a check. ``reason``: ``unsigned``, ``malformed``, ``untrusted``, ``truncated``,
    ``mismatch`` (signature); ``undecryptable``; ``manifest`` (hashes, members); ``signer`` (the manifest
    names another key); ``unsafe`` (a host or sensor name unfit for a path)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Report:
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)    # (name, reason, message)
    records: int = 0
    rows: int = 0                                                         # new rows in daily CSVs


@dataclass
class _Day:
    header: list[str]
    rows: set[tuple[str, ...]] = field(default_factory=set)


class Ingest:
    """One run over *upload_tree*. :meth:`run` returns a :class:`Report`; ``print`` gets one line per bundle."""

    def __init__(self, upload_tree: Path, identities, trusted: dict, out: Path, print=print):
        self.tree, self.identities, self.trusted, self.out = Path(upload_tree), identities, trusted, Path(out)
        self.print = print
        self.out.mkdir(parents=True, exist_ok=True)
        # One run per data tree (a cron job overlapping a long first run): a second one would delete the
        # first's work directories below and race it on the daily CSVs and the ledger.
        self._lock = open(self.out / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise Busy(f"another beemond ingest is running on {self.out} (it holds {self.out / LOCK})") from None
        for stale in self.out.glob(".ingest-*"):  # a crashed run's work directories
            shutil.rmtree(stale, ignore_errors=True)
        archive.remove_stale_temps(self.out)
        self.ledger_path = self.out / LEDGER
        self.ledger: dict = json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}
        self.pending_days: dict[tuple[str, str, str], _Day] = {}
        self.pending_ledger: dict[str, dict] = {}
        self.touched: set[Path] = set()
        self.report = Report()

    def bundles(self) -> list[Path]:
        out = self.out.resolve()
        found = []
        for dirpath, dirs, files in os.walk(self.tree):
            here = Path(dirpath)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != out)
            found += [here / f for f in sorted(files) if f.endswith(".tar.age") and not f.startswith(".")]
        return found

    def run(self) -> Report:
        try:
            for i, bundle in enumerate(self.bundles(), 1):
                self.one(bundle)
                if i % FLUSH_EVERY == 0:
                    self.flush()
            self.flush()
        finally:
            self._lock.close()  # releases the flock
        return self.report

    def one(self, bundle: Path) -> None:
        try:
            try:
                fp, label, digest = crypto.verify_file(bundle, self.trusted)
            except crypto.SignatureError as e:
                raise Rejected(e.reason, str(e)) from None
            if digest in self.ledger or digest in self.pending_ledger:
                self.report.skipped.append(bundle.name)
                self.print(f"skip {bundle.name}: already ingested")
                return
            n = self._extract(bundle, fp, label, digest)
        except Rejected as e:
            self._reject(bundle, e.reason, str(e))
            return
        except OSError as e:  # an unreadable bundle: the lab's disk, not the device's fault; try again next run
            self.print(f"error {bundle.name}: {e.strerror or e}; left in place")
            self.report.rejected.append((bundle.name, "unreadable", str(e)))
            return
        self.report.ingested.append(bundle.name)
        self.report.records += n
        self.print(f"ok {bundle.name}: {n} record(s), signed by {label} ({fp})")

    def _extract(self, bundle: Path, fp: str, label: str, digest: str) -> int:
        work = Path(tempfile.mkdtemp(prefix=".ingest-", dir=self.out))
        try:
            try:
                manifest = aggregator.extract_bundle(bundle, self.identities, work)
            except crypto.DecryptError as e:
                raise Rejected("undecryptable", f"cannot decrypt (no identity matches, or damaged): {e}") from None
            except (aggregator.BundleError, tarfile.TarError, ValueError, KeyError, TypeError) as e:
                raise Rejected("manifest", f"the contents do not match the manifest: {e}") from None
            if manifest.get("signing_key") != fp:
                raise Rejected("signer", f"the manifest names signing key {manifest.get('signing_key')!r} "
                                         f"but the bundle is signed by {fp}")
            host = str(manifest.get("host", ""))
            if not HOST_RE.match(host):
                raise Rejected("unsafe", f"host {host!r} is not a valid host name")
            moves = []
            for rec in manifest["records"]:
                sensor = str(rec.get("sensor", ""))
                if not NAME_RE.match(sensor) or not rec["path"].startswith(sensor + "/"):
                    raise Rejected("unsafe", f"record {rec['path']!r} has an invalid sensor {sensor!r}")
                date = _date_of(rec.get("start", "")) or _date_of(manifest.get("start", "")) or "unknown-date"
                moves.append((rec, host, date, sensor, rec["path"][len(sensor) + 1:]))
            for rec, host, date, sensor, rel in moves:
                dest = self.out / host / date / sensor / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(work / rec["path"], dest)
                self.touched.add(dest)
                meta = {**rec, "bundle": manifest.get("name", bundle.name), "signing_key": fp}
                _replace(archive.sidecar_of(dest), json.dumps(meta, indent=1, sort_keys=True).encode())
                if dest.suffix.lower() == ".csv":
                    self._merge_rows(host, sensor, date, dest)
            self.pending_ledger[digest] = {"name": bundle.name, "host": host, "records": len(moves), "signer": fp,
                                           "ingested": archive.utc_iso(datetime.now(timezone.utc))}
            return len(moves)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _merge_rows(self, host: str, sensor: str, date: str, record: Path) -> None:
        with open(record, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        for row in body:
            if not any(row):
                continue  # a blank line is no reading
            day = _date_of(row[0])
            key = (host, sensor, day or date)
            cur = self.pending_days.get(key)
            if cur is None:
                cur = self.pending_days[key] = _Day(list(header))
            if header != cur.header:
                cur.header, cur.rows = _union(cur.header, cur.rows, header)
            pos = [cur.header.index(c) for c in header]
            full = [""] * len(cur.header)
            for p, v in zip(pos, row):
                full[p] = v
            cur.rows.add(tuple(full))

    def flush(self) -> None:
        """Write the pending days' CSVs, make every new file durable, then extend the ledger."""
        for (host, sensor, date), day in sorted(self.pending_days.items()):
            path = self.out / host / date / sensor / f"{host}@{date}.csv"
            header, rows, before = day.header, day.rows, 0
            if path.exists():
                with open(path, newline="", encoding="utf-8") as f:
                    old = list(csv.reader(f))
                if old:
                    before = len(old) - 1
                    header, rows = _union(old[0], {tuple(r) for r in old[1:]}, day.header, day.rows)
            self.report.rows += len(rows) - before
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(header)
            w.writerows(sorted(rows))
            _replace(path, buf.getvalue().encode())
            self.touched.add(path)
        self.pending_days.clear()
        if self.touched:
            # One sync() for the batch instead of an fsync per file: thousands of small files per run,
            # and the ledger below must not claim a bundle whose files are still in the page cache.
            os.sync()
            self.touched.clear()
        if self.pending_ledger:
            self.ledger.update(self.pending_ledger)
            self.pending_ledger.clear()
            with archive.atomic_writer(self.ledger_path, "w") as f:
                json.dump(self.ledger, f, indent=1, sort_keys=True)

    def _reject(self, bundle: Path, reason: str, message: str) -> None:
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
        with archive.atomic_writer(dest.with_name(dest.name + ".reason"), "w") as f:
            f.write(f"reason: {reason}\n{message}\nfrom: {bundle}\nat: {archive.utc_iso(datetime.now(timezone.utc))}\n")
        # The bundle before its signature: a crash between leaves a stray .sig (never scanned), not a
        # bundle that the next run would call unsigned.
        try:
            _move_aside(bundle, dest)
        except OSError as e:  # an upload tree the lab's user may only read (the FTP server's): report, go on
            self.print(f"  {bundle.name} left in place (cannot move it aside: {e.strerror or e}); "
                       f"reason in {dest.name}.reason")
            log.warning("cannot move rejected %s to %s: %s", bundle, dest_dir, e)
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
    with open(src, "rb") as f, archive.atomic_writer(dest, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    try:
        os.unlink(src)
    except OSError:
        dest.unlink(missing_ok=True)
        raise


def _replace(path: Path, data: bytes) -> None:
    """Temp name, then rename: a reader never sees half a file; durability comes from flush's sync()."""
    tmp = archive.temp_name(path.parent, path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _union(header: list[str], rows: set, other: list[str], other_rows: set = frozenset()):
    """Columns of *header* then the new ones of *other*; both row sets re-laid on that header."""
    cols = list(header) + [c for c in other if c not in header]

    def relay(h, rs):
        pos = [cols.index(c) for c in h]
        out = set()
        for r in rs:
            full = [""] * len(cols)
            for p, v in zip(pos, r):
                full[p] = v
            out.add(tuple(full))
        return out

    return cols, relay(header, rows) | relay(other, other_rows)


def _date_of(text: str) -> str | None:
    """``YYYY-MM-DD`` (UTC) of an ISO 8601 time, or None."""
    try:
        return archive.parse_iso(text).strftime("%Y-%m-%d")
    except (ValueError, TypeError):
        return None


def run(upload_tree, identity_file, trusted_dir, out, print=print) -> Report:
    """Load the identities and trusted keys and ingest (raises ``crypto.IdentityError``, ``ValueError``)."""
    identities = crypto.load_identities(identity_file)
    trusted = crypto.load_trusted_keys(trusted_dir)
    t0 = time.monotonic()
    report = Ingest(Path(upload_tree), identities, trusted, Path(out), print=print).run()
    log.info("ingest took %.2f s", time.monotonic() - t0)
    return report
