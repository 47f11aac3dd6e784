"""Uploader worker: bundles in the spool's outbox to the lab's server, verified, exactly once.

Which bundle goes next: fresh ones (announced by watchdog as the aggregator renames them into the
outbox) before the backlog, bundles outside their upload window deferred (:mod:`beemond.upload.queues`).
One connection is kept open across files.

Per bundle: if a detached signature ``NAME.sig`` sits beside it (written before the bundle entered
the outbox), the signature goes first (skipped if already on the server at its size). Each file goes
to ``REMOTE.part``, resumed where a cut transfer left it, is checked by size and renamed to its final
path (:mod:`beemond.upload.transfer`; S3: one server-verified PUT). Only after the bundle's rename is
confirmed are the local signature and then the bundle deleted (or moved to the spool's ``uploaded/``
under ``keep_uploaded_bytes``) and the outbox fsynced. A power cut between rename and delete uploads the
bundle again: same name, replaced, so it still exists once on the server.

Slow links. A transfer times out only when it stops moving (``timeout_s`` without progress, see
:class:`beemond.upload.transport.StallGuard`, which also keeps the heartbeat while a library call
blocks), never on its length.

Interleaving. A large bundle must not hold back the small fresh ones (climate, alerts) for the hours
it takes at 10-20 KB/s. While a bundle is sent, the uploader looks for new outbox events between
chunks; once a fresh bundle smaller than what is left of the current one waits, and the current one
has been sent for at least ``INTERLEAVE_AFTER_S``, the transfer is paused (it ends normally, the
``.part`` keeps its bytes), the fresh bundles go, and the large one resumes where it stopped. A
pause costs one transfer's setup and a size check (FTP: ``PASV``, ``REST``, ``STOR``, ``SIZE``, a
data connection, about 200 bytes and 3-4 round trips, plus a TLS session resumption with FTPS; SFTP:
open, stat and close of a handle, about 300 bytes), about a second on a mobile link, once per
bundle window: no second connection (a second login, and two transfers halving each other's rate),
no split bundles for the lab to join.

Failures: a transient one closes the connection, puts the bundle back at the head of the backlog
and backs off exponentially with jitter (uniform in [d/2, d]), up to ``backoff_max_s``. A permanent one (the server
refuses the file: FTP 550/553, SFTP permission denied; or the local file cannot be read) is retried
once on a fresh connection, then the bundle is moved to the spool's ``quarantine/`` with an error line and
counted: never retried forever, never deleted.

The uploader is the only process that deletes from the outbox and from ``uploaded/``: retention and
the ``[daemon]`` spool limits are :mod:`beemond.upload.space`'s. A bundle a human deletes from the
outbox is forgotten with a warning, never quarantined or retried.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from beemond import ipc
from beemond.core import names
from beemond.core.clock import Backoff
from beemond.core.fsio import fsync_dir
from beemond.spool import SIG_SUFFIX, Spool, signature_of
from beemond.upload.queues import Queues, parse_window
from beemond.upload.space import SpaceKeeper
from beemond.upload.transfer import RESUME_MIN_BYTES, Transfers, size_of
from beemond.upload.transport import (BundleReader, LocalFileError, PermanentError, StallGuard, TokenBucket,
                                      TransportError, make_transport)
from beemond.worker import Worker

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class OutboxFile(ipc.Command):
    """From watchdog's thread to the run loop: a file appeared in (or was renamed into) the outbox."""

    kind: ClassVar[str] = "outbox_file"
    path: str


FILE_EVENT = OutboxFile.kind
INTERLEAVE_AFTER_S = 20.0   # a large transfer runs at least this long before fresh bundles may pause it
POLL_S = 1.0                # how often a running transfer looks for outbox events and commands


class Uploader(Worker, Queues, Transfers, SpaceKeeper):
    """The uploader worker. Its queues, transfers and spool limits are in the mixins' modules; the
    loop, the drain at shutdown and the handling of failures are here."""

    def __init__(self, cfg, channel: ipc.Channel, progress=None):
        self.cfg = cfg
        self.up = cfg.upload
        self.channel = channel
        self.progress = progress  # callable(bytes) for `beemond upload --backlog`'s progress bar
        self.spool = Spool(cfg.spool)
        self.outbox = self.spool.outbox
        self.uploaded_dir = self.spool.uploaded
        self.quarantine_dir = self.spool.quarantine
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.fresh: collections.deque[Path] = collections.deque()
        self.backlog: list[Path] = []
        self.deferred: list[Path] = []
        self.known: dict[Path, int] = {}  # bundles in the outbox not yet done -> size in bytes
        self.failures = 0
        self.next_try = 0.0
        self.window_check = 0.0
        self.strikes: dict[Path, int] = {}  # permanent errors per bundle (quarantined at the second)
        self.counts = collections.Counter()  # uploaded, bytes, quarantined, evicted, dropped, vanished, failures
        self.last_upload: float | None = None
        self.windows = {name: parse_window(spec) for name, spec in self.up.windows.items()}
        self.bucket = TokenBucket(self.up.rate_limit_bytes_per_s)
        self.transport = make_transport(self.up) if self.up.protocol != "none" else None
        self.guard = StallGuard(channel.beat, self.up.timeout_s)
        self.restart: set[Path] = set()  # bundles whose next attempt starts from byte 0 (a .part in doubt)
        self.begun: set[Path] = set()  # bundles whose transfer began (their signature may be up already)
        self.held: list[ipc.Command] = []  # commands that arrived during a transfer, for the run loop
        self.stopping = False  # a shutdown arrived during a transfer: pause it at the next chunk
        self.pause_at: float | None = None  # draining at shutdown: pause whatever runs at this time
        self._polled = 0.0
        self.interleave_after_s = INTERLEAVE_AFTER_S
        self._current: tuple[BundleReader, int] | None = None  # the transfer in progress, bytes it had to send
        self._sending: Path | None = None  # the bundle being sent (never dropped by the spool limits)
        self.observer = None
        self.kept: list[tuple[tuple[str, str], Path, int]] = []  # uploaded copies, oldest first
        self.kept_bytes = 0
        for p in self.spool.bundles(self.uploaded_dir):
            self._keep(p)
        self.limits_at = 0.0       # monotonic time of the next spool-limits check
        self.spool_full = False    # over a limit at the last check (one error when it starts, one line when it ends)
        self.orphans: dict[Path, float] = {}  # outbox signatures without their bundle -> monotonic time first seen

    def report(self) -> None:
        # files/bytes/last_upload as ipc.OUTBOX defines; the counts since start ride along for status.
        self.channel.send(ipc.OUTBOX, files=len(self.known), bytes=sum(self.known.values()),
                          last_upload=self.last_upload, quarantined=self.counts["quarantined"],
                          evicted=self.counts["evicted"])

    # ---- watchdog
    def _start_observer(self) -> None:
        """Watch the outbox for bundles the aggregator renames in (or a person copies in).

        Only creations and moves are asked of inotify (``event_filter``, which narrows the kernel's
        event mask): watchdog's default mask also reports every open, read, close and delete, so our
        own reads of the bundle being uploaded kept its emitter thread busy, and stopping the observer
        while that thread held one of those events made watchdog log "InotifyEmitter.queue_events()
        called when the thread is inactive" at ERROR (10 to 43 of 300 stops with a reader busy in the
        directory, 0 with the narrow mask: ``bench/clean_stops.py --observer-cycles 300``). A quiet emitter is blocked in its read and stops
        cleanly. It also spares a Pi a thread wake-up per read."""
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        commands = self.channel.commands

        class Handler(FileSystemEventHandler):
            # Runs in watchdog's thread: hand the path to the run loop through our own inbox.
            def on_moved(self, event):
                if not event.is_directory:
                    commands.put(OutboxFile(event.dest_path))

            def on_created(self, event):
                if not event.is_directory and not Path(event.src_path).name.startswith("."):
                    commands.put(OutboxFile(event.src_path))

        self.observer = Observer()
        self.observer.schedule(Handler(), str(self.outbox), recursive=False,
                               event_filter=[FileCreatedEvent, FileMovedEvent])
        self.observer.daemon = True
        self.observer.start()

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        if self.transport is None:
            log.info("upload protocol is none: bundles stay in %s", self.outbox)
            return
        self._start_observer()
        self.scan()

    def next_command(self, timeout: float) -> ipc.Command | None:
        return self.held.pop(0) if self.held else self.channel.receive(timeout)

    def timeout(self) -> float:
        if self.transport is None:
            return self._until_limits()
        now = time.monotonic()
        if self.fresh or self.backlog:
            timeout = max(0.0, self.next_try - now)
        elif self.deferred:
            timeout = max(0.0, self.window_check - now)
        else:
            timeout = 3600.0
        return min(timeout, self._until_limits())

    def on_shutdown(self, cmd: ipc.Shutdown) -> None:
        if self.transport is not None:
            self._stop_observer()  # drain() scans the outbox; events now would only race it
            self.drain()
        self.finished = True

    def on_outbox_file(self, cmd: OutboxFile) -> None:
        self._on_file(Path(cmd.path))

    def tick(self) -> None:
        if time.monotonic() >= self.limits_at:
            self.enforce_spool_limits()
        if self.transport is not None and self._pending() and time.monotonic() >= self.next_try:
            self.upload_next()

    def cleanup(self) -> None:
        if self.transport is not None:
            self._stop_observer()
            self.guard.stop()
            self.transport.close()

    def _until_limits(self) -> float:
        return max(0.0, self.limits_at - time.monotonic())

    def _stop_observer(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def drain(self) -> None:
        """At shutdown: keep uploading for up to ``shutdown_grace_s`` while the server answers."""
        deadline = time.monotonic() + self.up.shutdown_grace_s
        # A transfer still going at the deadline is paused, to resume at the next start.
        self.stopping, self.pause_at = False, deadline
        self.scan()
        if time.monotonic() < self.next_try:
            log.info("shutting down in backoff; %d bundle(s) stay in the outbox", len(self.known))
            return
        while (self.fresh or self.backlog) and time.monotonic() < deadline:
            if not self.upload_next():
                break
        log.info("shutting down; %d bundle(s) stay in the outbox for the next start", len(self.known))

    def upload_next(self) -> bool:
        """Upload the next bundle. False after a transient failure (now in backoff), else True."""
        path = self._next()
        if path is None:
            return True
        if not path.exists():
            self._vanished(path)
            return True
        try:
            self._upload(path)
        except FileNotFoundError as e:
            if path.exists():  # the server's "no such directory" (local transport), not our bundle
                return self._transient_or_refused(path, e)
            self._vanished(path)
            return True
        except (PermanentError, names.TemplateError) as e:  # TemplateError: the layout cannot name it
            return self._refused(path, e)
        except (TransportError, OSError, EOFError, *self.transport.errors) as e:
            return self._transient_or_refused(path, e)
        self.strikes.pop(path, None)
        if self.failures:
            log.info("upload link restored after %d failure(s)", self.failures)
            self.failures = 0
            self.scan()  # the secondary queue: anything an event did not announce during the outage
        return True

    def _transient_or_refused(self, path: Path, e: BaseException) -> bool:
        if self.transport.permanent(e):
            return self._refused(path, e)
        self._failed(path, e)
        return False

    def _vanished(self, path: Path) -> None:
        """*path* left the outbox before it was sent. Only this process deletes there, so someone did
        it by hand: forget it, nothing to retry or quarantine."""
        self.known.pop(path, None)
        self.begun.discard(path)
        self.strikes.pop(path, None)
        self.counts["vanished"] += 1
        log.warning("bundle %s left the outbox before it was uploaded (deleted by hand?); forgotten", path.name)
        self.report()

    def _failed(self, path: Path, e: BaseException) -> None:
        self.failures += 1
        self.counts["failures"] += 1
        delay = Backoff(self.up.backoff_initial_s, self.up.backoff_max_s).jittered(self.failures)
        self.next_try = time.monotonic() + delay
        log.warning("upload of %s to %s failed (%s: %s); retry %d in %.1f s", path.name,
                    self.transport.describe(), type(e).__name__, str(e).strip() or "-", self.failures, delay)
        self.channel.send(ipc.ERROR, message=f"upload failed: {type(e).__name__}: {str(e).strip()}")
        self.transport.close()
        self.backlog.insert(0, path)  # fresh first on the next try, but this one is not forgotten
        self.report()

    def _refused(self, path: Path, e: BaseException) -> bool:
        """A permanent error: once more on a fresh connection (a stale directory cache, a server
        restarted with other rules), then quarantine."""
        self.transport.close()
        self.strikes[path] = self.strikes.get(path, 0) + 1
        if self.strikes[path] < 2 and not isinstance(e, (LocalFileError, names.TemplateError)):
            log.warning("upload of %s refused (%s); trying once more on a new connection", path.name, str(e).strip())
            self.backlog.insert(0, path)
            return True
        self.strikes.pop(path, None)
        self.quarantine(path, f"{type(e).__name__}: {str(e).strip()}")
        return True

    def quarantine(self, path: Path, why: str) -> None:
        """Move a bundle (and its signature) to the spool's ``quarantine/`` for a human; never delete it."""
        self.quarantine_dir.mkdir(exist_ok=True)
        sig = signature_of(path)
        if sig.exists():
            os.replace(sig, self.quarantine_dir / sig.name)
        os.replace(path, self.quarantine_dir / path.name)
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.outbox)
        self.known.pop(path, None)
        self.begun.discard(path)
        self.counts["quarantined"] += 1
        log.error("quarantined %s in %s after a permanent failure (%s); %d bundle(s) quarantined so far",
                  path.name, self.quarantine_dir, why, self.counts["quarantined"])
        self.channel.send(ipc.ERROR, message=f"quarantined {path.name}: {why}")
        self.report()

    def _poll(self) -> None:
        """During a transfer: take in outbox events (they feed the fresh queue) and hold any other
        command (a shutdown, ...) for the run loop, which sees it as soon as the transfer returns."""
        now = time.monotonic()
        if now - self._polled < POLL_S:
            return
        self._polled = now
        commands = getattr(self.channel, "commands", None)
        while commands is not None:
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                break
            except (EOFError, OSError):
                self.stopping = True
                break
            if isinstance(cmd, OutboxFile):
                self._on_file(Path(cmd.path))
            else:
                self.held.append(cmd)
                self.stopping = self.stopping or (cmd.kind == ipc.SHUTDOWN and self.pause_at is None)
        if getattr(self.channel, "stop_requested", False) and self.pause_at is None:
            self.stopping = True
        if now >= self.limits_at:  # a transfer may last hours: the spool limits are not put off that long
            self.enforce_spool_limits(in_flight=self._sending)

    def _pause(self) -> bool:
        """Between two chunks of a bundle: stop here (to resume later) for a shutdown, or for a fresh
        bundle smaller than what is left of this one once this one had its ``INTERLEAVE_AFTER_S``."""
        self._poll()
        if self.stopping or (self.pause_at is not None and time.monotonic() >= self.pause_at):
            return True
        reader, total = self._current
        if time.monotonic() - reader.t0 < self.interleave_after_s:
            return False
        if not self.transport.resumable or self.known.get(self._sending, 0) < RESUME_MIN_BYTES:
            return False  # its next attempt starts from byte 0: fresh bundles keeping coming would starve it
        left = total - reader.sent
        return any(self.known.get(p, left) < left and self._window_open(p) for p in self.fresh)

    def _progress(self, n: int) -> None:
        self.channel.beat()
        if self.progress is not None:
            self.progress(n)

    def _upload(self, path: Path) -> None:
        with self.guard.watch(self.transport):
            self._upload_watched(path)

    def _upload_watched(self, path: Path) -> None:
        t0 = time.monotonic()
        if not self.transport.connected:
            self.transport.connect()
            log.info("connected to %s", self.transport.describe())
        remote = self.remote_path(path)
        self.transport.ensure_dir(remote.rsplit("/", 1)[0] or "/")
        sig = signature_of(path)
        has_sig = sig.exists()
        # The signature first: a bundle on the server is never without its signature. After a pause
        # it is there already (same name, same content: the names are idempotent).
        if has_sig and not (path in self.begun and self.transport.part_size(remote + SIG_SUFFIX) == size_of(sig)):
            self._send(sig, remote + SIG_SUFFIX)
        self.begun.add(path)
        self._sending = path
        try:
            size = self._send(path, remote, pausable=True)
        finally:
            self._sending = None
        if size is None:
            self.counts["paused"] += 1
            self.backlog.insert(0, path)  # after the fresh ones, before the rest of the backlog
            return
        # Confirmed on the server under its final name: only now may the local copies go.
        self._release(path, sig if has_sig else None)
        dt = time.monotonic() - t0
        self.known.pop(path, None)
        self.begun.discard(path)
        self.counts["uploaded"] += 1
        self.counts["bytes"] += size
        self.last_upload = time.time()
        log.info("uploaded %s (%d bytes, %.2f s) to %s", path.name, size, dt, remote)
        self.channel.send(ipc.UPLOADED, name=path.name, bytes=size, seconds=dt, remote=remote)
        self.enforce_retention()
        self.enforce_spool_limits()
        self.report()
