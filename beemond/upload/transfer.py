"""One file to the server, resumed where a cut transfer left it, and where it goes there.

Each file is uploaded to ``REMOTE.part``, its remote size compared with the local one, and renamed to
its final path (``[upload] layout``, :meth:`Transfers.remote_path`). A cut transfer resumes: a remote
``.part`` no larger than the local file is continued from its size (FTP ``REST`` + ``STOR`` where
``FEAT`` offers ``REST STREAM``; SFTP and the local transport write at the offset). A ``.part`` larger
than the local file, or a size mismatch after the transfer, makes the next attempt start from byte 0
(the bundle joins ``restart``). Names are idempotent (a digest of the content), so a ``.part`` of the
same name holds a prefix of the same bytes. S3 (:mod:`beemond.upload.s3`) has no ``.part`` and no
rename: one PUT of the final key that the server checks (SHA-256) and never lets replace an object
(If-None-Match).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from beemond.core import names
from beemond.spool import BUNDLE_RE
from beemond.upload.transport import BundleReader, LocalFileError, TransportError

# The uploader's own logger: these are its lines, whichever module holds the code.
log = logging.getLogger("beemond.upload.uploader")

# Smaller files are sent from byte 0 without asking the server for a .part: the question costs a round
# trip per file (a few hundred ms on a mobile link), more than re-sending 64 KiB after a rare cut.
RESUME_MIN_BYTES = 64 * 1024


def size_of(path: Path) -> int | None:
    """The size of *path* in bytes, None if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class Transfers:
    """Part of :class:`beemond.upload.uploader.Uploader` (a mixin): the remote name of a bundle and
    the verified, resumable transfer of one file. Uses the uploader's ``transport``, ``up``, ``bucket``,
    ``guard``, ``restart`` (bundles whose next attempt starts from byte 0), ``counts``, ``_current``,
    ``_progress`` and ``_pause``."""

    def remote_path(self, path: Path) -> str:
        m = BUNDLE_RE.match(path.name)
        start = m["start"]
        rel = names.render_name(self.up.layout, host=m["host"], name=path.name, sensor=m["group"],
                                group=m["group"], date=f"{start[0:4]}-{start[4:6]}-{start[6:8]}",
                                start=start, ext="tar.age", end=start, metadata={}, _split_index=0)
        return self.transport.path(rel)

    def _send(self, local: Path, remote: str, pausable: bool = False) -> int | None:
        """One file to *remote* via ``.part`` (resumed where a cut transfer left it), verified by
        size. Returns its size in bytes, or None if the transfer was paused for fresh bundles."""
        try:
            f = open(local, "rb")
            size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise
        except OSError as e:
            raise LocalFileError(f"cannot open {local.name}: {e.strerror or e}") from None
        with f:
            if getattr(self.transport, "stores_whole", False):
                # S3: one conditional, checksummed PUT of the final object; the server verified the bytes.
                self.transport.store(f, BundleReader(f, self.bucket, self._progress, guard=self.guard), remote, size)
                return size
            part = remote + ".part"
            offset = self._resume_offset(local, part, size)
            f.seek(offset)
            reader = BundleReader(f, self.bucket, self._progress, self._pause if pausable else None, self.guard)
            self._current = (reader, size - offset)
            # From here the .part holds this attempt's bytes: a cut is resumed, whatever came before.
            self.restart.discard(local)
            if offset < size or size == 0:
                self.transport.put(reader, part, offset)
            self.guard.moved()
            if reader.paused:
                log.info("paused %s at %d of %d bytes for fresh bundles", local.name, offset + reader.sent, size)
                return None
            if offset + reader.sent != size:
                raise LocalFileError(f"{local.name} changed size while uploading ({size} -> {offset + reader.sent} bytes)")
        remote_size = self.transport.size(part)
        if remote_size != size:
            self.restart.add(local)
            raise TransportError(f"remote size {remote_size} != local size {size} for {part}")
        self.restart.discard(local)
        self.transport.rename(part, remote)
        return size

    def _resume_offset(self, local: Path, part: str, size: int) -> int:
        """Where the transfer of *local* (*size* bytes) to *part* starts: the size of a ``.part`` the
        server already holds, if it is no larger than the local file; 0 on any doubt."""
        if local in self.restart or not self.transport.resumable or size < RESUME_MIN_BYTES:
            return 0
        have = self.transport.part_size(part)
        if have is None or have == 0:
            return 0
        if have > size:
            log.warning("remote %s holds %d bytes, more than the local %d: uploading it from the start", part,
                        have, size)
            return 0
        log.info("resuming %s at byte %d of %d", local.name, have, size)
        self.counts["resumed"] += 1
        return have
