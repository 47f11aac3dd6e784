"""The uploader's queues: which bundle goes next.

**Fresh**: bundles announced by watchdog (inotify) events as the aggregator renames them into the
outbox; they go first, so a restored link delivers today's data before last week's. **Backlog**:
whatever a scan of the outbox finds (at start, when the link comes back, at shutdown) and failed
retries, in ``backlog_order``. **Deferred**: bundles of a sensor outside its upload window
(``[upload.windows]``); they wait while the others go, and rejoin the backlog when it opens.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from pathlib import Path

from beemond.spool import BUNDLE_RE

# The uploader's own logger: these are its lines, whichever module holds the code.
log = logging.getLogger("beemond.upload.uploader")

WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def parse_window(spec: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (local time) -> (start, end) in minutes after midnight; end may be 24:00.

    A window whose end is before its start spans midnight (``"22:00-06:00"``). Raises ``ValueError``.
    """
    m = WINDOW_RE.match(spec.strip())
    if not m or (m[3] == "24" and m[4] != "00"):
        raise ValueError(f"must be \"HH:MM-HH:MM\" in local time (e.g. \"22:00-06:00\"), got {spec!r}")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ValueError(f"an empty window {spec!r}; omit the sensor to upload at any time")
    return start, end


WINDOW_RECHECK_S = 60.0


def sort_key(path: Path) -> tuple[str, str]:
    """Bundles in time order: by start (from the name), then name."""
    m = BUNDLE_RE.match(path.name)
    return (m["start"] if m else "", path.name)


def in_window(window: tuple[int, int], now: datetime.datetime) -> bool:
    """Is local time *now* inside *window* (minutes after midnight, see ``config.parse_window``)?"""
    start, end = window
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start < end else (minute >= start or minute < end)


class Queues:
    """Part of :class:`beemond.upload.uploader.Uploader` (a mixin): the fresh, backlog and deferred
    queues. Uses the uploader's ``fresh``, ``backlog``, ``deferred``, ``known`` (bundle -> bytes),
    ``windows``, ``window_check``, ``outbox``, ``up`` and ``report()``."""

    def _add(self, path: Path) -> bool:
        if path in self.known or path.parent != self.outbox or not BUNDLE_RE.match(path.name):
            return False  # a .sig is never a bundle of its own: it travels with its bundle
        try:
            self.known[path] = path.stat().st_size
        except OSError:
            return False
        return True

    def _on_file(self, path: Path) -> None:
        if self._add(path):
            self.fresh.append(path)
            self.report()

    def scan(self) -> None:
        found = [p for p in self.outbox.iterdir() if self._add(p)]
        if found:
            self.backlog = sorted(self.backlog + found, key=sort_key, reverse=self.up.backlog_order == "newest")
            log.info("backlog: %d bundle(s) waiting in the outbox", len(found))
        self.enforce_retention()
        self.report()

    def _window_open(self, path: Path) -> bool:
        window = self.windows.get(BUNDLE_RE.match(path.name)["group"])
        return window is None or in_window(window, datetime.datetime.now())

    def _next(self) -> Path | None:
        if self.deferred and time.monotonic() >= self.window_check:
            self.backlog = sorted(self.backlog + self.deferred, key=sort_key, reverse=self.up.backlog_order == "newest")
            self.deferred = []
        while self.fresh or self.backlog:
            path = self.fresh.popleft() if self.fresh else self.backlog.pop(0)
            if path not in self.known:
                continue  # dropped by the spool limits meanwhile
            if self._window_open(path):
                return path
            if not self.deferred:
                self.window_check = time.monotonic() + WINDOW_RECHECK_S
            self.deferred.append(path)
        return None

    def _pending(self) -> bool:
        return bool(self.fresh or self.backlog or (self.deferred and time.monotonic() >= self.window_check))
