"""Sensirion SHT3x (SHT30/SHT31/SHT35) temperature and humidity driver over I2C.

Follows the SHT3x-DIS datasheet (v7, Dec 2022):

- single-shot measurement commands, table 9 (with or without clock stretching, three repeatabilities);
- maximum measurement durations, table 4 (the driver waits this long before reading, so it works on
  buses whose master does not support clock stretching, such as the Raspberry Pi's BCM2835);
- result of 6 bytes: temperature word, CRC, humidity word, CRC; CRC-8 with polynomial 0x31
  (x^8 + x^5 + x^4 + 1), initialisation 0xFF, no reflection, no final XOR (section 4.12);
- conversion, section 4.13: ``T = -45 + 175 * S_T / (2^16 - 1)`` °C, ``RH = 100 * S_RH / (2^16 - 1)`` %RH.
- plausibility, section 2 (tables 1 and 2, and figure 5's operating range): the sensor is specified
  for -40...125 °C and 0...100 %RH. The conversion can yield -45...130 °C, so a value outside the
  specified range (a corrupted word whose CRC happened to match, a stuck bus) is rejected and
  counted by the polled worker (``beemond.sensors.base``), never recorded.

The bus is anything ``smbus2.SMBus``-compatible (``i2c_rdwr``): ``/dev/i2c-N`` on a Pi, or
:class:`beemond.sensors.emulators.i2c.EmulatedSMBus` in simulation and tests.
"""

from __future__ import annotations

import time

from smbus2 import i2c_msg

from beemond.sensors.base import I2CWorker, ranges  # noqa: F401  (ranges lived here first)
from beemond.errors import TransientSensorError

# (repeatability, clock stretching) -> 16-bit command, datasheet table 9
COMMANDS = {
    ("high", True): 0x2C06, ("medium", True): 0x2C0D, ("low", True): 0x2C10,
    ("high", False): 0x2400, ("medium", False): 0x240B, ("low", False): 0x2416,
}
# maximum measurement duration in seconds, datasheet table 4
MEASUREMENT_S = {"high": 0.0155, "medium": 0.0065, "low": 0.0045}
SOFT_RESET = 0x30A2
RESOLUTION_C = 175.0 / 65535.0
RESOLUTION_RH = 100.0 / 65535.0


class CRCError(TransientSensorError):
    """A result word whose CRC-8 does not match: the reading is discarded, never used."""


def crc8(data: bytes) -> int:
    """CRC-8 of *data* as the SHT3x computes it (poly 0x31, init 0xFF). ``crc8(b"\\xbe\\xef") == 0x92``."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def convert(raw_t: int, raw_rh: int) -> tuple[float, float]:
    """Raw ticks to (°C, %RH), datasheet section 4.13."""
    return -45.0 + 175.0 * raw_t / 65535.0, 100.0 * raw_rh / 65535.0


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

    def emulated_chip(self, replay):
        from beemond.sensors.emulators.sht3x import SHT3xChip

        def source():
            row = replay.next_row()
            return row.temperature_c, row.humidity_rh, row.index

        return SHT3xChip(source)

    def read(self) -> tuple:
        return self.device.measure()

    def extra_metadata(self, readings: list[tuple]) -> dict:
        return {**super().extra_metadata(readings), "repeatability": self.sensor.repeatability}
