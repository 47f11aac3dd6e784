"""What the lab has ingested: ``DATA_DIR/ledger.sqlite``, the scan of an upload tree against it, and
the :class:`Report` of a run.

A run over a tree where nothing is new costs a directory walk, a ``stat``, one small read of each
``.sig`` and one ledger look-up per directory (:func:`scan`), never a re-hash of a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from beemond.bundle import crypto

LEDGER = "ledger.sqlite"
OLD_LEDGER = "ingested.json"
REJECTED = "rejected"
COMMIT_BUNDLES = 200        # ledger rows per transaction: at 1 M entries a commit of 200 takes a few ms,
                            # one of 2,000 ~100 ms (it spans enough pages to trigger a WAL checkpoint)


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
