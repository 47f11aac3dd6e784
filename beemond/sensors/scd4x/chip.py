"""Sensirion SCD4x (SCD40/SCD41) datasheet logic: commands, timings, word framing, CRC, conversions.

No I/O here: :mod:`.driver` talks to the chip through a bus, :mod:`.emulator` plays the chip behind one,
and both take every number from this module. Sections and tables are those of the Sensirion "SCD4x
Datasheet", version 1.3 (September 2022); the same values are in Sensirion's own driver
(github.com/Sensirion/embedded-i2c-scd4x, ``scd4x_i2c.c``/``scd4x_i2c.h``) and in Adafruit's
(``adafruit_scd4x.py``):

- section 3 / table 8: I2C address 0x62 (fixed);
- 3.1: after power-up the sensor needs 1000 ms to reach the idle state before it takes commands;
- 3.2: every 16-bit word (most significant byte first) is followed by its CRC-8; 3.11, table 32: CRC-8,
  polynomial 0x31 (x^8 + x^5 + x^4 + 1), initialisation 0xFF, no reflection, no final XOR, over the two
  bytes of one word; example CRC(0xBEEF) = 0x92. Commands carry no CRC;
- 3.3: after a command the master waits its execution time before the read header; a command must not
  be sent while the previous one is being processed;
- 3.4, table 9: command codes and execution times (ms): start_periodic_measurement 0x21B1 (-),
  read_measurement 0xEC05 (1), stop_periodic_measurement 0x3F86 (500), get_data_ready_status 0xE4B8 (1),
  get_serial_number 0x3682 (1), reinit 0x3646 (20), measure_single_shot 0x219D (5000, SCD41 only); and
  which of them are allowed while a periodic measurement runs (read_measurement, get_data_ready_status,
  stop_periodic_measurement);
- 3.5.1: the periodic measurement's signal update interval is 5 s;
- 3.5.2: read_measurement returns 3 words: CO2 = word[0] ppm, T = -45 + 175 * word[1] / (2^16 - 1) °C,
  RH = 100 * word[2] / (2^16 - 1) %RH. The buffer is emptied by the read, and with no data in it the
  sensor NACKs the read;
- 3.8.2: get_data_ready_status: data is ready when any of the 11 least significant bits of its word is
  set (the other bits are undefined);
- 3.10.1: measure_single_shot (SCD41): one measurement, read with read_measurement after 5000 ms; 5 s is
  also the shortest single-shot interval;
- page 1 and sections 1.1-1.3 (specifications): CO2 output range 0-40 000 ppm, humidity measurement
  range 0-100 %RH, temperature measurement range -10...60 °C (the operating range).
"""

from __future__ import annotations

# Sensirion's CRC-8 is one algorithm across its sensors: the SCD4x datasheet's (3.11, table 32) is the
# SHT3x's (4.12), example CRC(0xBEEF) = 0x92 in both. A mismatch is the same transient CRCError.
from beemond.sensors.sht3x.chip import CRCError, crc8

ADDRESS = 0x62
MODELS = ("scd40", "scd41")
MODES = ("periodic", "single_shot")   # 3.5 (both models) and 3.10 (SCD41 only)

START_PERIODIC_MEASUREMENT = 0x21B1
READ_MEASUREMENT = 0xEC05
STOP_PERIODIC_MEASUREMENT = 0x3F86
GET_DATA_READY_STATUS = 0xE4B8
GET_SERIAL_NUMBER = 0x3682
REINIT = 0x3646
MEASURE_SINGLE_SHOT = 0x219D          # SCD41 only

# Execution time in seconds (table 9); the master waits this long before a read header or a next command.
EXECUTION_S = {
    START_PERIODIC_MEASUREMENT: 0.0,
    READ_MEASUREMENT: 0.001,
    STOP_PERIODIC_MEASUREMENT: 0.5,
    GET_DATA_READY_STATUS: 0.001,
    GET_SERIAL_NUMBER: 0.001,
    REINIT: 0.020,
    MEASURE_SINGLE_SHOT: 5.0,
}
# Commands the sensor accepts while a periodic measurement runs (table 9, "during meas." = yes).
DURING_MEASUREMENT = frozenset({READ_MEASUREMENT, GET_DATA_READY_STATUS, STOP_PERIODIC_MEASUREMENT})
# Words each "read" command answers with (table 9 and sections 3.5.2, 3.8.2, 3.9.2).
RESPONSE_WORDS = {READ_MEASUREMENT: 3, GET_DATA_READY_STATUS: 1, GET_SERIAL_NUMBER: 3}

POWER_UP_S = 1.0                       # 3.1: power-up to idle
SIGNAL_UPDATE_INTERVAL_S = 5.0         # 3.5.1; 3.10.1: also the shortest single-shot interval
DATA_READY_MASK = 0x07FF               # 3.8.2: the 11 least significant bits

CO2_RANGE_PPM = (0.0, 40_000.0)        # page 1, "large output range"
TEMPERATURE_RANGE_C = (-10.0, 60.0)    # 1.3, temperature measurement range
HUMIDITY_RANGE_RH = (0.0, 100.0)       # 1.2, humidity measurement range


def command_bytes(command: int) -> bytes:
    """A 16-bit command as sent on the wire, most significant byte first and without CRC (3.2, 3.11)."""
    return command.to_bytes(2, "big")


def pack_words(*words: int) -> bytes:
    """Words (0..65535 each) framed as the sensor sends them: ``MSB LSB CRC`` per word (3.2)."""
    out = bytearray()
    for w in words:
        raw = w.to_bytes(2, "big")
        out += raw + bytes([crc8(raw)])
    return bytes(out)


def unpack_words(data: bytes, what: str = "response") -> list[int]:
    """The words of a response framed as ``MSB LSB CRC`` triples. Raises :class:`CRCError` naming *what*
    and the word's position when any CRC is wrong, and ``ValueError`` for a length that is not a
    multiple of 3."""
    if len(data) % 3:
        raise ValueError(f"{what}: {len(data)} bytes is not a whole number of words")
    words = []
    for i in range(0, len(data), 3):
        raw = data[i:i + 2]
        if crc8(raw) != data[i + 2]:
            raise CRCError(f"SCD4x CRC mismatch in {what} word {i // 3}: {data[i:i + 3].hex()} "
                           f"(expected CRC 0x{crc8(raw):02x})")
        words.append(int.from_bytes(raw, "big"))
    return words


def data_ready(status: int) -> bool:
    """Whether a get_data_ready_status word says a measurement is ready (3.8.2: low 11 bits not all 0)."""
    return status & DATA_READY_MASK != 0


def convert(co2_word: int, t_word: int, rh_word: int) -> tuple[float, float, float]:
    """read_measurement's words to (CO2 ppm, temperature °C, relative humidity %RH), section 3.5.2."""
    return float(co2_word), -45.0 + 175.0 * t_word / 65535.0, 100.0 * rh_word / 65535.0


def encode(co2_ppm: float, temperature_c: float, humidity_rh: float) -> tuple[int, int, int]:
    """The words the sensor reports for these values: the inverse of :func:`convert`, rounded to the
    nearest tick and clamped to 0..65535 (what a 16-bit word can carry)."""
    co2 = round(co2_ppm)
    t = round((temperature_c + 45.0) * 65535.0 / 175.0)
    rh = round(humidity_rh * 65535.0 / 100.0)
    return tuple(min(max(v, 0), 0xFFFF) for v in (co2, t, rh))
