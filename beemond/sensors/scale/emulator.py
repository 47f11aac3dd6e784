"""A serial hive scale on a pseudo-terminal, and the weights it reports.

:class:`ScaleEmulator` opens a pty pair (``os.openpty`` + ``tty.setraw``, TESTBED.md "Serial") and
speaks a scale's line protocol on the master side; the driver opens the slave side with
``serial.Serial`` exactly as it opens a USB serial adapter. Two modes, as real indicators have:

- streamed (``request=b""``): one line every ``period_s``;
- request/response: one line for each ``request`` bytes received (e.g. ``b"W\\r\\n"``).

Lines are ``line_format.format(kg=..., g=..., lb=...)``, by default ``"W: 42.315 kg\\r\\n"``. Like a
UART with nobody listening, a line that does not fit the pty's buffer is dropped (``dropped``).

``link`` gives the device a stable name (as udev's ``/dev/beemond-scale``), so a test can
:meth:`unplug` it (remove the link, close the pty: an open driver gets ``EIO``) and :meth:`plug` it
back (a new pty, the same link). :meth:`inject` replaces the next lines with raw garbage.

Weights come from a *source* callable ``() -> (kg, tag)``: :class:`SyntheticHiveWeight` or
:class:`WeightReplay`, both deterministic.
"""

from __future__ import annotations

import math
import os
import random
import select
import threading
import time
import tty
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path

from beemond.sensors.replay import _parse_time
from beemond.sensors.scale.weights import weight_replay

LB_KG = 0.45359237   # the international avoirdupois pound, exactly


class ScaleEmulator:
    def __init__(self, source, *, link: Path | None = None, request: bytes = b"",
                 line_format: str = "W: {kg:.3f} kg\r\n", period_s: float = 0.1):
        self.source = source
        self.link = Path(link) if link is not None else None
        self.request = request
        self.line_format = line_format
        self.period_s = period_s
        self.served: list = []          # tags of the weights sent, in order
        self.requests = 0
        self.dropped = 0
        self._garbage: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    # ---- the device
    @property
    def path(self) -> str:
        """What the driver opens: the link, or the pty's own name when there is none."""
        if self.link is not None:
            return str(self.link)
        with self._lock:
            if self._slave is None:
                raise RuntimeError("the scale is unplugged")
            return os.ttyname(self._slave)

    @property
    def plugged(self) -> bool:
        return self._master is not None

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        with self._lock:
            self._master, self._slave = master, slave
            if self.link is not None:  # atomic: a reader never sees a half-made link
                tmp = self.link.with_name(self.link.name + ".new")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(os.ttyname(slave))
                os.replace(tmp, self.link)
        self._wake()

    def unplug(self) -> None:
        with self._lock:
            if self.link is not None:
                self.link.unlink(missing_ok=True)
            for fd in (self._master, self._slave):
                if fd is not None:
                    os.close(fd)
            self._master = self._slave = None
        self._wake()

    def inject(self, *lines: bytes) -> None:
        """Send these raw bytes in place of the next weight lines (one reading line each)."""
        self._garbage.extend(lines)

    # ---- lifecycle
    def start(self) -> "ScaleEmulator":
        if not self.plugged:
            self.plug()
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(self._wake_r,), name="scale-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._thread = None
        self.unplug()

    def _wake(self) -> None:
        """Interrupt the thread's select (it then re-reads the state): no polling while idle."""
        if self._thread is not None:
            os.write(self._wake_w, b"!")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the scale's firmware
    def _line(self) -> bytes:
        if self._garbage:
            return self._garbage.popleft()
        kg, tag = self.source()
        self.served.append(tag)
        return self.line_format.format(kg=kg, g=kg * 1000.0, lb=kg / LB_KG).encode("ascii")

    def _send(self, fd: int, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(fd, data):]
        except BlockingIOError:
            self.dropped += 1

    def _run(self, wake: int) -> None:
        pending = b""
        next_line = time.monotonic()
        while not self._stop.is_set():
            fd = self._master
            watch = [wake] if fd is None else [fd, wake]
            # request mode and unplugged: sleep until a request or a wake-up; streamed: until the next line
            wait = None if fd is None or self.request else max(0.0, next_line - time.monotonic())
            try:
                readable, _, _ = select.select(watch, [], [], wait)
            except (OSError, ValueError):   # the pty was closed by unplug() meanwhile
                continue
            if wake in readable:
                os.read(wake, 64)
            if fd is None:
                pending = b""
                continue
            with self._lock:
                if self._master != fd:       # unplugged (and maybe replugged) meanwhile
                    continue
                if fd in readable:
                    try:
                        pending = (pending + os.read(fd, 256))[-256:]
                    except OSError:         # EIO while no one has the slave side open
                        pass
                if self.request:
                    while self.request in pending:
                        pending = pending.split(self.request, 1)[1]
                        self.requests += 1
                        self._send(fd, self._line())
                elif time.monotonic() >= next_line:
                    self._send(fd, self._line())
                    next_line = max(next_line + self.period_s, time.monotonic() - self.period_s)


class SyntheticHiveWeight:
    """A plausible, deterministic hive weight in kg: SYNTHETIC, not measured (shared/data has no
    weight data set).

    ``w(t) = base_kg + trend_kg_per_day * days - daily_swing_kg * f(hour) + N(0, noise_kg)``, where
    ``f`` is 0 at night and ``sin(pi * (hour - 6) / 14)`` from 06:00 to 20:00 UTC (foragers leave in
    the morning and return by evening, so the hive is lightest early in the afternoon), and the
    trend is a slow nectar flow. Simulated time starts at ``start`` (default: now) and runs
    ``speedup`` times faster than the monotonic clock; the noise comes from ``random.Random(seed)``,
    so equal settings give equal weights for equal times.
    """

    def __init__(self, sim, clock=time.monotonic):
        self.sim = sim
        self.clock = clock
        self.t0 = _parse_time(sim.start) if sim.start else datetime.now(timezone.utc)
        self.mono0 = clock()
        self.rng = random.Random(sim.seed)

    def now(self) -> datetime:
        return self.t0 + timedelta(seconds=(self.clock() - self.mono0) * self.sim.speedup)

    def mean_at(self, t: datetime) -> float:
        """The noise-free weight in kg at simulated time *t*."""
        days = (t - self.t0).total_seconds() / 86400.0
        hour = t.hour + t.minute / 60.0 + t.second / 3600.0
        foraging = math.sin(math.pi * (hour - 6.0) / 14.0) if 6.0 <= hour <= 20.0 else 0.0
        return self.sim.base_kg + self.sim.trend_kg_per_day * days - self.sim.daily_swing_kg * foraging

    def __call__(self) -> tuple[float, str]:
        t = self.now()
        return self.mean_at(t) + self.rng.gauss(0.0, self.sim.noise_kg), t.strftime("%Y-%m-%dT%H:%M:%SZ")


class WeightReplay:
    """Weights from a CSV, paced by :class:`CsvReplay` (``speedup = 0``: one row per line sent)."""

    def __init__(self, rc):
        self.replay = weight_replay(rc)

    def __call__(self) -> tuple[float, int]:
        row = self.replay.next_row()
        return row.weight_kg, row.index


def serial_source(sensor):
    """What a simulated scale weighs (:func:`beemond.sensors.seams.serial_port`): its ``[replay]``
    file, else the synthetic hive weight of its ``[simulation]``."""
    return WeightReplay(sensor.replay) if sensor.replay is not None else SyntheticHiveWeight(sensor.simulation_or_default())
