"""``beemond upload --backlog``: upload the outbox in the foreground, with progress and a summary.

It refuses to run beside the daemon rather than cooperate: the daemon's uploader already works the
same backlog, and two uploaders on one outbox would race for each bundle. So it takes the daemon's
spool locks (:meth:`beemond.spool.Spool.lock`: ``.lock``, exclusive, and ``.workers.lock``, which old
workers hold shared) without waiting; if either is held it exits 75 (``EX_TEMPFAIL``) and says to stop the service. While
it runs, the daemon in turn refuses to start on that spool.

Transient failures back off as in the daemon; after ``MAX_FAILURES`` in a row it stops and leaves the
rest in the outbox. Bundles outside their upload window are left for later and listed as waiting.
"""

from __future__ import annotations

import sys
import time

from beemond import errors, ipc
from beemond.spool import Spool, SpoolBusy
from beemond.upload.uploader import Uploader

EX_TEMPFAIL = errors.EX_TEMPFAIL
MAX_FAILURES = 5


class ForegroundChannel:
    """The uploader's channel when there is no orchestrator: events go to the progress display."""

    def __init__(self, on_event):
        self.on_event = on_event

    def send(self, kind: str, **data) -> None:
        self.on_event(kind, data)

    def beat(self) -> None:
        pass


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """files done/total, bytes done/total, rate and ETA: one redrawn line on a terminal, else a plain
    line per file (journald, cron mail, a CI log)."""

    def __init__(self, out, tty: bool):
        self.out, self.tty = out, tty
        self.files = self.total_files = 0
        self.bytes = self.total_bytes = 0
        self.t0 = time.monotonic()
        self.drawn = 0.0

    def line(self) -> str:
        dt = max(1e-6, time.monotonic() - self.t0)
        rate = self.bytes / dt
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f} s" if eta != float("inf") else "-"
        return (f"{self.files}/{self.total_files} files  {_human(self.bytes)}/{_human(self.total_bytes)}  "
                f"{_human(rate)}/s  ETA {eta_s}")

    def on_bytes(self, n: int) -> None:
        self.bytes += n
        now = time.monotonic()
        if self.tty and now - self.drawn >= 0.2:
            self.drawn = now
            self.out.write("\r" + self.line().ljust(70))
            self.out.flush()

    def on_event(self, kind: str, data: dict) -> None:
        if kind == ipc.UPLOADED:
            self.files += 1
            msg = f"uploaded {data['name']} ({data['bytes']} bytes)"
        elif kind == ipc.ERROR:
            msg = data["message"]
        else:
            return
        if self.tty:
            self.out.write("\r" + msg.ljust(70) + "\n" + self.line())
        else:
            self.out.write(f"{msg}  [{self.line()}]\n")
        self.out.flush()


def upload_backlog(cfg, out=None) -> int:
    """Upload every bundle in the outbox now. Returns the exit status (0: nothing left that could go)."""
    out = out or sys.stderr
    if cfg.upload.protocol == "none":
        print("beemond: upload.protocol is none: nothing to upload to", file=out)
        return 1
    spool = Spool(cfg.spool)
    spool.outbox.mkdir(parents=True, exist_ok=True)
    try:
        locks = spool.lock(hold_workers=True)
    except SpoolBusy as e:
        print(f"beemond: a running beemond holds spool {cfg.spool} ({e.held}); its uploader is working this backlog "
              "already. Stop the service first (systemctl stop beemond) to upload in the foreground.", file=out)
        return EX_TEMPFAIL
    progress = Progress(out, out.isatty())
    up = Uploader(cfg, ForegroundChannel(progress.on_event), progress=progress.on_bytes)
    try:
        up.scan()
        progress.total_files, progress.total_bytes = len(up.known), sum(up.known.values())
        print(f"backlog: {progress.total_files} bundle(s), {_human(progress.total_bytes)} to "
              f"{up.transport.describe()}", file=out)
        while up.fresh or up.backlog:
            delay = up.next_try - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not up.upload_next() and up.failures >= MAX_FAILURES:
                break
    except KeyboardInterrupt:
        print("\ninterrupted; the rest stays in the outbox", file=out)
    finally:
        up.transport.close()
        locks.release()
    c = up.counts
    dt = time.monotonic() - progress.t0
    if progress.tty:
        out.write("\n")
    print(f"summary: uploaded {c['uploaded']} file(s), {_human(c['bytes'])} in {dt:.1f} s "
          f"({_human(c['bytes'] / max(dt, 1e-6))}/s); quarantined {c['quarantined']}; "
          f"waiting for their upload window {len(up.deferred)}; failed attempts {c['failures']}; "
          f"left in the outbox {len(up.known)}", file=out)
    return 0 if len(up.known) == len(up.deferred) else 1
