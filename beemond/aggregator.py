"""Aggregator/encryptor: staged records -> encrypted bundles in the outbox.

A **bundle** is an uncompressed POSIX (pax) tar of records, ``<sensor>/<record name>``, followed by
``manifest.json``::

    {"format": "beemond-bundle/1", "host", "software", "created", "name", "group", "start", "end",
     "records": [{"path", "sensor", "start", "end", "size", "sha256", "metadata"}, ...]}

The manifest comes last because the hashes are computed while the records stream through; a reader
checks each member against it at the end (:func:`beemond.bundle_format.read_bundle`). The tar is never written to disk
in clear: a producer thread reads each record once, hashes it and hands the bytes to age
(``pyrage.encrypt_io``) through a small bounded queue, so sealing costs one read of the records and
one write of the ciphertext, and at most ``QUEUE_CHUNKS`` MiB of memory.

Bundle names are ``{host}_{start}_{group}_{digest}.tar.age`` (:data:`beemond.spool.BUNDLE_RE`): ``start`` is the first record's start
(UTC, ISO 8601 basic), ``group`` is ``all`` or the sensor name, ``digest`` the first 12 hex digits of
the SHA-256 of the member names. The same records always make the same name, so records still staged
after a crash whose bundle reached the outbox are not sealed again: that twin stays as it is (a reseal
would have other bytes of the same size, which the uploader's resume of a cut transfer cannot tell).

Order of durability: the bundle is fsynced and renamed into ``outbox/`` and the directory fsynced
*before* any staged record it holds is deleted. The aggregator writes the outbox and deletes from
staging; it never deletes from the outbox (the uploader alone does, spool limits included).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import tarfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beemond import __version__, archive, crypto, ipc
# The format (and the reader the lab uses) lives in one module both sides import.
from beemond.bundle_format import FORMAT, MANIFEST, BundleError
from beemond.spool import Spool, bundle_filename
from beemond.errors import BeemondError, SpoolError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
QUEUE_CHUNKS = 8
ORPHAN_GRACE_S = 60.0
RETRY_SEAL_S = 30.0


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
    first = min(archive.parse_iso(r.start) for r in records) if all(r.start for r in records) \
        else datetime.now(timezone.utc)
    digest = hashlib.sha256("\n".join(sorted(r.member for r in records)).encode()).hexdigest()[:12]
    return bundle_filename(host, archive.utc_stamp(first), group, digest)


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
            "created": archive.utc_iso(datetime.now(timezone.utc)),
            "start": min(starts) if starts else "", "end": max(ends) if ends else ""}
    if signing_key is not None:
        base["signing_key"] = crypto.fingerprint(signing_key.public_key())
    stream = TarStream(records, base, progress)
    sig_path = outbox / (name + crypto.SIG_SUFFIX)
    try:
        with archive.atomic_writer(outbox / name, "wb", buffering=0) as out:
            sink = crypto.HashingWriter(out) if signing_key is not None else out
            crypto.encrypt_stream(stream, sink, recipients)
            if not stream.finished:  # checked before the rename: a short bundle never reaches the outbox
                raise BundleError("the tar stream ended before its manifest; bundle not sealed")
            size = out.tell()  # not stat() after the rename: the uploader may have taken it already
            if signing_key is not None:
                signature = crypto.sign_digest(signing_key, sink.digest(), size)
                with archive.atomic_writer(sig_path, "wb") as f:  # durable, rename included, before the bundle's
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


# ------------------------------------------------------------------------------------------ worker

@dataclass
class _Open:
    opened: float                         # monotonic
    records: list[Record] = field(default_factory=list)
    size: int = 0
    retry_at: float = 0.0                 # after a failed seal


class Aggregator:
    """Worker: collects *record ready* paths, seals a bundle per window or size cap, at shutdown all."""

    def __init__(self, cfg, channel: ipc.Channel):
        self.cfg = cfg
        self.channel = channel
        self.spool = Spool(cfg.spool)
        self.staging = self.spool.staging
        self.outbox = self.spool.outbox
        self.staging.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)
        # Read at start: a restart (the orchestrator's reload) seals later bundles for the new recipients
        # and with the new device key.
        self.recipients = crypto.load_recipients(cfg.bundle.recipients, base=cfg.source.parent)
        key_path = cfg.bundle.signing_key_path()
        self.signing_key = crypto.load_signing_key(key_path) if key_path is not None else None
        self.open: dict[str, _Open] = {}
        self.known: set[Path] = set()

    def run(self) -> None:
        self.rescan()
        while True:
            cmd = self.channel.receive(timeout=self._next_deadline())
            if cmd is not None:
                if cmd.kind == ipc.SHUTDOWN:
                    self.rescan(final=True)
                    self.seal_all(force=True)
                    log.info("shut down with %d record(s) left staged", sum(len(o.records) for o in self.open.values()))
                    return
                if cmd.kind == ipc.RECORD_READY:
                    self.add(Path(cmd.args["path"]))
            self.seal_all(force=False)

    def _next_deadline(self) -> float:
        if not self.open:
            return 3600.0
        now = time.monotonic()
        due = min(max(o.opened + self.cfg.bundle.max_duration_s, o.retry_at) for o in self.open.values())
        return max(0.0, due - now)

    def rescan(self, final: bool = False) -> None:
        """Pick up every staged record not yet in an open bundle (start-up, restart, shutdown)."""
        if not self.staging.exists():
            return
        now = time.time()
        for sensor_dir in sorted(p for p in self.staging.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for dirpath, dirs, files in os.walk(sensor_dir):
                dirs[:] = sorted(d for d in dirs if not archive.is_internal(d))
                for name in sorted(files):
                    if archive.is_internal(name):
                        continue
                    path = Path(dirpath) / name
                    if name.endswith(archive.META_SUFFIX):
                        data = path.with_name(name[:-len(archive.META_SUFFIX)])
                        if not data.exists() and _age(path, now) > ORPHAN_GRACE_S:
                            path.unlink(missing_ok=True)  # its record was bundled; the crash came before this unlink
                        continue
                    if path in self.known:
                        continue
                    if not archive.sidecar_of(path).exists():
                        if not final and _age(path, now) <= ORPHAN_GRACE_S:
                            continue  # its writer may be about to add the sidecar
                        self._recover(path, sensor_dir.name)
                    self.add(path)

    def _recover(self, path: Path, sensor: str) -> None:
        t = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        log.warning("record %s has no metadata (its writer died); bundling it as recovered", path.name)
        archive.write_sidecar(path, {"sensor": sensor, "start": archive.utc_iso(t), "end": archive.utc_iso(t),
                                     "recovered": True})

    def add(self, path: Path) -> None:
        if path in self.known:
            return
        try:
            metadata = json.loads(archive.sidecar_of(path).read_bytes())
            size = path.stat().st_size
        except FileNotFoundError:
            return  # already bundled and removed (a duplicate event after a rescan)
        except (OSError, ValueError) as e:
            log.error("cannot read record %s: %s; leaving it staged", path, e)
            return
        sensor = path.relative_to(self.staging).parts[0]
        rec = Record(path, sensor, str(path.relative_to(self.staging)), size, metadata)
        group = sensor if self.cfg.bundle.split_by_sensor else "all"
        ob = self.open.setdefault(group, _Open(opened=time.monotonic()))
        ob.records.append(rec)
        ob.size += size
        self.known.add(path)
        if ob.size >= self.cfg.bundle.max_bytes:
            self.seal_group(group)

    def seal_all(self, force: bool) -> None:
        now = time.monotonic()
        for group in list(self.open):
            ob = self.open[group]
            if force or (now - ob.opened >= self.cfg.bundle.max_duration_s and now >= ob.retry_at):
                self.seal_group(group)

    def seal_group(self, group: str) -> None:
        ob = self.open[group]
        t0 = time.monotonic()
        try:
            twin = self.outbox / bundle_name(self.cfg.daemon.host, group, ob.records)
            if twin.exists():
                # Sealed before a crash kept the staged copies: that bundle stays. A reseal has the same
                # name and size but other bytes (age's file key is random), and the uploader would
                # resume a cut upload of the twin with them: a bundle on the server nobody can decrypt.
                path, size = twin, twin.stat().st_size
                log.warning("%s is in the outbox already (sealed before a crash); not sealing it again", twin.name)
            else:
                path, _manifest, size = seal(ob.records, self.outbox, self.recipients, self.cfg.daemon.host, group,
                                             progress=self.channel.beat, signing_key=self.signing_key)
        except RecordError as e:
            # One unreadable record must not hold back the rest of the hive's data: set it aside in
            # failed/ (never deleted) and seal the others at once.
            self._set_aside(e.record, e.error)
            ob.records.remove(e.record)
            ob.size -= e.record.size
            if ob.records:
                self.seal_group(group)
            else:
                del self.open[group]
            return
        except Exception as e:
            retry = min(RETRY_SEAL_S, self.cfg.bundle.max_duration_s)
            ob.retry_at = time.monotonic() + retry
            log.error("sealing %d record(s) failed, records stay staged, retry in %g s: %s",
                      len(ob.records), retry, e)
            self.channel.send(ipc.ERROR, message=f"seal failed: {e}")
            return
        del self.open[group]
        dirs = set()
        for rec in ob.records:  # the bundle is durable in the outbox: now the staged copies may go
            rec.path.unlink(missing_ok=True)
            archive.sidecar_of(rec.path).unlink(missing_ok=True)
            self.known.discard(rec.path)
            dirs.add(rec.path.parent)
        for d in dirs:
            archive.fsync_dir(d)
        log.info("sealed %s: %d record(s), %d bytes in %.2f s", path.name, len(ob.records), size,
                 time.monotonic() - t0)
        self.channel.send(ipc.BUNDLE_SEALED, path=str(path), records=len(ob.records), bytes=size)

    def _set_aside(self, rec: Record, error: OSError) -> None:
        self.known.discard(rec.path)
        if isinstance(error, FileNotFoundError):
            log.error("record %s vanished from staging before it was sealed", rec.path)
            return
        dest = self.spool.failed_dir() / rec.member
        dest.parent.mkdir(parents=True, exist_ok=True)
        for src, dst in ((rec.path, dest), (archive.sidecar_of(rec.path), archive.sidecar_of(dest))):
            try:
                os.replace(src, dst)
            except OSError:
                pass
        log.error("record %s is unreadable (%s); moved to %s, the others are sealed without it",
                  rec.path.name, error.strerror or error, dest.parent)
        self.channel.send(ipc.ERROR, message=f"record set aside: {rec.member}: {error}")


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
