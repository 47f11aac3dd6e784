"""Local transport: a mounted directory (a NAS over NFS/SMB, a USB disk) as the "server".

``remote_dir`` is the absolute path of the mount point. Each file is written to ``NAME.part``,
fsynced, and renamed (``os.replace``, atomic on POSIX) with the directory fsynced, so the copy is
durable before the outbox lets go of it. ``connect()`` refuses a directory that is not there, so an
unmounted share (an empty mount point is still a directory: list ``remote_dir`` one level below the
mount to be safe) does not fill the SD card. A ``.part`` cut short (the share went away mid-copy)
is continued from its size on the next try.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from beemond.core import fsio
from beemond.upload.transport import PermanentError, TransportError

BLOCK = 1024 * 1024


class LocalTransport:
    errors: tuple[type[BaseException], ...] = ()
    resumable = True

    def __init__(self, up):
        self.up = up
        self.root = Path(up.remote_dir)
        self.connected = False

    def describe(self) -> str:
        return f"file://{self.root}"

    def permanent(self, e: BaseException) -> bool:
        return isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.ENAMETOOLONG)

    def connect(self) -> None:
        if not self.root.is_dir():
            raise TransportError(f"{self.root} is not a directory (share not mounted?)")
        self.connected = True

    def path(self, relative: str) -> str:
        return str(self.root / relative)

    def ensure_dir(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except PermissionError as e:
            raise PermanentError(f"cannot create directory {path}: {e.strerror}") from None

    def put(self, reader, remote: str, offset: int = 0) -> None:
        # From 0: O_TRUNC, a .part left by an earlier crash is overwritten. Past 0: kept up to *offset*.
        with open(remote, "r+b" if offset else "wb") as f:
            f.seek(offset)
            while data := reader.read(BLOCK):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def size(self, remote: str) -> int:
        return os.stat(remote).st_size

    def part_size(self, remote: str) -> int | None:
        try:
            return os.stat(remote).st_size
        except FileNotFoundError:
            return None

    def in_flight(self) -> int:
        return 0

    def abort(self) -> None:
        """Nothing to shut down: a write blocked on a hung share stops the heartbeat instead."""

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        fsio.fsync_dir(os.path.dirname(dst))

    def close(self) -> None:
        self.connected = False
