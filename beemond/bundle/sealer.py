"""Sealing a bundle: staged records -> one age-encrypted, signed tar in the outbox, durably.

A **bundle** is an uncompressed POSIX (pax) tar of records, ``<sensor>/<record name>``, followed by
``manifest.json`` (:mod:`beemond.bundle.format` defines both and reads them back). The manifest comes
last because the hashes are computed while the records stream through; a reader checks each member
against it at the end (:func:`beemond.bundle.format.read_bundle`). The tar is never written to disk in
clear: a producer thread reads each record once, hashes it and hands the bytes to age
(``pyrage.encrypt_io``) through a small bounded queue, so sealing costs one read of the records and
one write of the ciphertext, and at most ``QUEUE_CHUNKS`` MiB of memory.

Bundle names are ``{host}_{start}_{group}_{digest}.tar.age`` (:data:`beemond.spool.BUNDLE_RE`): ``start``
is the first record's start (UTC, ISO 8601 basic), ``group`` is ``all`` or the sensor name, ``digest``
the first 12 hex digits of the SHA-256 of the member names. The same records always make the same
name (:func:`bundle_name`), so the aggregator can tell that a bundle reached the outbox before a crash.

Order of durability (:func:`seal`): the signature, then the bundle are fsynced and renamed into
``outbox/`` and the directory fsynced; the caller deletes the staged records only after it returned.

In the daemon only the aggregator imports this module (it loads pyrage through :mod:`beemond.bundle.crypto`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import tarfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from beemond import __version__
from beemond.core import clock, fsio, names
from beemond.bundle import crypto
from beemond.bundle.format import FORMAT, MANIFEST, BundleError
from beemond.errors import BeemondError, SpoolError
from beemond.spool import bundle_filename

CHUNK = 1 << 20
QUEUE_CHUNKS = 8


@dataclass
class Record:
    path: Path          # data file in staging
    sensor: str
    member: str         # name inside the tar
    size: int
    metadata: dict

    @property
    def start(self) -> str:
        return self.metadata.get("start", "")

    @property
    def end(self) -> str:
        return self.metadata.get("end", "")


# ------------------------------------------------------------------------------------------ writing

class TarStream(io.RawIOBase):
    """A read-only stream of the tar of *records* plus the manifest, produced by a thread.

    The producer reads each record in 1 MiB chunks, updates its SHA-256 (``hashlib`` releases the
    GIL) and queues the same bytes, so what is hashed is exactly what is encrypted. *progress* is
    called on each chunk in the consumer's thread (heartbeats during a long seal).
    """

    def __init__(self, records: list[Record], manifest_base: dict, progress=None):
        super().__init__()
        self.records = records
        self.manifest_base = manifest_base
        self.progress = progress
        self.manifest: dict | None = None
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._buf = memoryview(b"")
        self._pos = 0
        self._done = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="tar-producer", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    @property
    def finished(self) -> bool:
        """True once the reader consumed the whole archive, manifest and end marker included."""
        return self._done and self.manifest is not None and self._pos >= len(self._buf)

    def _put(self, item) -> None:
        while not self._cancel.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Cancelled()

    def _produce(self) -> None:
        try:
            entries = []
            for rec in self.records:
                h = hashlib.sha256()
                try:
                    f = open(rec.path, "rb", buffering=0)
                except OSError as e:
                    raise RecordError(rec, e) from None
                with f:
                    size = os.fstat(f.fileno()).st_size
                    info = _tarinfo(rec.member, size, int(os.fstat(f.fileno()).st_mtime))
                    self._put(info.tobuf(tarfile.PAX_FORMAT))
                    left = size
                    while left:
                        try:
                            chunk = f.read(min(CHUNK, left))
                        except OSError as e:  # EIO from a failing SD card
                            raise RecordError(rec, e) from None
                        if not chunk:
                            raise RecordError(rec, OSError("the file shrank while being bundled"))
                        h.update(chunk)
                        self._put(chunk)
                        left -= len(chunk)
                if size % tarfile.BLOCKSIZE:
                    self._put(_padding(size))
                entries.append({"path": rec.member, "sensor": rec.sensor, "start": rec.start, "end": rec.end,
                                "size": size, "sha256": h.hexdigest(), "metadata": rec.metadata})
            self.manifest = {**self.manifest_base, "records": entries}
            body = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
            self._put(_tarinfo(MANIFEST, len(body), int(time.time())).tobuf(tarfile.PAX_FORMAT) + body + _padding(len(body)))
            self._put(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            self._put(None)
        except _Cancelled:
            pass
        except BaseException as e:
            # Kept here too: an exception raised through pyrage comes out as another type.
            self.error = e
            try:
                self._put(e)
            except _Cancelled:
                pass

    def read(self, n: int = -1) -> bytes:
        # An empty chunk is skipped, never returned: b"" means end of input to age, and the bundle
        # would be sealed short of its later records and manifest.
        while self._pos >= len(self._buf):
            if self._done:
                return b""
            item = self._q.get()
            if item is None:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if self.progress is not None:
                self.progress()
            self._buf, self._pos = memoryview(item), 0
        end = len(self._buf) if n is None or n < 0 else self._pos + n
        out = self._buf[self._pos:end]
        self._pos += len(out)
        return out.tobytes()

    def close(self) -> None:
        self._cancel.set()
        super().close()


class RecordError(SpoolError):
    """One staged record could not be read; the others can still be sealed without it."""

    def __init__(self, record: Record, error: OSError):
        self.record, self.error = record, error
        super().__init__(f"cannot read record {record.path}: {error.strerror or error}")


class _Cancelled(BeemondError):
    pass


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uname = info.gname = ""
    return info


def _padding(size: int) -> bytes:
    return b"\0" * ((-size) % tarfile.BLOCKSIZE)


def bundle_name(host: str, group: str, records: list[Record]) -> str:
    first = min(clock.parse_iso(r.start) for r in records) if all(r.start for r in records) \
        else datetime.now(timezone.utc)
    digest = hashlib.sha256("\n".join(sorted(r.member for r in records)).encode()).hexdigest()[:12]
    return bundle_filename(host, names.utc_stamp(first), group, digest)


def seal(records: list[Record], outbox: Path, recipients, host: str, group: str,
         progress=None, signing_key=None) -> tuple[Path, dict, int]:
    """Write the encrypted bundle of *records* into *outbox* durably. Returns (path, manifest, bytes).

    With *signing_key* (an Ed25519 private key, :func:`crypto.load_signing_key`) the manifest names
    its fingerprint (``signing_key``) and the detached signature ``NAME.sig`` (:func:`crypto.sign_digest`,
    over the SHA-512 of the ciphertext as it streams out of age) is renamed into the outbox before the
    bundle, so a bundle at its final name always has its signature beside it.

    Raises ``OSError`` (disk full, ...) or ``pyrage.EncryptError``; the outbox is then unchanged.
    """
    records = sorted(records, key=lambda r: (r.start, r.member))
    name = bundle_name(host, group, records)
    starts = [r.start for r in records if r.start]
    ends = [r.end for r in records if r.end]
    base = {"format": FORMAT, "host": host, "software": f"beemond {__version__}", "name": name, "group": group,
            "created": clock.utc_iso(datetime.now(timezone.utc)),
            "start": min(starts) if starts else "", "end": max(ends) if ends else ""}
    if signing_key is not None:
        base["signing_key"] = crypto.fingerprint(signing_key.public_key())
    stream = TarStream(records, base, progress)
    sig_path = outbox / (name + crypto.SIG_SUFFIX)
    try:
        with fsio.atomic_writer(outbox / name, "wb", buffering=0) as out:
            sink = crypto.HashingWriter(out) if signing_key is not None else out
            crypto.encrypt_stream(stream, sink, recipients)
            if not stream.finished:  # checked before the rename: a short bundle never reaches the outbox
                raise BundleError("the tar stream ended before its manifest; bundle not sealed")
            size = out.tell()  # not stat() after the rename: the uploader may have taken it already
            if signing_key is not None:
                signature = crypto.sign_digest(signing_key, sink.digest(), size)
                with fsio.atomic_writer(sig_path, "wb") as f:  # durable, rename included, before the bundle's
                    f.write(signature)
    except Exception:
        # A signature without its bundle is removed; beside an older twin of the bundle (a reseal after
        # a crash) it stays: the records are still staged, and the retry writes a matching pair.
        if signing_key is not None and not (outbox / name).exists():
            sig_path.unlink(missing_ok=True)
        if stream.error is not None:
            raise stream.error from None
        raise
    finally:
        stream.close()
    return outbox / name, stream.manifest, size
