"""The SHT3x driver: single-shot measurements over an ``smbus2.SMBus``-compatible bus, and its worker.

The datasheet logic (commands, timings, CRC-8, conversion, section numbers) is in :mod:`.chip`. The
bus is ``/dev/i2c-N`` on a Pi, or with ``backend = "simulated"`` the emulated bus that
:func:`beemond.sensors.seams.i2c_bus` builds around :class:`.emulator.SHT3xChip`.
"""

from __future__ import annotations

import time

from smbus2 import i2c_msg

from beemond.sensors.base import I2CWorker
from beemond.sensors.sht3x.chip import COMMANDS, MEASUREMENT_S, SOFT_RESET, CRCError, convert, crc8

class SHT3x:
    """One SHT3x chip at *address* (0x44 or 0x45) on *bus*.

    :meth:`measure` raises :class:`CRCError` on a corrupted word and ``OSError`` (``EREMOTEIO``,
    ``ENXIO``, ...) for a bus error; both are transient and the caller may retry.
    """

    def __init__(self, bus, address: int = 0x44, repeatability: str = "high", clock_stretching: bool = False):
        self.bus = bus
        self.address = address
        self.repeatability = repeatability
        self.command = COMMANDS[(repeatability, clock_stretching)]

    def _write_command(self, command: int) -> None:
        self.bus.i2c_rdwr(i2c_msg.write(self.address, [command >> 8, command & 0xFF]))

    def soft_reset(self) -> None:
        self._write_command(SOFT_RESET)
        time.sleep(0.0015)  # datasheet table 4: soft reset time 1.5 ms max

    def read_raw(self) -> tuple[int, int]:
        """One single-shot measurement; returns the raw (S_T, S_RH) ticks after checking both CRCs."""
        self._write_command(self.command)
        time.sleep(MEASUREMENT_S[self.repeatability])
        msg = i2c_msg.read(self.address, 6)
        self.bus.i2c_rdwr(msg)
        data = bytes(msg)
        for i in (0, 3):
            if crc8(data[i:i + 2]) != data[i + 2]:
                raise CRCError(f"SHT3x CRC mismatch in {'temperature' if i == 0 else 'humidity'} word: "
                               f"{data[i:i + 3].hex()}")
        return int.from_bytes(data[0:2], "big"), int.from_bytes(data[3:5], "big")

    def measure(self) -> tuple[float, float]:
        """One measurement as (temperature °C, relative humidity %RH)."""
        return convert(*self.read_raw())


class SHT3xWorker(I2CWorker):
    """An SHT3x polled at ``interval_s``; CSV records of (UTC time, °C, %RH)."""

    columns = ("temperature_c", "humidity_rh")
    quantities = ("temperature_celsius", "relative_humidity_percent")
    limits = ((-40.0, 125.0), (0.0, 100.0))   # datasheet section 2, tables 1 and 2

    def __init__(self, cfg, sensor, channel, **kw):
        super().__init__(cfg, sensor, channel, **kw)  # kw: clock (a test's time source)
        self.device = SHT3x(self.bus, sensor.address, sensor.repeatability)

    def read(self) -> tuple:
        return self.device.measure()

    def extra_metadata(self, readings: list[tuple]) -> dict:
        return {**super().extra_metadata(readings), "repeatability": self.sensor.repeatability}
