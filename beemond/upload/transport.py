"""What every upload transport shares: the interface, the errors, secrets, pacing and the stall guard.

A transport is a small object with ``connect()``, ``ensure_dir(path)``, ``put(reader, remote, offset)``
(streams a file-like :class:`BundleReader` to *remote*, normally ``NAME.part``, writing from byte
*offset*: 0 creates or truncates it, more resumes a cut transfer), ``part_size(remote) -> int | None``
(bytes; None if there is no such file), ``size(remote) -> int``, ``rename(src, dst)`` (replacing
*dst*), ``close()``, ``abort()`` (called from another thread: shut the sockets down so that a blocked
call returns), ``in_flight() -> int`` (bytes handed to the kernel and not yet acknowledged by the
peer), ``resumable`` (True once connected if ``put`` may start past 0), ``path(relative) -> str``
(the absolute remote path of a layout path) and ``describe()`` (a URL without secrets). It raises
:class:`TransportError` (transient: retried with backoff), :class:`PermanentError` (this file will
never go: quarantined), ``OSError`` or one of its library's ``errors``; ``permanent(exc)`` says which
library errors are permanent. A transport with ``stores_whole = True`` (S3) instead has
``store(f, reader, remote, size)``: one server-verified write of the final object, no ``.part`` or
rename. :mod:`beemond.upload.uploader` owns the queues, the retries and the rule that nothing is
deleted before the server confirmed it.

Everything here is transport independent: the secret readers, the token-bucket reader that enforces
``rate_limit_bytes_per_s``, reports progress and can pause a transfer between chunks, and the
:class:`StallGuard` that times a transfer out on lack of progress (never on its length) and keeps the
worker's heartbeat while a blocking library call runs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import posixpath
import select
import socket
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Protocol

from beemond import registry
from beemond.errors import UploadError

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What the uploader calls on every transport (the module docstring says what each does). A
    transport that writes ``NAME.part`` also has ``put``, ``size`` and ``rename``; one with
    ``stores_whole = True`` has ``store`` instead (:data:`PART_METHODS`, :data:`WHOLE_METHODS`)."""

    errors: tuple[type[BaseException], ...]
    resumable: bool
    connected: bool

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def describe(self) -> str: ...
    def path(self, relative: str) -> str: ...
    def ensure_dir(self, path: str) -> None: ...
    def part_size(self, remote: str) -> int | None: ...
    def in_flight(self) -> int: ...
    def permanent(self, e: BaseException) -> bool: ...


COMMON_METHODS = ("connect", "close", "abort", "describe", "path", "ensure_dir", "part_size", "in_flight", "permanent")
PART_METHODS = ("put", "size", "rename")
WHOLE_METHODS = ("store",)


class TransportError(UploadError):
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
    """A read-only file-like view of a local bundle for the transports, from the file's current
    position: rate-limited by *bucket*, reporting each chunk's size to *progress*, and turning a local
    read error into :class:`LocalFileError` so that it is not mistaken for a network fault.

    Chunks are small while the link is slow: at most ``CHUNK_S`` seconds of the rate measured so far
    (at least ``MIN_CHUNK`` bytes), so that a pause is taken within seconds and not after a megabyte
    at 10 KB/s, and so that an SFTP write request (one per chunk at most) is complete on the server
    before the next reset: OpenSSH writes a request only once all of it arrived, and a 255 KiB one
    takes 25 s at 10 KB/s. Between chunks *pause* (a callable, optional) is
    asked whether to stop here: then :meth:`read` returns ``b""`` as at the end of the file and
    :attr:`paused` is set; the transport completes the transfer normally, the remote ``.part`` keeps
    what it received and a later ``put`` resumes from there.
    """

    CHUNK_S = 1.0
    MIN_CHUNK = 16 * 1024
    FIRST_CHUNK = 32 * 1024  # the first chunk (paramiko's default request size)

    def __init__(self, f, bucket: TokenBucket, progress=None, pause=None, guard: "StallGuard | None" = None):
        self.f, self.bucket, self.progress, self.pause = f, bucket, progress, pause
        self.guard = guard
        self.sent = 0
        self.paused = False
        self.t0 = time.monotonic()
        self.sock = None  # set by a transport: its socket's send queue paces the reads (see drain)
        self.rate = 0.0  # bytes/s the peer acknowledged so far (0 until something was)
        self.cap = self.FIRST_CHUNK // 2  # the chunk size: doubles while the link keeps up, then follows the rate

    def read(self, n: int = -1) -> bytes:
        if self.pause is not None and self.sent and self.pause():
            self.paused = True
            return b""
        elapsed = time.monotonic() - self.t0
        # The link's rate: what the peer acknowledged, not what the kernel took (see drain).
        queued = in_flight(self.sock) if self.sock is not None else 0
        if elapsed > 0.05:
            # Never below 0: the send queue can hold more than this reader sent (the previous file's
            # tail, or SSH's framing on the same connection), and a negative rate made drain() sleep
            # a negative time (ValueError, the uploader thread gone).
            self.rate = max(0.0, (self.sent - queued) / elapsed)
        # At most doubling per chunk: the kernel's buffers take the first bytes at once, so the early
        # rate is too high on a slow link; by the time it matters it has come down to the link's.
        target = max(self.MIN_CHUNK, int(self.rate * self.CHUNK_S)) if self.rate else self.FIRST_CHUNK
        cap = self.cap = min(target, 2 * self.cap)
        if self.bucket.rate > 0:
            # At most a second's worth per read: a slow limit must not starve the heartbeat.
            cap = min(cap, max(1024, int(min(self.bucket.burst, self.bucket.rate))))
        n = cap if n is None or n < 0 else min(n, cap)
        if self.sock is not None:
            self.drain(self.sock, cap)
        try:
            data = self.f.read(n)
        except OSError as e:
            raise LocalFileError(f"cannot read local bundle: {e.strerror or e}") from None
        if data:
            self.bucket.take(len(data))
            self.sent += len(data)
            if self.guard is not None:
                self.guard.moved()
            if self.progress is not None:
                self.progress(len(data))
        return data

    def drain(self, sock, limit: int = 0) -> None:
        """Wait until at most *limit* bytes queued on *sock* are not yet acknowledged by the peer,
        for as long as the queue keeps shrinking (the :class:`StallGuard` aborts a stalled one).

        Transports call it with *limit* 0 after the last chunk: on a slow link the send queue can
        hold many seconds of data, and a fixed reply timeout after the last write would time out a
        transfer that is still moving. :meth:`read` calls it before each chunk with a second of
        data as the limit (when the transport set :attr:`sock`): without it the kernel's send buffer
        (megabytes once autotuned) swallows the bundle at once, the measured rate means nothing,
        and a pause for fresh bundles could only come after the whole bundle had been queued."""
        if sock is None or sock.fileno() < 0:
            raise EOFError("connection closed")
        poll = select.poll()
        poll.register(sock, select.POLLERR | select.POLLHUP)  # not POLLIN: another thread may read it
        while (queued := in_flight(sock)) > limit:
            if self.guard is not None and self.guard.aborted:
                raise TransportError(f"no progress for {self.guard.timeout_s:g} s")
            # Wake about when the excess should have gone at the measured rate (microseconds on a
            # LAN, where a millisecond's nap per chunk would cost two thirds of the throughput).
            wait = min(0.05, (queued - limit) / self.rate) if self.rate else 0.001
            if wait < 0.001:
                time.sleep(wait)
                wait = 0.0
            if poll.poll(int(wait * 1000)):  # a reset leaves the queue as it was: never wait for it to drain
                try:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                except OSError:  # POLLNVAL: the library closed the socket after the reset
                    err = 0
                raise ConnectionResetError(err or errno.ECONNRESET, os.strerror(err or errno.ECONNRESET))


SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)  # Linux: the same ioctl number on a TCP socket (tcp(7))


def in_flight(sock) -> int:
    """Bytes queued on TCP socket *sock* that the peer has not acknowledged yet (0 if unknown or closed)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def shut(sock) -> None:
    """Shut *sock* down both ways from any thread: a call blocked on it in another thread returns."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class StallGuard:
    """Times a transfer out on lack of progress, never on its length, and keeps the heartbeat.

    The libraries block (ftplib's reply wait, paramiko's socket writes retry forever on a full send
    buffer), so a small thread watches the transfer: progress is a chunk read by the transport
    (:meth:`moved`) or the transport's ``in_flight()`` send queue shrinking (the link draining what
    was written). While the last progress is younger than *timeout_s* the thread sends the worker's
    heartbeat; after *timeout_s* without any it calls the transport's ``abort()`` once, which makes
    the blocked call fail, and the uploader retries (resuming). The heartbeat thus stays honest: a
    call that does not return even after the abort stops the beats, and the orchestrator kills the
    worker after ``heartbeat_timeout_s``. A heartbeat from the read callback alone would not do: a
    chunk at 10 KB/s, or the final wait for the server's confirmation, can take longer than that.
    """

    def __init__(self, beat, timeout_s: float, tick_s: float = 1.0):
        self.beat, self.timeout_s, self.tick_s = beat, timeout_s, min(tick_s, timeout_s / 4)
        self.transport = None
        self.aborted = False
        self.last = time.monotonic()
        self._queued = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by stop()
        self._active = threading.Event()  # set while a transfer is watched: an idle uploader never wakes
        self._thread: threading.Thread | None = None

    def moved(self) -> None:
        self.last = time.monotonic()

    def watch(self, transport) -> "StallGuard":
        """Context manager: watch *transport* for the duration of the block."""
        with self._lock:
            self.transport, self.aborted, self.last, self._queued = transport, False, time.monotonic(), 0
        self._active.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-stall-guard", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> "StallGuard":
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.transport = None
            self._active.clear()

    def stop(self) -> None:
        self._wake.set()
        self._active.set()

    def _run(self) -> None:
        while self._active.wait() and not self._wake.wait(self.tick_s):
            with self._lock:
                t = self.transport
                if t is None or self.aborted:
                    continue
                probe = getattr(t, "in_flight", None)  # S3 has none: its progress is the chunks read
                queued = (probe() or 0) if probe is not None else 0
                if queued < self._queued:
                    self.last = time.monotonic()
                self._queued = queued
                idle = time.monotonic() - self.last
                if idle < self.timeout_s:
                    self.beat()
                    continue
                self.aborted = True
            log.debug("no upload progress for %.0f s: aborting the connection", idle)
            t.abort()
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

    def part_size(self, remote: str) -> int | None:
        try:
            return self.size(remote)
        except FileNotFoundError:
            return None

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


def make_transport(up) -> Transport:
    """The transport for ``[upload] protocol`` (*up*: :class:`beemond.config.UploadConfig`), from
    :data:`beemond.registry.UPLOADS`: only its own module (and library) is imported. Raises
    ``ValueError`` for a protocol the table lacks."""
    return registry.lookup(registry.UPLOADS, up.protocol, "upload transport")(up)
