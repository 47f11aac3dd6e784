"""Aggregator worker: collects staged records and seals them into bundles in the outbox.

Records are grouped (``all``, or per sensor with ``[bundle] split_by_sensor``) and a group is sealed
(:func:`beemond.bundle.sealer.seal`) when it reaches ``[bundle] max_bytes``, after ``max_duration_s``,
and at shutdown. The same records always make the same bundle name, so records still staged after a
crash whose bundle reached the outbox are not sealed again: that twin stays as it is (a reseal would
have other bytes of the same size, which the uploader's resume of a cut transfer cannot tell).

Order of durability: the bundle is fsynced and renamed into ``outbox/`` and the directory fsynced
*before* any staged record it holds is deleted. The aggregator writes the outbox and deletes from
staging; it never deletes from the outbox (the uploader alone does, spool limits included).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beemond import ipc
from beemond.core import clock, fsio
from beemond.bundle import crypto
from beemond.bundle.sealer import Record, RecordError, bundle_name, seal
from beemond.spool import META_SUFFIX, Spool, sidecar_of, write_sidecar
from beemond.worker import Worker

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 60.0
RETRY_SEAL_S = 30.0


# ------------------------------------------------------------------------------------------ worker

@dataclass
class _Open:
    opened: float                         # monotonic
    records: list[Record] = field(default_factory=list)
    size: int = 0
    retry_at: float = 0.0                 # after a failed seal


class Aggregator(Worker):
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

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        self.rescan()

    def on_shutdown(self, cmd: ipc.Shutdown) -> None:
        self.rescan(final=True)
        self.seal_all(force=True)
        log.info("shut down with %d record(s) left staged", sum(len(o.records) for o in self.open.values()))
        self.finished = True

    def on_record_ready(self, cmd: ipc.RecordReady) -> None:
        self.add(Path(cmd.path))

    def tick(self) -> None:
        self.seal_all(force=False)

    def timeout(self) -> float:
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
                dirs[:] = sorted(d for d in dirs if not fsio.is_internal(d))
                for name in sorted(files):
                    if fsio.is_internal(name):
                        continue
                    path = Path(dirpath) / name
                    if name.endswith(META_SUFFIX):
                        data = path.with_name(name[:-len(META_SUFFIX)])
                        if not data.exists() and _age(path, now) > ORPHAN_GRACE_S:
                            path.unlink(missing_ok=True)  # its record was bundled; the crash came before this unlink
                        continue
                    if path in self.known:
                        continue
                    if not sidecar_of(path).exists():
                        if not final and _age(path, now) <= ORPHAN_GRACE_S:
                            continue  # its writer may be about to add the sidecar
                        self._recover(path, sensor_dir.name)
                    self.add(path)

    def _recover(self, path: Path, sensor: str) -> None:
        t = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        log.warning("record %s has no metadata (its writer died); bundling it as recovered", path.name)
        write_sidecar(path, {"sensor": sensor, "start": clock.utc_iso(t), "end": clock.utc_iso(t),
                                     "recovered": True})

    def add(self, path: Path) -> None:
        if path in self.known:
            return
        try:
            metadata = json.loads(sidecar_of(path).read_bytes())
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
            sidecar_of(rec.path).unlink(missing_ok=True)
            self.known.discard(rec.path)
            dirs.add(rec.path.parent)
        for d in dirs:
            fsio.fsync_dir(d)
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
        for src, dst in ((rec.path, dest), (sidecar_of(rec.path), sidecar_of(dest))):
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
