"""Sensirion SCD4x (SCD40/SCD41) CO2, temperature and humidity driver over I2C.

The SCD4x has 16-bit commands and no register pointer, so every exchange is raw ``smbus2.i2c_msg``
transfers through ``i2c_rdwr`` (SMBus block reads would send a register byte first): a write of the
command, the command's execution time (datasheet 3.3, table 9), then a separate read of ``3 * words``
bytes, each word checked against its CRC-8 (3.11). Numbers and sections: :mod:`.chip`.

Two ways to measure (datasheet 3.5 and 3.10):

- ``periodic`` (SCD40 and SCD41): the sensor measures every 5 s on its own; each reading waits until
  get_data_ready_status says a new measurement is in the buffer, then read_measurement empties it. A
  sensor that reset (a brown-out) is back in idle and never gets ready: after one signal update interval
  and a margin the wait fails with ``ETIMEDOUT`` and the next reading starts the periodic mode again.
- ``single_shot`` (SCD41 only): measure_single_shot, 5 s, read_measurement. The sensor is idle between
  readings, so its supply can be switched off (``power_pin``).

The bus is anything ``smbus2.SMBus``-compatible: ``/dev/i2c-N`` on a Pi, or
:class:`beemond.sensors.emulated_i2c.EmulatedSMBus` with :class:`.emulator.SCD4xChip` behind it, which
:func:`beemond.sensors.seams.i2c_bus` gives a simulated sensor.

:class:`SCD4xWorker` records (UTC time, CO2 ppm, °C, %RH). Plausibility (``limits``, checked and counted
by :class:`beemond.sensors.base.PolledSensorWorker`): CO2 1...40 000 ppm (the output range, datasheet
page 1; a CO2 word of 0 is no measurement: Sensirion's arduino-i2c-scd4x usage example skips it as an
"invalid sample"), -10...60 °C and 0...100 %RH (the measurement ranges, datasheet 1.2 and 1.3). A
reading outside is rejected whole and never recorded.
"""

from __future__ import annotations

import errno
import os
import time

from smbus2 import i2c_msg

from beemond.sensors.base import I2CWorker, MeasurementInterrupted
from beemond.sensors.scd4x import chip

READY_POLL_S = 0.1          # get_data_ready_status cadence while waiting (one 3-byte read each)
READY_MARGIN_S = 1.0        # beyond one signal update interval before a wait gives up
WAIT_SLICE_S = 0.1          # a long wait (5 s single shot) is cut into slices that heartbeat and look for commands


class SCD4x:
    """One SCD4x at *address* on *bus*.

    *sleep* and *monotonic* are the time functions every wait uses (a test passes a virtual clock's);
    *pause* (default: *sleep*) is the wait between two data-ready polls, the one wait that may raise to
    give up a measurement: a command's execution time is always waited out, or the next command would
    be NACKed (3.3).
    Bus errors surface as ``OSError`` (``EREMOTEIO`` for a NACK, ``ENXIO`` for no chip);
    :class:`chip.CRCError` (an ``OSError``) for a corrupted word; ``OSError(ETIMEDOUT)`` for a
    measurement that never became ready. All are transient: the caller may retry.
    """

    def __init__(self, bus, address: int = chip.ADDRESS, sleep=time.sleep, monotonic=time.monotonic, pause=None):
        self.bus = bus
        self.address = address
        self.sleep = sleep
        self.monotonic = monotonic
        self.pause = pause

    # ---- one command (datasheet 3.3 sequence types)
    def send(self, command: int) -> None:
        """"send command": write it, then wait its execution time."""
        self.bus.i2c_rdwr(i2c_msg.write(self.address, list(chip.command_bytes(command))))
        wait = chip.EXECUTION_S.get(command, 0.0)
        if wait:
            self.sleep(wait)

    def read_words(self, command: int, what: str) -> list[int]:
        """"read": the command, its execution time, then its words with their CRCs checked."""
        self.send(command)
        msg = i2c_msg.read(self.address, 3 * chip.RESPONSE_WORDS[command])
        self.bus.i2c_rdwr(msg)
        return chip.unpack_words(bytes(msg), what)

    # ---- datasheet commands
    def start_periodic_measurement(self) -> None:
        self.send(chip.START_PERIODIC_MEASUREMENT)

    def stop_periodic_measurement(self) -> None:
        """Back to idle; the sensor takes the next command 500 ms later (3.5.3), which this waits."""
        self.send(chip.STOP_PERIODIC_MEASUREMENT)

    def data_ready(self) -> bool:
        return chip.data_ready(self.read_words(chip.GET_DATA_READY_STATUS, "get_data_ready_status")[0])

    def read_measurement_raw(self) -> tuple[int, int, int]:
        """The three words of read_measurement (CO2, T, RH ticks); the sensor NACKs when none is ready."""
        co2, t, rh = self.read_words(chip.READ_MEASUREMENT, "read_measurement")
        return co2, t, rh

    def read_measurement(self) -> tuple[float, float, float]:
        """(CO2 ppm, temperature °C, relative humidity %RH), datasheet 3.5.2."""
        return chip.convert(*self.read_measurement_raw())

    def measure_single_shot(self) -> None:
        """SCD41: start one measurement and wait its 5 s (3.10.1). An SCD40 NACKs the command."""
        self.send(chip.MEASURE_SINGLE_SHOT)

    def serial_number(self) -> int:
        """The 48-bit serial number (idle mode only): a presence check that needs no measurement."""
        a, b, c = self.read_words(chip.GET_SERIAL_NUMBER, "get_serial_number")
        return a << 32 | b << 16 | c

    def wait_data_ready(self, timeout_s: float) -> None:
        """Poll get_data_ready_status until it is set. Raises ``OSError(ETIMEDOUT)`` after *timeout_s*."""
        deadline = self.monotonic() + timeout_s
        while not self.data_ready():
            if self.monotonic() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"SCD4x at 0x{self.address:02x}: no measurement ready after "
                                               f"{timeout_s:g} s ({os.strerror(errno.ETIMEDOUT)})")
            (self.pause or self.sleep)(READY_POLL_S)


class SCD4xReader:
    """Readings from one :class:`SCD4x` in *mode* (``"periodic"`` or ``"single_shot"``).

    :meth:`measure` returns (CO2 ppm, temperature °C, relative humidity %RH) and raises ``OSError`` as
    :class:`SCD4x` does. After any error but a CRC mismatch (bus noise: the sensor still measures) the
    sensor is stopped and started again before the next reading, so one that lost power, or was left
    measuring by an earlier run, recovers without a restart of ours.
    """

    def __init__(self, device: SCD4x, mode: str = "periodic"):
        if mode not in chip.MODES:
            raise ValueError(f"mode must be one of {', '.join(chip.MODES)}, got {mode!r}")
        self.device = device
        self.mode = mode
        self.started = False        # periodic mode: started by us and not failed since

    def begin(self) -> None:
        """Put the sensor in a known state: stop any periodic measurement (an earlier run's, or one the
        sensor kept across our restart), then start ours in periodic mode."""
        self.started = False
        self.device.stop_periodic_measurement()
        if self.mode == "periodic":
            self.device.start_periodic_measurement()
            self.started = True

    def measure(self) -> tuple[float, float, float]:
        try:
            if self.mode == "single_shot":
                if not self.started:
                    self.begin()        # idle, whatever the sensor was doing
                    self.started = True
                self.device.measure_single_shot()
                # 3.10.1: the result is in the buffer once the 5 s are over; a short wait covers a
                # sensor that is slow by a poll or two.
                self.device.wait_data_ready(READY_MARGIN_S)
            else:
                if not self.started:
                    self.begin()
                self.device.wait_data_ready(chip.SIGNAL_UPDATE_INTERVAL_S + READY_MARGIN_S)
            return self.device.read_measurement()
        except chip.CRCError:
            raise       # noise on the bus: the sensor still measures, the next reading waits for it
        except OSError:
            self.started = False
            raise


class SCD4xWorker(I2CWorker):
    """An SCD4x polled at ``interval_s`` (>= 5 s, the signal update interval)."""

    columns = ("co2_ppm", "temperature_c", "humidity_rh")
    quantities = ("co2_ppm", "temperature_celsius", "relative_humidity_percent")
    limits = ((1.0, chip.CO2_RANGE_PPM[1]), chip.TEMPERATURE_RANGE_C, chip.HUMIDITY_RANGE_RH)

    def __init__(self, cfg, sensor, channel, **kw):
        super().__init__(cfg, sensor, channel, **kw)
        self.device = SCD4x(self.bus, sensor.address, sleep=self._sleep, pause=self._pause)
        self.reader = SCD4xReader(self.device, sensor.mode)

    def _sleep(self, seconds: float) -> None:
        """A command's execution time (up to 5 s for a single shot), in slices that send heartbeats."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, WAIT_SLICE_S))
            self.channel.beat()

    def _pause(self, seconds: float) -> None:
        """Between data-ready polls: give up the measurement (:class:`MeasurementInterrupted`) when a
        command waits, so that stop, pause and shutdown never wait out the 5 s signal update interval."""
        if self.channel.pending():
            raise MeasurementInterrupted("a command is waiting")
        self._sleep(seconds)

    def read(self) -> tuple:
        return self.reader.measure()

    def format_row(self, reading: tuple) -> list[str]:
        co2, t, rh = reading
        return [f"{co2:.0f}", f"{t:.2f}", f"{rh:.2f}"]

    def extra_metadata(self, readings: list[tuple]) -> dict:
        return {**super().extra_metadata(readings), "model": self.sensor.model, "mode": self.sensor.mode}

    def close(self) -> None:
        if self.reader.mode == "periodic" and self.reader.started:
            try:   # leave the sensor idle (and drawing less) while the daemon is stopped
                self.device.stop_periodic_measurement()
            except OSError:
                pass
        super().close()
