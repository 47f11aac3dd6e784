"""FTP transport (``ftplib``, RFC 959 plus SIZE from RFC 3659), one connection reused across files.

Paths are absolute from the login directory, so a reconnect cannot land the next upload elsewhere.
The password is read from its file at connect time and never logged.
"""

from __future__ import annotations

import ftplib
import logging
import posixpath

from beemond.upload import TransportError

log = logging.getLogger(__name__)

BLOCK = 64 * 1024


class FtpTransport:
    def __init__(self, up):
        self.up = up
        self.ftp: ftplib.FTP | None = None
        self.home = "/"
        self._dirs: set[str] = set()

    @property
    def connected(self) -> bool:
        return self.ftp is not None

    def describe(self) -> str:
        return f"ftp://{self.up.user}@{self.up.host}:{self.up.port}"

    def connect(self) -> None:
        ftp = ftplib.FTP(timeout=self.up.timeout_s)
        try:
            ftp.connect(self.up.host, self.up.port)
            ftp.login(self.up.user, self.up.password())
            ftp.voidcmd("TYPE I")  # SIZE is defined for binary transfers only
            self.home = ftp.pwd() or "/"
        except BaseException:
            ftp.close()
            raise
        self.ftp = ftp
        self._dirs = set()

    def path(self, relative: str) -> str:
        return posixpath.normpath(posixpath.join(self.home, self.up.remote_dir.strip("/"), relative))

    def ensure_dir(self, path: str) -> None:
        if path in self._dirs or path in ("", "/"):
            return
        parent = posixpath.dirname(path)
        if parent != path:
            self.ensure_dir(parent)
        try:
            self.ftp.mkd(path)
        except ftplib.error_perm as e:
            # 550 both for "exists" and "not allowed": tell them apart by entering it.
            try:
                self.ftp.cwd(path)
            except ftplib.error_perm:
                raise TransportError(f"cannot create remote directory {path}: {e}") from None
        self._dirs.add(path)

    def put(self, local, remote: str, progress=None) -> None:
        with open(local, "rb") as f:
            self.ftp.storbinary(f"STOR {remote}", f, blocksize=BLOCK,
                                callback=(lambda _block: progress()) if progress else None)

    def size(self, remote: str) -> int:
        value = self.ftp.size(remote)
        if value is None:
            raise TransportError(f"server did not report the size of {remote}")
        return int(value)

    def rename(self, src: str, dst: str) -> None:
        self.ftp.rename(src, dst)

    def close(self) -> None:
        ftp, self.ftp = self.ftp, None
        if ftp is None:
            return
        try:
            ftp.quit()
        except (ftplib.all_errors, EOFError):
            ftp.close()
