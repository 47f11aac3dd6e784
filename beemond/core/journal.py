"""Logging for a terminal or for journald.

Under systemd (``$JOURNAL_STREAM`` names our stderr) each line starts with the syslog priority in
angle brackets (``<6>`` info, ``<4>`` warning, ...; sd-daemon(3)) and carries no timestamp, because
journald adds its own. Elsewhere lines are human-readable with a UTC timestamp. Every process logs
under its worker name (``orchestrator``, ``hive_climate``, ``aggregator``, ...).
"""

from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def under_journald(stream=None) -> bool:
    """True when *stream* (default stderr) is the journal stream systemd gave us."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value or ":" not in value:
        return False
    stream = stream or sys.stderr
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup(worker: str, level: str = "info") -> None:
    """Configure the root logger of this process to write to stderr under *worker*'s name."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter(f"{worker}: %(message)s"))
    else:
        fmt = logging.Formatter(f"%(asctime)s.%(msecs)03dZ {worker} %(levelname)s %(message)s",
                                datefmt="%Y-%m-%dT%H:%M:%S")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # watchdog and the FTP library log at DEBUG per event; keep them out unless asked.
    for noisy in ("watchdog", "jinja2"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
