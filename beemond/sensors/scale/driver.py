"""A hive scale that speaks a line protocol over a serial port (pyserial ``serial.Serial``).

Most weighing indicators with an RS-232 or USB serial output either stream one ASCII line per
conversion or answer a poll command with one line. Each line is matched against ``line_regex``
(named group ``value``, optional ``unit``; ``re.search``, so anchor it when the whole line must
match); the number is converted to kg (``kg``; ``g`` = 0.001 kg; ``lb`` = 0.45359237 kg exactly,
the international avoirdupois pound), and a line without a unit is in ``unit``.

One reading is the median of ``samples`` good lines (an outlier from a bump or a bee landing on the
platform does not move it), then::

    weight_kg = (raw_kg - tare_offset_kg) * calibration_factor
                - compensation_kg_per_c * (T - reference_temperature_c)

``raw_kg`` is the median as the scale reported it, in kg. ``tare_offset_kg`` is what the scale
shows with no hive on it (AppMAIS's ``weight_offset``, in kg) and ``calibration_factor`` the ratio
true kg / shown kg after taring (AppMAIS's ``weight_multiple``). If an old setup applied its
multiple before subtracting its offset (``raw * m - o``), use ``tare_offset_kg = o / m``.

Temperature compensation (load cells drift with temperature) uses the latest ``temperature_celsius``
of ``temperature_sensor`` (of its probe ``temperature_position`` for a DS18B20 sensor with several),
which the orchestrator forwards as ``sample`` commands. A temperature
older than ``max_temperature_age_s`` (or none yet) is never used: the reading is recorded
uncompensated, its ``temperature_c`` cell is empty, and the record's metadata lists it under
``uncompensated_rows`` with the reason.

Errors follow the polled-sensor lifecycle (``base.py``): a line that does not match, is cut short or
is not a finite number is counted (``garbage_lines``) and skipped, never used; no line within
``read_timeout_s``, too much garbage, or a vanished port (open fails, ``SerialException`` from a
USB unplug) fail the attempt with an ``OSError``: the port is closed, reopened on the next attempt
with backoff, and the reading is retried, then counted as missed. A scale that comes back (a
replugged USB adapter under the same udev name) is picked up without a restart; after
``MAX_CONSECUTIVE_FAILURES`` missed readings in a row the worker exits and is restarted.

Plausibility: a weight (after tare, calibration and compensation) outside ``min_kg``...``max_kg``
(default -5...300 kg: a hive on its stand weighs tens of kg; a little below zero is a tare drift,
far beyond either is a garbled or overflowing indicator, e.g. ``W: 1e38 kg``) is rejected and counted
by the polled worker (``beemond.sensors.base``): never recorded, never sent to the swarm detector.
A scale has no datasheet range of its own: set these to the platform's capacity.

CSV columns: ``weight_kg``, ``raw_kg``, ``temperature_c`` (used for compensation, empty if none),
``samples`` (good lines behind the median). Record metadata adds ``port``, ``unit``,
``tare_offset_kg``, ``calibration_factor``, ``samples``, ``garbage_lines`` (in this record's
readings), ``reconnects`` (since the worker started), ``compensation`` (settings,
``uncompensated_rows`` as inclusive 0-based row ranges, ``reasons``) when a temperature sensor is
set, and ``simulation`` or ``replay`` (rows sent) for the simulated backend.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import re
import statistics
import termios
import time

import serial

from beemond.errors import TransientSensorError
from beemond.sensors import seams
from beemond.sensors.base import PolledSensorWorker, ranges

log = logging.getLogger(__name__)

UNIT_KG = {"kg": 1.0, "kgs": 1.0, "g": 0.001, "lb": 0.45359237, "lbs": 0.45359237}


class ScaleError(TransientSensorError):
    """An attempt that gave no reading (timeout, garbage only); transient, retried by the worker."""


def parse_line(regex: re.Pattern, line: bytes, default_unit: str = "kg") -> float:
    """The weight in kg on one line from the scale. Raises ``ValueError`` for a line that is cut
    short (no newline), is not ASCII, does not match *regex*, or has an unknown unit or no finite
    number."""
    if not line.endswith(b"\n"):
        raise ValueError(f"partial line {line!r}")
    text = line.decode("ascii").strip()
    m = regex.search(text)
    if m is None:
        raise ValueError(f"no match: {text!r}")
    value = float(m.group("value"))
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    unit = (m.groupdict().get("unit") or default_unit).strip().lower()
    if unit not in UNIT_KG:
        raise ValueError(f"unknown unit {unit!r}: {text!r}")
    return value * UNIT_KG[unit]


def calibrate(raw_kg: float, tare_offset_kg: float, calibration_factor: float) -> float:
    """``(raw_kg - tare_offset_kg) * calibration_factor``, in kg."""
    return (raw_kg - tare_offset_kg) * calibration_factor


def compensate(weight_kg: float, temperature_c: float, kg_per_c: float, reference_c: float) -> float:
    """Remove a linear temperature drift: ``weight_kg - kg_per_c * (temperature_c - reference_c)``."""
    return weight_kg - kg_per_c * (temperature_c - reference_c)


class ScaleWorker(PolledSensorWorker):
    """A serial scale read every ``interval_s``; CSV records of (UTC time, kg, raw kg, °C, lines)."""

    columns = ("weight_kg", "raw_kg", "temperature_c", "samples")
    quantities = ("weight_kilograms", "", "", "")

    def __init__(self, cfg, sensor, channel):
        super().__init__(cfg, sensor, channel)
        self.limits = ((sensor.min_kg, sensor.max_kg),)   # the weight; raw_kg and °C: finite only
        self.regex = re.compile(sensor.line_regex)
        self.request = sensor.request_bytes()
        self.port: serial.Serial | None = None
        self.lost = False              # the port failed since it was last open
        self.reconnects = 0
        self.garbage = 0               # garbage lines not yet attributed to a reading
        self.temperature: tuple[float, float] | None = None   # (°C, monotonic time received)
        self._note: dict = {}
        self._uncompensated_why: str | None = None
        # Simulated: the emulator thread lives in this worker's process; the driver reads its pty
        # through serial.Serial like any serial device, so the simulated path is the hardware path.
        self.path, self.emulator = seams.serial_port(sensor, self.request)

    # ---- the port
    def _open(self) -> serial.Serial:
        if self.port is None:
            s = self.sensor
            path = self.path
            stopbits = {1.0: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2.0: serial.STOPBITS_TWO}
            self.port = serial.Serial(path, baudrate=s.baudrate, bytesize=s.bytesize, parity=s.parity,
                                      stopbits=stopbits[s.stopbits], timeout=s.read_timeout_s,
                                      write_timeout=s.read_timeout_s, exclusive=True)
            if self.lost:
                self.reconnects += 1
                log.info("scale back on %s (reconnect %d)", path, self.reconnects)
            self.lost = False
        return self.port

    def _drop_port(self, error: Exception) -> None:
        if self.port is not None:
            log.warning("scale port %s failed (%s); closing it, reopening on the next attempt", self.port.port, error)
            try:
                self.port.close()
            except (OSError, termios.error):
                pass
        self.port = None
        self.lost = True

    def _lines(self, port: serial.Serial) -> list[float]:
        """``samples`` good weights in kg, one per line; garbage is counted and skipped."""
        want = self.sensor.samples
        budget = 2 * want              # lines read before giving up on this attempt
        if not self.request:
            port.reset_input_buffer()  # streamed lines from before this reading are stale
            self._readline(port)       # the first line after the flush may be its tail: discard
        good: list[float] = []
        while len(good) < want:
            if budget == 0:
                raise ScaleError(errno.EBADMSG, f"only {len(good)} of {want} lines were usable")
            budget -= 1
            if self.request:
                port.reset_input_buffer()   # a late answer to an earlier poll is not this one
                port.write(self.request)
            line = self._readline(port)
            try:
                good.append(parse_line(self.regex, line, self.sensor.unit))
            except ValueError as e:  # (UnicodeDecodeError is one)
                self.garbage += 1
                log.debug("garbage line skipped: %s", e)
        return good

    def _readline(self, port: serial.Serial) -> bytes:
        self.channel.beat()  # a slow scale must not look like a hung worker
        line = port.read_until(b"\n", size=256)
        if not line:
            raise ScaleError(errno.ETIMEDOUT, f"no line from the scale within {self.sensor.read_timeout_s:g} s")
        return line

    # ---- PolledSensorWorker
    def read(self) -> tuple:
        try:
            values = self._lines(self._open())
        except OSError as e:  # serial.SerialException is an OSError too
            self._drop_port(e)
            raise
        except termios.error as e:  # tcflush on a port whose device is gone: EIO, not an OSError
            self._drop_port(e)
            raise OSError(*e.args) from e
        s = self.sensor
        raw = statistics.median(values)
        weight = calibrate(raw, s.tare_offset_kg, s.calibration_factor)
        temperature, why = self._fresh_temperature()
        if temperature is not None:
            weight = compensate(weight, temperature, s.compensation_kg_per_c, s.reference_temperature_c)
        if why != self._uncompensated_why:   # say it once when it starts and when it ends
            if why:  # (expected for the first readings after a start: the climate sensor's come later)
                log.log(logging.INFO if self.temperature is None else logging.WARNING,
                        "recording uncompensated weights: %s", why)
            elif self._uncompensated_why:
                log.info("temperature compensation resumed")
            self._uncompensated_why = why
        self._note = {"garbage": self.garbage, "uncompensated": why}
        self.garbage = 0
        return weight, raw, temperature, len(values)

    def _fresh_temperature(self) -> tuple[float | None, str | None]:
        """(°C to compensate with, None) or (None, why not); why is None when none is configured."""
        s = self.sensor
        if not s.temperature_sensor:
            return None, None
        if self.temperature is None:
            return None, f"no temperature from {s.temperature_sensor} yet"
        celsius, received = self.temperature
        age = time.monotonic() - received
        if age > s.max_temperature_age_s:
            return None, f"temperature from {s.temperature_sensor} is {age:.0f} s old"
        return celsius, None

    def on_sample(self, sample) -> None:   # an ipc.Sample
        if sample.sensor != self.sensor.temperature_sensor:
            return
        position = self.sensor.temperature_position
        if position and (sample.labels or {}).get("position") != position:
            return  # another probe of a DS18B20 sensor
        celsius = (sample.values or {}).get("temperature_celsius")
        if isinstance(celsius, (int, float)) and math.isfinite(celsius):
            self.temperature = (float(celsius), time.monotonic())

    def tag(self):
        note, self._note = self._note, {}
        if self.emulator is not None:  # what the emulated scale sent since the last reading
            sent = self.emulator.served[:]
            del self.emulator.served[:len(sent)]
            if self.sensor.replay is not None:
                note["rows_sent"] = ranges(sent)
        return note

    def format_row(self, reading: tuple) -> list[str]:
        weight, raw, temperature, n = reading
        return [f"{weight:.3f}", f"{raw:.3f}", "" if temperature is None else f"{temperature:.2f}", str(n)]

    def extra_metadata(self, readings: list[tuple]) -> dict:
        s = self.sensor
        tags = [t or {} for _, _, t in readings]
        meta = {"port": s.port if self.emulator is None else "emulated", "unit": s.unit,
                "tare_offset_kg": s.tare_offset_kg, "calibration_factor": s.calibration_factor,
                "samples": s.samples, "garbage_lines": sum(t.get("garbage", 0) for t in tags),
                "reconnects": self.reconnects}
        if s.temperature_sensor:
            skipped = [i for i, t in enumerate(tags) if t.get("uncompensated")]
            meta["compensation"] = {
                "temperature_sensor": s.temperature_sensor, "kg_per_c": s.compensation_kg_per_c,
                "reference_c": s.reference_temperature_c, "max_temperature_age_s": s.max_temperature_age_s,
                "uncompensated_rows": ranges(skipped),
                "reasons": sorted({tags[i]["uncompensated"] for i in skipped}),
            }
        if self.emulator is not None:
            if s.replay is not None:
                meta["replay"] = {"file": s.replay.file.name,
                                  "rows_sent": [r for t in tags for r in t.get("rows_sent", [])]}
            else:
                meta["simulation"] = {"synthetic": True, **dataclasses.asdict(self.emulator.source.sim)}
        return meta

    def close(self) -> None:
        if self.port is not None:
            self.port.close()
            self.port = None
        if self.emulator is not None:
            self.emulator.stop()

