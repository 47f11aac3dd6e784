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
   than :data:`HOLE_FACTOR` sampling intervals (the median step of that day);
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
"""

from __future__ import annotations

import base64
import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beemond import archive
from beemond.bundle import crypto, format as bundle_format
from beemond.config import HOST_RE, NAME_RE

log = logging.getLogger(__name__)

LEDGER = "ledger.sqlite"
OLD_LEDGER = "ingested.json"
LOCK = ".ingest.lock"
DIRTY = ".ingest.running"   # present while a run works: a crash leaves it, and the next run sweeps temps
REJECTED = "rejected"
PARQUET = "parquet"
PUSH_PENDING = ".push-pending"
GAPS = "gaps.csv"
FLUSH_BUNDLES = 2000        # bundles between durable batches: bounds memory and the work a crash repeats
FLUSH_S = 30.0              # ... or seconds
COMMIT_BUNDLES = 200        # ledger rows per transaction: at 1 M entries a commit of 200 takes a few ms,
                            # one of 2,000 ~100 ms (it spans enough pages to trigger a WAL checkpoint)
HOLE_FACTOR = 3.0           # a step over this many median sampling intervals is a gap


class Busy(RuntimeError):
    """Another ingest holds the data directory's lock (``DATA_DIR/.ingest.lock``)."""


class Rejected(Exception):
    """A bundle that fails a check. ``reason``: ``unsigned``, ``malformed``, ``untrusted``, ``truncated``,
    ``mismatch`` (signature); ``undecryptable``; ``manifest`` (hashes, members, signing key); ``oversize``
    (over a limit, or more than the bundle can hold); ``unsafe`` (a member name or type, or a host or
    sensor name unfit for a path); ``csv`` (a CSV record that is not UTF-8 CSV); ``host`` (the manifest's host is not the signing device's name)."""

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
    bytes: int = 0                                                        # ciphertext read
    pushed: int = 0                                                       # readings sent to --push
    push_errors: list[str] = field(default_factory=list)

    def merge(self, other: "Report") -> None:
        for k in ("ingested", "skipped", "rejected", "push_errors"):
            getattr(self, k).extend(getattr(other, k))
        for k in ("records", "rows", "bytes", "pushed"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class Options:
    """What a run writes besides the CSVs: ``parquet`` mirror, ``push`` URL (InfluxDB ``/write``),
    ``limits`` on each bundle, ``licence`` named in the data tree's README."""

    parquet: bool = False
    push: str | None = None
    limits: bundle_format.Limits = bundle_format.DEFAULT_LIMITS
    licence: str = ""


# ------------------------------------------------------------------------------------------ ledger

class Ledger:
    """``DATA_DIR/ledger.sqlite`` (WAL): ``bundles`` by SHA-512 (name, host, records, signer, time) and
    ``files`` by upload-tree directory and name (size, mtime in ns, the ``.sig``'s SHA-256, status
    ``ingested`` or the rejection reason). Safe to open from several processes."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, timeout=120, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit lost to a power cut is redone by the next run (idempotent), never torn.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS bundles (digest TEXT PRIMARY KEY, name TEXT, host TEXT, records INTEGER,
                                                signer TEXT, ingested TEXT) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS files (dir TEXT, name TEXT, size INTEGER, mtime_ns INTEGER, sig TEXT,
                                              status TEXT, PRIMARY KEY (dir, name)) WITHOUT ROWID;
        """)

    def migrate(self, old: Path) -> int:
        """Import an ``ingested.json`` ({SHA-512: {name, host, records, signer, ingested}}) once, then
        rename it ``ingested.json.migrated``. Returns the number of entries."""
        if not old.exists():
            return 0
        entries = json.loads(old.read_text())
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR IGNORE INTO bundles VALUES (?,?,?,?,?,?)",
                            [(d, e.get("name"), e.get("host"), e.get("records"), e.get("signer"), e.get("ingested"))
                             for d, e in entries.items()])
        self.db.execute("COMMIT")
        os.replace(old, old.with_name(old.name + ".migrated"))
        return len(entries)

    def known_files(self, directory: str) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self.db.execute(
            "SELECT name, size, mtime_ns, sig, status FROM files WHERE dir = ?", (directory,))}

    def has_bundle(self, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM bundles WHERE digest = ?", (digest,)).fetchone() is not None

    def commit(self, bundles: list[tuple], files: list[tuple]) -> None:
        """One transaction: ``bundles`` rows (digest, name, host, records, signer, ingested) and
        ``files`` rows (dir, name, size, mtime_ns, sig, status)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT OR REPLACE INTO bundles VALUES (?,?,?,?,?,?)", bundles)
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)", files)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM bundles").fetchone()[0]

    def close(self) -> None:
        self.db.close()


# ------------------------------------------------------------------------------------------ scanning

@dataclass
class Candidate:
    """A bundle the ledger does not know in this state: path, size (bytes), mtime (ns), SHA-256 of its
    ``.sig`` ("" when missing), and the partition key (the signer's fingerprint, or the name)."""

    path: str
    size: int
    mtime_ns: int
    sig: str
    key: str


def scan(tree: Path, out: Path, ledger: Ledger, report: Report, print=print) -> list[Candidate]:
    """Walk *tree*; return the bundles to read. Known ones are counted as skipped (or, when the ledger
    holds their rejection, as rejected again) without reading them."""
    out_resolved = out.resolve()
    found: list[Candidate] = []
    stack = [os.path.abspath(tree)]  # the same key in the ledger however the tree was named
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            print(f"error {d}: {e.strerror or e}; skipped")
            continue
        names = {e.name for e in entries}
        known = None
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if Path(e.path).resolve() != out_resolved:
                    stack.append(e.path)
                continue
            if not e.name.endswith(".tar.age"):
                continue
            try:
                st = e.stat()
            except OSError as err:  # gone since the listing (an uploader's rename), or a dangling symlink
                print(f"error {e.name}: {err.strerror or err}; skipped")
                continue
            sig_name = e.name + crypto.SIG_SUFFIX
            sig_bytes = b""
            if sig_name in names:
                try:
                    sig_bytes = crypto.read_signature_bytes(Path(d, sig_name))
                except (OSError, crypto.SignatureError):
                    pass  # read again, and judged, with the bundle
            sig = hashlib.sha256(sig_bytes).hexdigest() if sig_bytes else ""
            if known is None:
                known = ledger.known_files(d)
            row = known.get(e.name)
            if row is not None and row[:3] == (st.st_size, st.st_mtime_ns, sig):
                if row[3] == "ingested":
                    report.skipped.append(e.name)
                    print(f"skip {e.name}: already ingested")
                else:
                    report.rejected.append((e.name, row[3], "rejected before (unchanged since)"))
                    print(f"rejected {e.name}: {row[3]} (unchanged since an earlier run; see {REJECTED}/)")
                continue
            found.append(Candidate(e.path, st.st_size, st.st_mtime_ns, sig, _partition_key(sig_bytes, e.name)))
        stack.sort(reverse=True)  # depth-first in name order
    return found


def _partition_key(sig_bytes: bytes, name: str) -> str:
    try:
        pub = crypto._parse_signature(sig_bytes)[0]
        return "SHA256:" + base64.b64encode(hashlib.sha256(pub).digest()).decode().rstrip("=")  # its fingerprint
    except crypto.SignatureError:
        return "name:" + name.split("_", 1)[0]


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


# ------------------------------------------------------------------------------------------ one worker

@dataclass
class _Day:
    header: list[str]
    rows: set[tuple[str, ...]] = field(default_factory=set)
    gaps: set[tuple[str, str, str, str]] = field(default_factory=set)   # (start, end, duration_s, source)


class Worker:
    """Ingests a list of :class:`Candidate` (one partition) into *out*; one per process."""

    def __init__(self, out: Path, identities, trusted: dict, names: dict[str, str], options: Options,
                 print=print, progress=None):
        self.out, self.identities, self.trusted, self.names, self.opt = out, identities, trusted, names, options
        self.print, self.progress = print, progress or (lambda files, nbytes: None)
        self.ledger = Ledger(out / LEDGER)
        self.report = Report()
        self.pending_days: dict[tuple[str, str, str], _Day] = {}
        self.pending_bundles: list[tuple] = []
        self.pending_files: list[tuple] = []
        self.digests: set[str] = set()
        self.touched: set[Path] = set()
        self.push_lines: list[str] = []
        self._duck = None

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
                date = _date_of(rec.get("start", "")) or _date_of(manifest.get("start", "")) or "unknown-date"
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
                _replace(archive.sidecar_of(dest), json.dumps(meta, indent=1, sort_keys=True).encode())
                self._gap_from_metadata(host, sensor, date, rec)
                if rec["path"] in tables:
                    self._merge_rows(host, sensor, date, tables[rec["path"]])
            self.digests.add(got.digest)
            self.pending_bundles.append((got.digest, bundle.name, host, len(moves), fp,
                                         archive.utc_iso(datetime.now(timezone.utc))))
            self.pending_files.append(file_row)
            self.print(f"ok {bundle.name}: {len(moves)} record(s), signed by {got.label} ({fp})")
            return len(moves)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _day(self, host: str, sensor: str, date: str, header: list[str] | None = None) -> _Day:
        key = (host, sensor, date)
        cur = self.pending_days.get(key)
        if cur is None:
            cur = self.pending_days[key] = _Day(list(header or []))
        return cur

    def _gap_from_metadata(self, host: str, sensor: str, date: str, rec: dict) -> None:
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
            end = archive.parse_iso(rec.get("start", ""))
        except (ValueError, TypeError):
            return
        try:
            start = end if gap_s is None else datetime.fromtimestamp(end.timestamp() - gap_s, timezone.utc)
        except (OverflowError, ValueError, OSError):  # a gap reaching before year 1: no such gap
            return
        day = self._day(host, sensor, date)
        day.gaps.add((archive.utc_iso(start), archive.utc_iso(end), "" if gap_s is None else f"{gap_s:g}",
                      "after_restart" if restart else "device"))

    def _merge_rows(self, host: str, sensor: str, date: str, rows: list[list[str]]) -> None:
        if not rows:
            return
        header, body = rows[0], rows[1:]
        for row in body:
            if not any(row):
                continue  # a blank line is no reading
            cur = self._day(host, sensor, _date_of(row[0]) or date, header)
            if not cur.header:
                cur.header = list(header)
            if header != cur.header:
                cur.header, cur.rows = _union(cur.header, cur.rows, header)
            pos = [cur.header.index(c) for c in header]
            full = [""] * len(cur.header)
            for p, v in zip(pos, row):
                full[p] = v
            cur.rows.add(tuple(full))

    def flush(self) -> None:
        """Write the pending days' CSVs, gaps and mirrors, make every new file durable, then commit the
        batch to the ledger, then push its new readings.

        A day's CSV and gaps.csv also hold what earlier, committed batches merged, which no rerun would
        redo: each replaces its predecessor only once its own data is on the disk (written under a
        temporary name, ``sync()``, renamed, ``sync()`` again before the ledger commit)."""
        staged: list[tuple[Path, Path]] = []
        mirrors: list[tuple[str, str, str, Path]] = []
        for (host, sensor, date), day in sorted(self.pending_days.items()):
            folder = self.out / host / date / sensor
            path = folder / f"{host}@{date}.csv"
            header, rows, before, old_rows = day.header, day.rows, 0, set()
            if path.exists():
                with open(path, newline="", encoding="utf-8") as f:
                    old = list(csv.reader(f))
                if old:
                    before = len(old) - 1
                    old_rows = {tuple(r) for r in old[1:]}
                    header, rows = _union(old[0], old_rows, day.header, day.rows) if day.header else (old[0], old_rows)
            folder.mkdir(parents=True, exist_ok=True)
            if rows:
                self.report.rows += len(rows) - before
                buf = io.StringIO()
                w = csv.writer(buf, lineterminator="\n")
                w.writerow(header)
                ordered = sorted(rows)
                w.writerows(ordered)
                staged.append((_stage(path, buf.getvalue().encode()), path))
                if self.opt.parquet:
                    mirrors.append((host, sensor, date, path))
                if self.opt.push and len(rows) > before:
                    new = rows - _union(old[0], old_rows, header)[1] if old_rows else rows
                    self.push_lines += line_protocol(host, sensor, header, new)
            else:
                ordered = []
            self._write_gaps(folder, header, ordered, day.gaps, staged)
        self.pending_days.clear()
        kept = None
        if self.push_lines:
            # Kept on disk before any CSV shows these rows: once a CSV holds them they are no longer new,
            # so a run killed while pushing would otherwise never send them. Renamed first, so a CSV
            # rename that survives a crash implies this one did.
            kept = self.out / PUSH_PENDING / f"{time.time_ns()}-{os.getpid()}.lp"
            kept.parent.mkdir(exist_ok=True)
            staged.insert(0, (_stage(kept, ("\n".join(self.push_lines) + "\n").encode()), kept))
            self.push_lines = []
        if self.touched or staged:
            # One sync() for the batch instead of an fsync per file: thousands of small files per run,
            # and the ledger below must not claim a bundle whose files are still in the page cache.
            os.sync()
            self.touched.clear()
        for tmp, path in staged:
            os.replace(tmp, path)
        for mirror in mirrors:
            self._parquet(*mirror)
        if staged or mirrors:
            os.sync()
        b, f = self.pending_bundles, self.pending_files
        for i in range(0, max(len(b), len(f)), COMMIT_BUNDLES):
            self.ledger.commit(b[i:i + COMMIT_BUNDLES], f[i:i + COMMIT_BUNDLES])
        self.pending_bundles, self.pending_files = [], []
        if kept is not None:
            self.report.pushed += push(self.opt.push, kept.parent, self.report, files=[kept])

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
        staged.append((_stage(path, buf.getvalue().encode()), path))

    def _parquet(self, host: str, sensor: str, date: str, csv_path: Path) -> None:
        if self._duck is None:
            import duckdb  # beemond[lab]; checked by the CLI before any work

            self._duck = duckdb.connect()
        dest = self.out / PARQUET / f"host={host}" / f"sensor={sensor}" / f"date={date}" / "data.parquet"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.temp_name(dest.parent, dest.name)
        # Names are checked (HOST_RE, NAME_RE, a date): safe inside SQL string literals.
        # sample_size=-1: column types from every row, so a column that turns to text late in the day
        # is text, not a conversion error on every run from then on.
        self._duck.execute(f"COPY (SELECT * FROM read_csv('{csv_path}', header=true, auto_detect=true, "
                           f"sample_size=-1)) TO '{tmp}' (FORMAT parquet)")
        os.replace(tmp, dest)
        self.touched.add(dest)

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
            # remembered, so the next run reports it from the ledger instead of reading it again
            self.pending_files.append((str(bundle.parent), bundle.name, c.size, c.mtime_ns, c.sig, reason))
            return
        try:
            if sig.exists():
                _move_aside(sig, dest.with_name(dest.name + crypto.SIG_SUFFIX))
        except OSError as e:
            log.warning("cannot move the signature of rejected %s: %s", bundle, e)


# ------------------------------------------------------------------------------------------ gaps, push

def timestamp_holes(times: list[str], factor: float = HOLE_FACTOR) -> list[tuple[str, str, str, str]]:
    """Gaps in sorted ISO 8601 *times*: each step longer than *factor* times the median step, as
    (start, end, duration_s, ``"timestamps"``). Fewer than 3 readings: none."""
    ts = []
    for t in times:
        try:
            ts.append((archive.parse_iso(t).timestamp(), t))
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
            t = archive.parse_iso(row[0])
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


# ------------------------------------------------------------------------------------------ the run

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
            archive.remove_stale_temps(out)
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
            w = Worker(out, identities, trusted, names, options, print, bar.add)
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
        w = Worker(Path(out), crypto.load_identities(identity_file), crypto.load_trusted_keys(trusted_dir), names,
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


# ------------------------------------------------------------------------------------------ README

UNITS = {"_c": "degrees Celsius (°C)", "_rh": "relative humidity (%RH)", "_kg": "kilograms (kg)",
         "_ppm": "parts per million (ppm)", "_pa": "pascals (Pa)", "_hpa": "hectopascals (hPa)", "_hz": "hertz (Hz)",
         "_v": "volts (V)", "_lux": "lux (lx)", "_s": "seconds (s)", "_ratio": "ratio (1 = full scale)"}


def write_readme(out: Path, licence: str = "") -> None:
    """``DATA_DIR/README.md``: the data tree's "data and file overview" (what, units, time zone,
    source, licence), in the style of FRDR's README template. Rewritten when its text changes."""
    text = f"""# beemond data tree

## Data and file overview
What: readings and recordings from research beehives, taken by beemond field recorders (one per hive),
sealed on the device into age-encrypted, Ed25519-signed bundles, and unpacked here by `beemond ingest`.
Every record was checked against its bundle's manifest (size and SHA-256) and its bundle's signature
against the hive's trusted device key before it was written here.

Time zone: every time, in names and in data, is UTC (ISO 8601, `Z`), as the device's clock gave it
(a record's metadata says whether the clock was synchronised).

Source: the devices' bundles (`<host>_<start>_<group>_<digest>.tar.age`); each record's
`NAME.meta.json` names the bundle it came from and the key that signed it.

Licence: {licence or "not stated yet: add the licence under which this data is shared (e.g. CC-BY-4.0)."}

## Files
- `<host>/<date>/<sensor>/<record>`: each record as the device wrote it (CSV readings, FLAC/WAV audio,
  JSON analysis results such as audio band power or alerts, JPEG/MP4 images), beside
  `<record>.meta.json` (its manifest entry: sensor, start, end, size, sha256, metadata; bundle; signing key).
  A record whose name another record of that day already had is `NAME~<first 12 hex digits of its SHA-256>.EXT`.
- `<host>/<date>/<sensor>/<host>@<date>.csv`: every reading of that sensor on that UTC day, one row per
  reading, sorted by `time`, no duplicates; archival format, with the FLAC audio.
- `<host>/<date>/<sensor>/gaps.csv`: `start,end,duration_s,source`: stretches without readings.
  `source` is `after_restart` or `device` (declared by the device: `gap_s` seconds since its last durable
  reading) or `timestamps` (a step longer than {HOLE_FACTOR:g} median sampling intervals in the day's CSV).
- `{PARQUET}/host=<host>/sensor=<sensor>/date=<date>/data.parquet` (when ingested with `--parquet`):
  the daily CSVs as Parquet (hive partitioning; e.g. DuckDB
  `read_parquet('{PARQUET}/**/*.parquet', hive_partitioning=true)`). A mirror: the CSVs are the record.
- `{REJECTED}/`: bundles that failed a check, each with `NAME.reason`.
- `{LEDGER}`: what has been ingested (SQLite); `.ingest.lock`: held while an ingest runs.

## Columns and units
The first column of a daily CSV is `time` (UTC). A column's unit is its name's suffix:
""" + "".join(f"- `*{k}`: {v}\n" for k, v in UNITS.items()) + """
An empty cell: the column did not exist yet when that reading was taken, or the sensor gave no value.
"""
    path = out / "README.md"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with archive.atomic_writer(path, "w", encoding="utf-8") as f:
            f.write(text)


# ------------------------------------------------------------------------------------------ helpers

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
    os.replace(_stage(path, data), path)


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


def _stage(path: Path, data: bytes) -> Path:
    """*data* written under a temporary name beside *path* (swept by the next run after a crash)."""
    tmp = archive.temp_name(path.parent, path.name)
    tmp.write_bytes(data)
    return tmp


def _union(header: list[str], rows: set, other: list[str], other_rows: set = frozenset()):
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


def _date_of(text: str) -> str | None:
    """``YYYY-MM-DD`` (UTC) of an ISO 8601 time, or None (also for a manifest's null or number)."""
    if not isinstance(text, str):
        return None
    try:
        return archive.parse_iso(text).strftime("%Y-%m-%d")
    except (ValueError, TypeError):
        return None
