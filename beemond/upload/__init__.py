"""Upload of sealed bundles from the outbox, one module per transport.

A transport is a small object with ``connect()``, ``ensure_dir(path)``, ``put(reader, remote)``
(streams a file-like object to *remote*, normally ``NAME.part``), ``size(remote) -> int`` (bytes),
``rename(src, dst)`` (replacing *dst*), ``close()``, ``path(relative) -> str`` (the absolute remote
path of a layout path) and ``describe()`` (a URL without secrets). It raises :class:`TransportError`
(transient: retried with backoff), :class:`PermanentError` (this file will never go: quarantined),
``OSError`` or one of its library's ``errors``; ``permanent(exc)`` says which library errors are
permanent. A transport with ``stores_whole = True`` (S3) instead has ``store(f, reader, remote, size)``:
one server-verified write of the final object, no ``.part`` or rename. :mod:`beemond.upload.uploader` owns the queues, the retries and the rule that nothing is
deleted before the server confirmed it.

Everything here is transport independent: the secret readers and the token-bucket reader that
enforces ``rate_limit_bytes_per_s`` and reports progress, whatever the protocol.
"""

from __future__ import annotations

import os
import posixpath
import time
from pathlib import Path


class TransportError(Exception):
    """A transfer failed; the bundle stays in the outbox and is retried."""


class PermanentError(TransportError):
    """The server refused this file for good (permission denied, bad name): quarantine, do not retry."""


class LocalFileError(PermanentError):
    """The local bundle cannot be read (EIO on the SD card, not a regular file)."""


def read_secret(file: Path | None, credential: str) -> Path | None:
    """The path of a secret: *file*, or *credential* in systemd's ``$CREDENTIALS_DIRECTORY``; None if unset.

    Raises :class:`TransportError` (without the secret, which is never read here) if a credential
    is named but the directory is not set.
    """
    if file is not None:
        return file
    if credential:
        creds = os.environ.get("CREDENTIALS_DIRECTORY", "")
        if not creds:
            raise TransportError(f"credential {credential!r} named but $CREDENTIALS_DIRECTORY is not set")
        return Path(creds) / credential
    return None


class TokenBucket:
    """Rate limit in bytes/s shared by every transfer of one uploader; ``rate <= 0`` means unlimited.

    Holds at most *burst* bytes of credit (default: a quarter second of traffic, at least 16 KiB),
    so a link left idle does not get a long full-speed burst afterwards.
    """

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(16384.0, self.rate / 4)
        self.tokens = self.burst
        self.last = time.monotonic()

    def take(self, n: int) -> None:
        """Spend *n* bytes of credit, sleeping until the debt is paid."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


class BundleReader:
    """A read-only file-like view of a local bundle for the transports: rate-limited by *bucket*,
    reporting each chunk's size to *progress*, and turning a local read error into
    :class:`LocalFileError` so that it is not mistaken for a network fault."""

    def __init__(self, f, bucket: TokenBucket, progress=None):
        self.f, self.bucket, self.progress = f, bucket, progress
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        if self.bucket.rate > 0:
            # At most a second's worth per read: a slow limit must not starve the heartbeat.
            cap = max(1024, int(min(self.bucket.burst, self.bucket.rate)))
            n = cap if n is None or n < 0 else min(n, cap)
        try:
            data = self.f.read(n)
        except OSError as e:
            raise LocalFileError(f"cannot read local bundle: {e.strerror or e}") from None
        if data:
            self.bucket.take(len(data))
            self.sent += len(data)
            if self.progress is not None:
                self.progress(len(data))
        return data


class RemoteTransport:
    """What the FTP(S) and SFTP transports share: the URL, remote paths, and a cache of the
    directories made on this connection (``_make_dir(path)`` creates one whose parent exists)."""

    scheme = ""
    default_port = 0

    def __init__(self, up):
        self.up = up
        self.home = "/"
        self._dirs: set[str] = set()

    @property
    def port(self) -> int:
        return self.up.port or self.default_port

    def describe(self) -> str:
        return f"{self.scheme}://{self.up.user}@{self.up.host}:{self.port}"

    def path(self, relative: str) -> str:
        # An absolute remote_dir is taken as is; a relative one starts at the login directory.
        return posixpath.normpath(posixpath.join(self.home, self.up.remote_dir, relative))

    def ensure_dir(self, path: str) -> None:
        if path in self._dirs or path in ("", "/"):
            return
        parent = posixpath.dirname(path)
        if parent != path:
            self.ensure_dir(parent)
        self._make_dir(path)
        self._dirs.add(path)

    def _make_dir(self, path: str) -> None:
        raise NotImplementedError


def make_transport(up):
    """The transport for ``[upload] protocol`` (*up*: :class:`beemond.config.UploadConfig`)."""
    if up.protocol == "ftp":
        from beemond.upload.ftp import FtpTransport

        return FtpTransport(up)
    if up.protocol == "ftps":
        from beemond.upload.ftp import FtpsTransport

        return FtpsTransport(up)
    if up.protocol == "sftp":
        from beemond.upload.sftp import SftpTransport

        return SftpTransport(up)
    if up.protocol == "s3":
        from beemond.upload.s3 import S3Transport

        return S3Transport(up)
    if up.protocol == "local":
        from beemond.upload.local import LocalTransport

        return LocalTransport(up)
    raise ValueError(f"no transport for protocol {up.protocol!r}")
