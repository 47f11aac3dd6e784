"""Uploader worker: bundles in ``spool/outbox/`` to the lab's server, verified, exactly once.

Two queues. **Fresh**: bundles announced by watchdog (inotify) events as the aggregator renames them
into the outbox; they go first, so a restored link delivers today's data before last week's.
**Backlog**: whatever a scan of the outbox finds (at start, when the link comes back, at shutdown), in
``backlog_order``. One connection is kept open across files.

Per bundle: upload to ``NAME.part``, compare the remote size with the local one, rename to the final
path (``[upload] layout``), and only then delete the local file and fsync the outbox. A failure closes
the connection, puts the bundle back in the backlog and backs off exponentially with full jitter, up to
``backoff_max_s``. Nothing is ever deleted that the server did not confirm.
"""

from __future__ import annotations

import collections
import ftplib
import logging
import random
import time
from pathlib import Path

from beemond import archive, ipc
from beemond.aggregator import BUNDLE_RE
from beemond.upload import TransportError, make_transport

log = logging.getLogger(__name__)

FILE_EVENT = "outbox_file"


class Uploader:
    def __init__(self, cfg, channel: ipc.Channel):
        self.cfg = cfg
        self.up = cfg.upload
        self.channel = channel
        self.outbox = Path(cfg.spool) / "outbox"
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.fresh: collections.deque[Path] = collections.deque()
        self.backlog: list[Path] = []
        self.queued: set[Path] = set()
        self.failures = 0
        self.next_try = 0.0
        self.transport = make_transport(cfg) if self.up.protocol != "none" else None
        self.observer = None

    # ---- queues
    def _on_file(self, path: Path) -> None:
        if BUNDLE_RE.match(path.name) and path.parent == self.outbox and path not in self.queued:
            self.queued.add(path)
            self.fresh.append(path)

    def scan(self) -> None:
        found = [p for p in self.outbox.iterdir() if BUNDLE_RE.match(p.name) and p not in self.queued]
        found.sort(key=lambda p: (BUNDLE_RE.match(p.name)["start"], p.name), reverse=self.up.backlog_order == "newest")
        self.backlog.extend(found)
        self.queued.update(found)
        if found:
            log.info("backlog: %d bundle(s) waiting in the outbox", len(found))

    def _next(self) -> Path | None:
        if self.fresh:
            return self.fresh.popleft()
        if self.backlog:
            return self.backlog.pop(0)
        return None

    def _pending(self) -> bool:
        return bool(self.fresh or self.backlog)

    # ---- watchdog
    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        commands = self.channel.commands

        class Handler(FileSystemEventHandler):
            # Runs in watchdog's thread: hand the path to the run loop through our own inbox.
            def on_moved(self, event):
                if not event.is_directory:
                    commands.put(ipc.Command(FILE_EVENT, {"path": event.dest_path}))

            def on_created(self, event):
                if not event.is_directory and not Path(event.src_path).name.startswith("."):
                    commands.put(ipc.Command(FILE_EVENT, {"path": event.src_path}))

        self.observer = Observer()
        self.observer.schedule(Handler(), str(self.outbox), recursive=False)
        self.observer.daemon = True
        self.observer.start()

    # ---- loop
    def run(self) -> None:
        if self.transport is None:
            log.info("upload protocol is none: bundles stay in %s", self.outbox)
            while (cmd := self.channel.receive(3600)) is None or cmd.kind != ipc.SHUTDOWN:
                pass
            return
        self._start_observer()
        self.scan()
        try:
            while True:
                now = time.monotonic()
                if self._pending():
                    timeout = max(0.0, self.next_try - now)
                else:
                    timeout = 3600.0
                cmd = self.channel.receive(timeout)
                if cmd is not None:
                    if cmd.kind == ipc.SHUTDOWN:
                        self._stop_observer()  # drain() scans the outbox; events now would only race it
                        self.drain()
                        return
                    if cmd.kind == FILE_EVENT:
                        self._on_file(Path(cmd.args["path"]))
                if self._pending() and time.monotonic() >= self.next_try:
                    self.upload_next()
        finally:
            self._stop_observer()
            self.transport.close()

    def _stop_observer(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def drain(self) -> None:
        """At shutdown: keep uploading for up to ``shutdown_grace_s`` while the server answers."""
        deadline = time.monotonic() + self.up.shutdown_grace_s
        self.scan()
        if time.monotonic() < self.next_try:
            log.info("shutting down in backoff; %d bundle(s) stay in the outbox", len(self.queued))
            return
        while self._pending() and time.monotonic() < deadline:
            if not self.upload_next():
                break
        left = len(self.queued)
        log.info("shutting down; %d bundle(s) stay in the outbox for the next start", left)

    def upload_next(self) -> bool:
        path = self._next()
        if path is None:
            return True
        self.queued.discard(path)
        if not path.exists():
            return True
        try:
            self._upload(path)
        except (TransportError, OSError, EOFError, ftplib.Error) as e:
            self.failures += 1
            delay = min(self.up.backoff_max_s, self.up.backoff_initial_s * 2 ** (self.failures - 1))
            delay = random.uniform(delay / 2, delay)  # jitter: a fleet of hives must not retry in step
            self.next_try = time.monotonic() + delay
            log.warning("upload of %s to %s failed (%s: %s); retry %d in %.1f s", path.name,
                        self.transport.describe(), type(e).__name__, str(e).strip() or "-", self.failures, delay)
            self.channel.send(ipc.ERROR, message=f"upload failed: {e}")
            self.transport.close()
            self.backlog.insert(0, path)  # fresh first on the next try, but this one is not forgotten
            self.queued.add(path)
            return False
        if self.failures:
            log.info("upload link restored after %d failure(s)", self.failures)
            self.failures = 0
            self.scan()  # the secondary queue: anything an event did not announce during the outage
        return True

    def remote_path(self, path: Path) -> str:
        m = BUNDLE_RE.match(path.name)
        start = m["start"]
        rel = archive.render_name(self.up.layout, host=m["host"], name=path.name, sensor=m["group"],
                                  group=m["group"], date=f"{start[0:4]}-{start[4:6]}-{start[6:8]}",
                                  start=start, ext="tar.age", end=start, metadata={}, _split_index=0)
        return self.transport.path(rel)

    def _upload(self, path: Path) -> None:
        t0 = time.monotonic()
        if not self.transport.connected:
            self.transport.connect()
            log.info("connected to %s", self.transport.describe())
        remote = self.remote_path(path)
        part = remote + ".part"
        self.transport.ensure_dir(remote.rsplit("/", 1)[0] or "/")
        local_size = path.stat().st_size
        self.transport.put(path, part, progress=self.channel.beat)
        remote_size = self.transport.size(part)
        if remote_size != local_size:
            raise TransportError(f"remote size {remote_size} != local size {local_size} for {part}")
        self.transport.rename(part, remote)
        # Confirmed on the server under its final name: only now may the local copy go.
        path.unlink()
        archive.fsync_dir(self.outbox)
        dt = time.monotonic() - t0
        log.info("uploaded %s (%d bytes, %.2f s) to %s", path.name, local_size, dt, remote)
        self.channel.send(ipc.UPLOADED, name=path.name, bytes=local_size, seconds=dt, remote=remote)
