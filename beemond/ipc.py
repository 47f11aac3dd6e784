"""Messages between the orchestrator and its workers, and the worker side of them.

Down: one ``multiprocessing.Queue`` of commands per worker (its feeder thread means the orchestrator
never blocks on a slow worker). Up: one pipe of events per worker. The design sketch has one shared
event queue; per-worker pipes are used instead because a shared queue's write lock is a
process-shared semaphore: a worker SIGKILLed while holding it would wedge every other worker's events
for good, and a torn message would corrupt the stream for all. A private pipe is simply discarded
with its dead worker. Only small messages travel; payloads are files in the spool.

Every message is a frozen dataclass of built-in types, one class per kind: its ``kind`` (a class
attribute) is the name a worker's ``on_<kind>`` handler answers to (:mod:`beemond.worker`). Pickled by
reference to the class, a message costs the forkserver's pipe little more than its fields.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """A command or event. ``kind`` names it on the wire, in logs and in ``on_<kind>`` handlers."""

    kind: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The kind's own fields (an event's ``worker`` and ``time`` left out), for logs and JSON."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("worker", "time")}


# ---- commands (orchestrator -> worker)

@dataclass(frozen=True, slots=True)
class Command(Message):
    """Base of every command. Workers also queue their own commands to themselves (a watchdog or MQTT
    callback thread handing work to the run loop); those classes live beside their worker."""


@dataclass(frozen=True, slots=True)
class Request(Command):
    """A command that says who asked: *reason* ("beemond CLI", "gpio.door (button)", ...; logged)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Start(Request):
    """Resume after :class:`Stop` (``beemond resume``). Slots missed while stopped are not made up."""

    kind: ClassVar[str] = "start"


@dataclass(frozen=True, slots=True)
class Stop(Request):
    """Pause (``beemond pause``: a hive inspection): the open record is flushed and the device
    released; the process keeps running and beating."""

    kind: ClassVar[str] = "stop"


@dataclass(frozen=True, slots=True)
class CaptureNow(Request):
    """Take one capture or measurement now (a GPIO button or PIR asked for it)."""

    kind: ClassVar[str] = "capture_now"


@dataclass(frozen=True, slots=True)
class Shutdown(Command):
    """Finish: flush, seal or drain as the worker's role requires, then return from ``run``. Also
    made by :meth:`Channel.receive` itself on SIGTERM or once the orchestrator is gone."""

    kind: ClassVar[str] = "shutdown"
    reason: str = "command"


@dataclass(frozen=True, slots=True)
class RecordReady(Command):
    """To the aggregator or a processor: a record is durable in staging (or linked into the
    processor's ``processing/`` directory) at *path*; *sensor* wrote it ("" when not known)."""

    kind: ClassVar[str] = "record_ready"
    path: str
    sensor: str = ""


# ---- events (worker -> orchestrator)

@dataclass(frozen=True, slots=True, kw_only=True)
class Event(Message):
    """Base of every event: *worker* is the sender's name (filled in by :meth:`Channel.send`), *time*
    the UTC time the event stands for, in s since the epoch (when it was sent, unless the kind says
    otherwise)."""

    worker: str = ""
    time: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Event):
    """The worker is alive (at least every ``heartbeat_interval_s``)."""

    kind: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordWritten(Event):
    """A record is durable in ``staging/<sensor>/`` at *path*. The record's non-zero counters ride
    along for the metrics so the orchestrator never reads a sidecar: audio *overflows* (blocks),
    measurement *errors* and *missed* measurements, *rejected* implausible values (counts)."""

    kind: ClassVar[str] = "record_written"
    sensor: str
    path: str
    overflows: int = 0
    errors: int = 0
    missed: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Event):
    """Something failed (logged by the worker too). *spool*: a spool-limits error of the uploader,
    not an upload error; *stalls* / *errors*: a camera's cumulative stall and error counts."""

    kind: ClassVar[str] = "error"
    message: str
    spool: bool = False
    stalls: int | None = None
    errors: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleSealed(Event):
    """The aggregator sealed *records* records into the bundle at *path* (*bytes* long)."""

    kind: ClassVar[str] = "bundle_sealed"
    path: str
    records: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Uploaded(Event):
    """The server confirmed bundle *name* (*bytes* long, sent in *seconds* s) as *remote*."""

    kind: ClassVar[str] = "uploaded"
    name: str
    bytes: int
    seconds: float = 0.0
    remote: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample(Event):
    """One good reading (never sent for a failed one), also forwarded as a command to the workers
    that subscribe to *sensor* (``SensorConfig.subscribes_to``), to its processors and to telemetry.

    *values*: ``{quantity: value}``, a quantity named with its base unit as the metric will be
    (``temperature_celsius``, ``relative_humidity_percent``, ``weight_kilograms``, ``pressure_pascals``).
    *labels*: extra metric labels for every value (a processor's ``band="100-300"``). *time*: the
    reading's UTC time (s since the epoch) as in its record, where the sender knows it. *sensor* ""
    stands for the sending worker. *processor*:
    set by the orchestrator when it forwards a processor's reading to telemetry (its own series)."""

    kind: ClassVar[str] = "sample"
    sensor: str = ""
    values: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] | None = None
    processor: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureRequest(Event):
    """Ask for a capture: the orchestrator sends :class:`CaptureNow` to each running sensor of
    *targets* (a GPIO button or PIR triggering a camera)."""

    kind: ClassVar[str] = "capture_request"
    targets: list[str]
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbox(Event):
    """The uploader's view of its queue after each scan and upload: *files* and *bytes* waiting,
    *last_upload* (UTC s since the epoch, or None), *quarantined* and *evicted* bundles since start."""

    kind: ClassVar[str] = "outbox"
    files: int
    bytes: int
    last_upload: float | None = None
    quarantined: int = 0
    evicted: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert(Event):
    """A processor's alarm about *sensor*'s data, of kind *alert* (``"swarm"``) with its *details*;
    a warning in the log and a JSON record as well; counted in ``beemond_alerts_total``. Forwarded to
    telemetry like :class:`Sample`."""

    kind: ClassVar[str] = "alert"
    sensor: str
    alert: str
    details: dict[str, Any] = field(default_factory=dict)
    processor: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry(Event):
    """The telemetry worker's state (beemond.telemetry.worker): *published* readings (PUBACKs) and
    *dropped* readings since its last event, *buffered* readings not yet acknowledged, *connected*
    0 or 1."""

    kind: ClassVar[str] = "telemetry"
    published: int = 0
    dropped: int = 0
    buffered: int = 0
    connected: int = 0


EVENTS: dict[str, type[Event]] = {cls.kind: cls for cls in (
    Heartbeat, RecordWritten, Error, BundleSealed, Uploaded, Sample, CaptureRequest, Outbox, Alert, Telemetry)}

# The kinds' names, for comparisons (``ev.kind == ipc.ERROR``) and for Channel.send(kind, **fields).
START, STOP, CAPTURE_NOW, SHUTDOWN, RECORD_READY = (
    Start.kind, Stop.kind, CaptureNow.kind, Shutdown.kind, RecordReady.kind)
HEARTBEAT, READY_EVENT, ERROR, BUNDLE_SEALED, UPLOADED = (
    Heartbeat.kind, RecordWritten.kind, Error.kind, BundleSealed.kind, Uploaded.kind)
SAMPLE, CAPTURE_REQUEST, OUTBOX, ALERT, TELEMETRY = (
    Sample.kind, CaptureRequest.kind, Outbox.kind, Alert.kind, Telemetry.kind)


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

    def send(self, event: Event | str, **fields: Any) -> None:
        """Send *event*, or the event of kind *event* (a name from :data:`EVENTS`) made from *fields*
        (``TypeError`` for a field the kind does not have); *worker* is filled in with this worker's
        name."""
        if isinstance(event, str):
            event = EVENTS[event](worker=self.name, **fields)
        elif not event.worker:
            event = dataclasses.replace(event, worker=self.name)
        with self._lock:
            try:
                self.events.send(event)
            except OSError:
                # EPIPE: the orchestrator is gone; the next receive() turns that into a shutdown.
                self._broken = True

    def beat(self) -> None:
        """Send a heartbeat if one is due. Long operations call this from their progress loops."""
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_interval_s:
            self._last_beat = now
            self.send(HEARTBEAT)

    def pending(self) -> bool:
        """True when a command waits or a stop was asked for: a long wait inside a measurement gives
        up (see ``sensors.base.MeasurementInterrupted``) so that stop, pause and shutdown never wait
        for a measurement. ``Queue.empty()`` may lag a put by a moment; the next wait slice sees it."""
        try:
            return self.stop_requested or self._broken or not self.commands.empty()
        except (OSError, ValueError):
            return True

    def orphaned(self) -> bool:
        """True once the orchestrator died. Our parent process is the forkserver, which outlives it
        while any worker runs, so the sign is the event pipe: the heartbeat write fails with EPIPE."""
        return self._broken

    def receive(self, timeout: float) -> Command | None:
        self.beat()
        if self.stop_requested or self.orphaned():
            return Shutdown("signal" if self.stop_requested else "orchestrator gone")
        # Never sleep past the next heartbeat, so a blocked wait cannot look like a hung worker.
        wait = max(0.0, min(timeout, self.heartbeat_interval_s - (time.monotonic() - self._last_beat)))
        try:
            return self.commands.get(timeout=wait)
        except queue.Empty:
            return None
        except (EOFError, OSError):
            return Shutdown("command queue closed")


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
