"""Retention and space: the uploader is the only process that deletes from the outbox and ``uploaded/``.

Nothing leaves under a transfer (:mod:`beemond.spool`). Retention (``enforce_retention``): uploaded
copies beyond ``keep_uploaded_bytes`` go, oldest first. Space (``enforce_spool_limits``, the
``[daemon]`` spool limits, after each upload and every ``SPOOL_CHECK_S``): uploaded copies first, then
only with ``drop_oldest_when_full`` the oldest un-uploaded bundles, never the newest. Signatures whose
bundle is gone (a power cut between the aggregator's two renames) are swept.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from pathlib import Path

from beemond import ipc
from beemond.core.fsio import fsync_dir
from beemond.spool import signature_of
from beemond.upload.queues import sort_key

# The uploader's own logger: these are its lines, whichever module holds the code.
log = logging.getLogger("beemond.upload.uploader")

SPOOL_CHECK_S = 10.0        # the [daemon] spool limits are checked this often, and after each upload
ORPHAN_SIG_GRACE_S = 600.0  # an outbox signature without its bundle this old was left by a power cut
ORPHAN_SIG_SEEN_S = 60.0    # ... and seen alone this long by the uploader (a clock step can age a young one)


class SpaceKeeper:
    """Part of :class:`beemond.upload.uploader.Uploader` (a mixin): uploaded copies (``kept``,
    ``kept_bytes``), the spool limits (``limits_at``, ``spool_full``, ``orphans``). Uses the
    uploader's ``cfg``, ``up``, ``spool``, ``outbox``, ``uploaded_dir``, ``known``, ``begun``,
    ``strikes``, ``counts``, ``channel`` and ``report()``."""

    def _release(self, path: Path, sig: Path | None) -> None:
        """Delete (or keep, under the quota) an uploaded bundle: its signature first, so a power cut
        between the two leaves a bundle that is simply uploaded again, never an orphan signature.
        Either may have been deleted by hand meanwhile: it is on the server, that is fine."""
        if self.up.keep_uploaded_bytes > 0:
            self.uploaded_dir.mkdir(exist_ok=True)
            try:
                if sig is not None:
                    os.replace(sig, self.uploaded_dir / sig.name)
                os.replace(path, self.uploaded_dir / path.name)
                fsync_dir(self.uploaded_dir)
                self._keep(self.uploaded_dir / path.name)
            except FileNotFoundError:
                signature_of(self.uploaded_dir / path.name).unlink(missing_ok=True)  # no copy to go with
        else:
            if sig is not None:
                sig.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        fsync_dir(self.outbox)

    def _keep(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            sig = signature_of(path)
            if sig.exists():
                size += sig.stat().st_size
        except FileNotFoundError:
            return  # deleted by hand meanwhile
        bisect.insort(self.kept, (sort_key(path), path, size))
        self.kept_bytes += size

    def enforce_retention(self) -> None:
        """Uploaded copies beyond ``keep_uploaded_bytes`` go, oldest (by bundle start) first."""
        while self.kept and self.kept_bytes > self.up.keep_uploaded_bytes:
            self._evict("over keep_uploaded_bytes")

    def _evict(self, why: str) -> int:
        """Delete the oldest uploaded copy, signature first. Returns the bytes freed on disk."""
        _key, path, size = self.kept.pop(0)
        freed = _unlink(signature_of(path), path)
        self.kept_bytes -= size
        self.counts["evicted"] += 1
        log.info("evicted uploaded copy %s (%s)", path.name, why)
        return freed

    def enforce_spool_limits(self, in_flight: Path | None = None) -> None:
        """Keep the spool within ``daemon.spool_max_bytes`` (0: none) and ``daemon.spool_min_free_bytes``.

        Over a limit: uploaded copies (kept under ``upload.keep_uploaded_bytes``) go first, oldest
        first; then, only with ``daemon.drop_oldest_when_full``, the oldest un-uploaded bundles in the
        outbox (never the newest), each logged at error level and reported as an ``ERROR`` event
        (counted in ``beemond_errors_total{worker="uploader"}``). Without it no un-uploaded data is ever
        deleted: one error says the spool is full, and on a truly full file system the sensors' writes
        and the aggregator's seals fail and are retried until space returns (logged too). Staged
        records are never deleted: they exist nowhere else. The loop runs it between transfers; a
        caller inside a transfer passes the bundle being sent as *in_flight*, which is never dropped.
        Never raises."""
        self.limits_at = time.monotonic() + SPOOL_CHECK_S
        d = self.cfg.daemon
        try:
            # Old by its mtime and seen alone by our monotonic clock too: NTP stepping the clock forward
            # between the aggregator's two renames makes a signature whose bundle is on its way look old.
            now, seen = time.monotonic(), {}
            for sig in self.spool.orphan_signatures(older_than_s=ORPHAN_SIG_GRACE_S):
                seen[sig] = self.orphans.get(sig, now)
                if now - seen[sig] >= ORPHAN_SIG_SEEN_S:
                    sig.unlink(missing_ok=True)
                    log.warning("deleted the signature %s, whose bundle is gone", sig.name)
            self.orphans = seen
            used, free = self.spool.allocated(), self.spool.free_bytes()
            over = lambda: bool(d.spool_max_bytes and used > d.spool_max_bytes) or free < d.spool_min_free_bytes  # noqa: E731
            while over() and self.kept:
                size = self._evict("spool over its limits")
                used, free = used - size, free + size
            if over() and d.drop_oldest_when_full:
                dropped = 0
                # The newest bundle always stays: a limit smaller than one bundle must not cost all data.
                for victim in self.spool.bundles()[:-1]:
                    if not over():
                        break
                    if victim == in_flight:
                        continue
                    size = self._drop(victim)
                    used, free, dropped = used - size, free + size, dropped + 1
                    log.error("spool full (%s): dropped the oldest un-uploaded bundle %s (%d bytes; "
                              "daemon.drop_oldest_when_full); %d dropped so far",
                              self._limits(used, free), victim.name, size, self.counts["dropped"])
                    self.channel.send(ipc.ERROR, message=f"spool full: dropped bundle {victim.name}", spool=True)
                if dropped:
                    fsync_dir(self.outbox)
                    self.report()
        except OSError as e:  # EIO, a read-only remount: the next check tries again
            log.warning("cannot enforce the spool limits: %s", e)
            return
        full = over()
        if full and not self.spool_full:
            if d.drop_oldest_when_full:
                log.error("spool full (%s) with only the newest bundle left to drop; it and the staged "
                          "records are kept until space returns", self._limits(used, free))
            else:
                log.error("spool full (%s): no uploaded copy left to delete and un-uploaded data is kept "
                          "(daemon.drop_oldest_when_full = false); if the file system fills, sensors hold "
                          "their records and retry until space returns", self._limits(used, free))
            self.channel.send(ipc.ERROR, message="spool full", spool=True)
        elif not full and self.spool_full:
            log.info("spool space returned (%s)", self._limits(used, free))
        self.spool_full = full

    def _drop(self, victim: Path) -> int:
        """Delete an un-uploaded bundle, then its signature (a power cut between leaves an orphan
        signature, swept later, never a bundle that would go up unsigned). Returns the bytes freed."""
        freed = _unlink(victim, signature_of(victim))
        self.known.pop(victim, None)
        self.begun.discard(victim)
        self.strikes.pop(victim, None)
        self.counts["dropped"] += 1
        return freed

    def _limits(self, used: int, free: int) -> str:
        d = self.cfg.daemon
        cap = f" of spool_max_bytes {d.spool_max_bytes}" if d.spool_max_bytes else ""
        return f"{used} bytes used{cap}, {free} free, spool_min_free_bytes {d.spool_min_free_bytes}"


def _unlink(*paths: Path) -> int:
    """Unlink *paths* in order (one deleted by hand is skipped). Returns the bytes freed on disk."""
    freed = 0
    for p in paths:
        try:
            size = p.stat().st_blocks * 512
            p.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed
