"""Messages between the orchestrator and its workers, and the worker side of them.

Down: one ``multiprocessing.Queue`` of :class:`Command` per worker (its feeder thread means the
orchestrator never blocks on a slow worker). Up: one pipe of :class:`Event` per worker. The design
sketch has one shared event queue; per-worker pipes are used instead because a shared queue's write
lock is a process-shared semaphore: a worker SIGKILLed while holding it would wedge every other
worker's events for good, and a torn message would corrupt the stream for all. A private pipe is
simply discarded with its dead worker. Only small messages travel; payloads are files in the spool.

Every message is a plain dataclass of built-in types, so the forkserver pickles it cheaply.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Command kinds (orchestrator -> worker)
START, STOP, CAPTURE_NOW, SHUTDOWN, RECORD_READY = "start", "stop", "capture_now", "shutdown", "record_ready"
# SAMPLE as a command: another sensor's reading, forwarded to the workers that subscribe to it
# (``SensorConfig.subscribes_to``), with the same data as the SAMPLE event.
# Event kinds (worker -> orchestrator)
HEARTBEAT, READY_EVENT, ERROR, BUNDLE_SEALED, UPLOADED = (
    "heartbeat", "record_ready", "error", "bundle_sealed", "uploaded")
# SAMPLE: one reading, ``data = {"sensor": name, "values": {quantity: value}}`` where a quantity is
# named with its base unit, as the metric will be ("temperature_celsius", "relative_humidity_percent",
# "weight_kilograms", "pressure_pascals", ...). Sent for every good reading; never for a failed one.
# A polled sensor adds ``"time"``: the reading's UTC time (s since the epoch), as in its record; without
# it the event's own time stands for the measurement's.
# CAPTURE_REQUEST: ``data = {"targets": [sensor names], "reason": str}``; the orchestrator sends
# CAPTURE_NOW to each running target (a GPIO button or PIR triggering a camera).
SAMPLE, CAPTURE_REQUEST = "sample", "capture_request"
# OUTBOX: the uploader's view of its queue, sent after each scan and upload:
# ``data = {"files": int, "bytes": int, "last_upload": unix time or None}`` (STATUS= lines, metrics).
OUTBOX = "outbox"
# ALERT: a processor's alarm, ``data = {"sensor": source sensor, "alert": kind ("swarm"), ...details}``
# (a warning in the log and a JSON record as well; counted in beemond_alerts_total).
ALERT = "alert"
# TELEMETRY: the telemetry worker's state (beemond.telemetry.worker): ``data = {"published": PUBACKs
# since the last event, "dropped": readings dropped since the last event, "buffered": readings not
# yet acknowledged, "connected": 0 or 1}``.
TELEMETRY = "telemetry"
# SAMPLE events may carry ``labels = {name: value}`` beside ``values``: extra metric labels for every
# value (a processor's ``band="100-300"``).


@dataclass
class Command:
    kind: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Event:
    kind: str
    worker: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class Channel:
    """A worker's end of its command queue and event pipe.

    :meth:`receive` doubles as the worker's clock: it returns a command or ``None`` after *timeout*
    seconds, sends a heartbeat whenever one is due, and turns SIGTERM or the orchestrator's death
    into a ``shutdown`` command, so a worker's run loop needs no other timer for liveness.
    """

    def __init__(self, name: str, commands, events, heartbeat_interval_s: float):
        self.name = name
        self.commands = commands
        self.events = events
        self.heartbeat_interval_s = heartbeat_interval_s
        self._broken = False
        self._last_beat = 0.0
        self._lock = threading.Lock()
        self.stop_requested = False

    def send(self, kind: str, **data: Any) -> None:
        with self._lock:
            try:
                self.events.send(Event(kind, self.name, data))
            except OSError:
                # EPIPE: the orchestrator is gone; the next receive() turns that into a shutdown.
                self._broken = True

    def beat(self) -> None:
        """Send a heartbeat if one is due. Long operations call this from their progress loops."""
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_interval_s:
            self._last_beat = now
            self.send(HEARTBEAT)

    def orphaned(self) -> bool:
        """True once the orchestrator died. Our parent process is the forkserver, which outlives it
        while any worker runs, so the sign is the event pipe: the heartbeat write fails with EPIPE."""
        return self._broken

    def receive(self, timeout: float) -> Command | None:
        self.beat()
        if self.stop_requested or self.orphaned():
            return Command(SHUTDOWN, {"reason": "signal" if self.stop_requested else "orchestrator gone"})
        # Never sleep past the next heartbeat, so a blocked wait cannot look like a hung worker.
        wait = max(0.0, min(timeout, self.heartbeat_interval_s - (time.monotonic() - self._last_beat)))
        try:
            return self.commands.get(timeout=wait)
        except queue.Empty:
            return None
        except (EOFError, OSError):
            return Command(SHUTDOWN, {"reason": "command queue closed"})


def worker_main(role: str, name: str, cfg, commands, events) -> None:
    """Entry point of every worker process (started by the orchestrator through the forkserver)."""
    from beemond import journal

    journal.setup(name, cfg.daemon.log_level)
    # Held shared until this process ends: a new orchestrator waits for it (see Spool.lock).
    from beemond.spool import Spool

    Spool(cfg.spool).hold_worker_lock()
    channel = Channel(name, commands, events, cfg.daemon.heartbeat_interval_s)

    def on_term(signum, frame):
        channel.stop_requested = True

    # Ctrl-C in a terminal reaches the whole process group; the orchestrator alone decides the
    # shutdown order (sensors flush first, then the aggregator seals, then the uploader drains).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        worker = _make_worker(role, name, cfg, channel)
        trim_heap()
        worker.run()
    except Exception as e:
        log.exception("worker failed: %s", e)
        channel.send(ERROR, message=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        try:
            events.close()
        except OSError:
            pass


def trim_heap() -> None:
    """Give the free memory at the top of the heap and in free pages back to the kernel (glibc's
    ``malloc_trim(0)``, malloc_trim(3)). A worker's start-up (imports, a replay file parsed, a
    driver opened) leaves freed blocks that glibc would otherwise keep for good: 0.5-2 MB PSS per
    process here (bench/footprint.py). A no-op where libc has no malloc_trim (musl)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _make_worker(role: str, name: str, cfg, channel: Channel):
    # Heavy imports (numpy, soundfile, pyrage, watchdog) happen here, in the worker that needs them,
    # never in the orchestrator or the forkserver.
    from beemond import registry

    if role == "sensor":
        sensor = next(s for s in cfg.sensors if s.name == name)
        return registry.lookup(registry.SENSORS, sensor.type, "sensor driver")(cfg, sensor, channel)
    if role == "processor":
        proc = next(p for p in cfg.processors if p.name == name)
        return registry.lookup(registry.PROCESSORS, proc.type, "processor")(cfg, proc, channel)
    return registry.lookup(registry.ROLES, role, "worker role")(cfg, channel)
