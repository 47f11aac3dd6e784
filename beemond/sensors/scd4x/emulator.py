"""Command-level emulation of a Sensirion SCD4x (SCD40/SCD41) behind :class:`EmulatedSMBus`.

The chip's state machine as the datasheet describes it (numbers from :mod:`.chip`, sections of the
SCD4x datasheet v1.3):

- idle / periodic measurement / single shot. start_periodic_measurement starts a measurement every
  5 s (3.5.1); stop_periodic_measurement returns to idle and the next command is taken 500 ms later
  (3.5.3); measure_single_shot (SCD41 only; an SCD40 NACKs it as an unknown command) has its result
  ready 5 s later (3.10.1). Commands not allowed during a periodic measurement (table 9) are NACKed.
- 3.3: a command or read header that arrives during the previous command's execution time is NACKed.
- get_data_ready_status answers ``0x8006`` when a measurement waits in the buffer and ``0x8000`` when
  not: the high bits are set on purpose, since only the low 11 bits mean anything (3.8.2).
- read_measurement (3.5.2) empties the buffer; with nothing in it, the read is NACKed. Every word of
  every response carries its CRC-8 (3.11).
- a write of anything but a 2-byte command (set_* commands with parameters are not emulated) is NACKed.

Values come from *source* (``() -> (CO2 ppm, °C, %RH, tag)``; :func:`emulated_chip` builds it), taken
when a measurement is read out (so a sequential replay serves each row to exactly one reading, however
long the daemon waited), and are encoded into words exactly as the chip would (:func:`chip.encode`).
``served`` lists the tags.

Fault injection for tests: ``nack_next`` (EREMOTEIO on the next N transfers), ``corrupt_next`` (flip a
bit in byte ``corrupt_byte`` of the next N read_measurement responses), ``reset()`` (a brown-out: back
to idle with an empty buffer).
"""

from __future__ import annotations

import errno
import os
import time

from beemond.sensors.scd4x import chip
from beemond.sensors.scd4x.source import RespirationCurve

STATUS_READY, STATUS_NOT_READY = 0x8006, 0x8000
SERIAL = (0x1F7A, 0xE8B0, 0x3B07)     # any 48-bit number; what get_serial_number answers


def _nack() -> OSError:
    return OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))


class SCD4xChip:
    def __init__(self, source, model: str = "scd41", clock=time.monotonic):
        if model not in chip.MODELS:
            raise ValueError(f"model must be scd40 or scd41, got {model!r}")
        self.source = source
        self.model = model
        self.clock = clock
        self.nack_next = 0
        self.corrupt_next = 0
        self.corrupt_byte = 0
        self.served: list = []           # tags of the values read out, in order
        self.commands: list[int] = []    # every command accepted, in order (tests)
        self.measurements = 0            # measurements read out
        self.reset()

    def reset(self) -> None:
        """Power-on state: idle, nothing in the buffer, no command in progress."""
        self.mode = "idle"               # "idle" | "periodic" | "single_shot"
        self._busy_until = 0.0           # end of the running command's execution time
        self._next_measurement = 0.0     # periodic: when the next measurement completes
        self._ready = False              # a measurement waits in the buffer
        self._response: bytes | None = None

    # ---- time
    def _update(self, now: float) -> None:
        if self.mode == "periodic" and now >= self._next_measurement:
            self._ready = True
            missed = int((now - self._next_measurement) // chip.SIGNAL_UPDATE_INTERVAL_S)
            self._next_measurement += (missed + 1) * chip.SIGNAL_UPDATE_INTERVAL_S
        elif self.mode == "single_shot" and now >= self._busy_until:
            self.mode, self._ready = "idle", True

    # ---- bus side
    def _fault(self) -> None:
        if self.nack_next > 0:
            self.nack_next -= 1
            raise _nack()

    def write(self, data: bytes) -> None:
        self._fault()
        now = self.clock()
        self._update(now)
        if now < self._busy_until or len(data) != 2:
            raise _nack()
        cmd = int.from_bytes(data, "big")
        if cmd not in chip.EXECUTION_S or (cmd == chip.MEASURE_SINGLE_SHOT and self.model != "scd41"):
            raise _nack()                # unknown to this chip
        if self.mode == "periodic" and cmd not in chip.DURING_MEASUREMENT:
            raise _nack()
        self.commands.append(cmd)
        self._busy_until = now + chip.EXECUTION_S[cmd]
        self._response = None
        if cmd == chip.START_PERIODIC_MEASUREMENT:
            self.mode, self._ready = "periodic", False
            self._next_measurement = now + chip.SIGNAL_UPDATE_INTERVAL_S
        elif cmd == chip.STOP_PERIODIC_MEASUREMENT:
            self.mode, self._ready = "idle", False
        elif cmd == chip.MEASURE_SINGLE_SHOT:
            self.mode, self._ready = "single_shot", False
        elif cmd == chip.REINIT:
            self._ready = False
        elif cmd == chip.GET_DATA_READY_STATUS:
            self._response = chip.pack_words(STATUS_READY if self._ready else STATUS_NOT_READY)
        elif cmd == chip.GET_SERIAL_NUMBER:
            self._response = chip.pack_words(*SERIAL)
        elif cmd == chip.READ_MEASUREMENT and self._ready:
            self._response = self._read_out()

    def _read_out(self) -> bytes:
        co2, t, rh, tag = self.source()
        out = chip.pack_words(*chip.encode(co2, t, rh))
        self._ready = False              # 3.5.2: the buffer is emptied upon read-out
        self.served.append(tag)
        self.measurements += 1
        if self.corrupt_next > 0:
            self.corrupt_next -= 1
            i = self.corrupt_byte
            out = out[:i] + bytes([out[i] ^ 0x01]) + out[i + 1:]
        return out

    def read(self, length: int) -> bytes:
        self._fault()
        now = self.clock()
        self._update(now)
        if now < self._busy_until or self._response is None:
            raise _nack()
        out, self._response = self._response[:length], None
        return out


def emulated_chip(sensor, replay) -> SCD4xChip:
    """The chip a simulated SCD4x sensor reads (:func:`beemond.sensors.seams.i2c_bus`): each read-out
    takes the replay's next row for temperature and humidity, and for CO2 the row's ``co2_ppm`` column
    when the replay names one, else the sensor's respiration curve (``co2_*`` keys, :mod:`.source`) at
    the row's time; ``served`` keeps each row's index."""
    curve = RespirationCurve(sensor.co2_low_ppm, sensor.co2_high_ppm, sensor.co2_peak_hour, sensor.co2_utc_offset_h)

    def source():
        row = replay.next_row()
        co2 = row.get("co2_ppm")
        return curve.co2_ppm(row.time) if co2 is None else co2, row.temperature_c, row.humidity_rh, row.index

    return SCD4xChip(source, model=sensor.model)
