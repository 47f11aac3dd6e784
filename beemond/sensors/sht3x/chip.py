"""Sensirion SHT3x (SHT30/SHT31/SHT35): the datasheet's commands, timings, CRC and conversion.

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

Shared by the driver (:mod:`.driver`) and the emulator (:mod:`.emulator`); imports nothing else but
:mod:`beemond.errors`.
"""

from __future__ import annotations

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
