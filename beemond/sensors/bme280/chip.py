"""Bosch BME280 temperature, pressure and humidity: the datasheet's registers, trimming and compensation.

Follows the BME280 datasheet (BST-BME280-DS002, rev. 1.6):

- 3.3.3 forced mode: one measurement per write of ``ctrl_meas`` with ``mode = 01``, then the chip
  returns to sleep. ``ctrl_hum`` takes effect only at the next write of ``ctrl_meas`` (5.4.3), so it
  is written first, every time (a chip that browned out and lost its settings recovers on the next
  measurement).
- 4.2.2 trimming parameters (table 16): ``dig_T1..dig_P9`` little-endian words at 0x88..0x9F,
  ``dig_H1`` at 0xA1, ``dig_H2..dig_H6`` at 0xE1..0xE7, with ``dig_H4``/``dig_H5`` packed as signed
  12-bit values sharing 0xE5 (parsed as Bosch's BME280_SensorAPI does, sign-extending 0xE4/0xE6).
- 4.2.3 compensation: the datasheet's integer code, verbatim: 32-bit temperature (0.01 °C), 64-bit
  pressure (Q24.8 Pa), 32-bit humidity (Q22.10 %RH). The same T/P code is in the BMP280 datasheet
  (BST-BMP280-DS001, 3.11), whose worked example (3.12) the tests reproduce.
- 5.4 register map: id 0xD0 (0x60), reset 0xE0 (0xB6), ctrl_hum 0xF2, status 0xF3 (bit 3 measuring,
  bit 0 im_update), ctrl_meas 0xF4, config 0xF5, data 0xF7..0xFE read in one burst so the chip's
  data shadowing keeps the three values from one measurement.
- 9.1 measurement time: the driver waits the maximum time for the configured oversampling, then
  checks the measuring bit before reading.
- 1 specification (table 1, "operating range"; tables 2 and 3): -40...85 °C, 300...1100 hPa
  (30 000...110 000 Pa), 0...100 %RH. A value outside (the compensation code clamps humidity to
  0...100 but not temperature or pressure) is rejected and counted by the polled worker
  (``beemond.sensors.base``), never recorded.

Shared by the driver (:mod:`.driver`) and the emulator (:mod:`.emulator`).
"""

from __future__ import annotations

from dataclasses import dataclass

CHIP_ID = 0x60
REG_CALIB00, CALIB00_LEN = 0x88, 26      # 0x88..0xA1
REG_CALIB26, CALIB26_LEN = 0xE1, 7       # 0xE1..0xE7
REG_ID, REG_RESET, RESET_WORD = 0xD0, 0xE0, 0xB6
REG_CTRL_HUM, REG_STATUS, REG_CTRL_MEAS, REG_CONFIG = 0xF2, 0xF3, 0xF4, 0xF5
REG_DATA, DATA_LEN = 0xF7, 8             # press_msb .. hum_lsb
STATUS_MEASURING, STATUS_IM_UPDATE = 0x08, 0x01
MODE_FORCED = 0b01
# Data register contents after reset or with a measurement skipped (5.4.7-5.4.9).
SKIPPED_20BIT, SKIPPED_16BIT = 0x80000, 0x8000
# oversampling factor -> osrs_x register code (5.4.3, 5.4.5); 0 skips the measurement
OSRS = {0: 0b000, 1: 0b001, 2: 0b010, 4: 0b011, 8: 0b100, 16: 0b101}
STARTUP_S = 0.002                        # table 1: start-up time 2 ms (NVM copy after reset)


def _s16(lo: int, hi: int) -> int:
    v = lo | hi << 8
    return v - 0x10000 if v & 0x8000 else v


def _s8(b: int) -> int:
    return b - 0x100 if b & 0x80 else b


@dataclass(frozen=True)
class Calibration:
    """The trimming parameters (datasheet 4.2.2, table 16)."""

    dig_T1: int
    dig_T2: int
    dig_T3: int
    dig_P1: int
    dig_P2: int
    dig_P3: int
    dig_P4: int
    dig_P5: int
    dig_P6: int
    dig_P7: int
    dig_P8: int
    dig_P9: int
    dig_H1: int = 0
    dig_H2: int = 0
    dig_H3: int = 0
    dig_H4: int = 0
    dig_H5: int = 0
    dig_H6: int = 0

    @classmethod
    def from_registers(cls, lo: bytes, hi: bytes) -> "Calibration":
        """Parse 26 bytes from 0x88 and 7 bytes from 0xE1. ``dig_H4 = 0xE4[7:0] << 4 | 0xE5[3:0]``,
        ``dig_H5 = 0xE6[7:0] << 4 | 0xE5[7:4]``, the high byte signed (BME280_SensorAPI)."""
        if len(lo) != CALIB00_LEN or len(hi) != CALIB26_LEN:
            raise ValueError("calibration needs 26 + 7 bytes")
        words = [lo[i] | lo[i + 1] << 8 for i in range(0, 24, 2)]
        t_p = [w if i in (0, 3) else (w - 0x10000 if w & 0x8000 else w) for i, w in enumerate(words)]
        return cls(*t_p, dig_H1=lo[25], dig_H2=_s16(hi[0], hi[1]), dig_H3=hi[2],
                   dig_H4=_s8(hi[3]) * 16 | (hi[4] & 0x0F), dig_H5=_s8(hi[5]) * 16 | (hi[4] >> 4),
                   dig_H6=_s8(hi[6]))

    def to_registers(self) -> tuple[bytes, bytes]:
        """The inverse of :meth:`from_registers` (0xA0 is unused and reads 0)."""
        lo = b"".join((v & 0xFFFF).to_bytes(2, "little") for v in (
            self.dig_T1, self.dig_T2, self.dig_T3, self.dig_P1, self.dig_P2, self.dig_P3, self.dig_P4,
            self.dig_P5, self.dig_P6, self.dig_P7, self.dig_P8, self.dig_P9))
        lo += bytes([0, self.dig_H1 & 0xFF])
        h4, h5 = self.dig_H4 & 0xFFF, self.dig_H5 & 0xFFF
        hi = (self.dig_H2 & 0xFFFF).to_bytes(2, "little") + bytes(
            [self.dig_H3 & 0xFF, h4 >> 4, (h4 & 0x0F) | (h5 & 0x0F) << 4, h5 >> 4, self.dig_H6 & 0xFF])
        return lo, hi

    def plausible(self) -> bool:
        """False for a read of an unprogrammed or floating bus (all 0x00 or 0xFF): dig_T1 and dig_P1
        are unsigned scale factors that are never 0 or 0xFFFF on a real part, and dig_P1 = 0 would
        divide by zero in the pressure code."""
        return all(v not in (0, 0xFFFF) for v in (self.dig_T1, self.dig_P1))


# ---------------------------------------------------------------------- datasheet 4.2.3, integer code

def compensate_temperature(cal: Calibration, adc_t: int) -> tuple[int, int]:
    """``(T, t_fine)``: T in 0.01 °C (5123 = 51.23 °C); t_fine feeds the P and H formulas."""
    var1 = (((adc_t >> 3) - (cal.dig_T1 << 1)) * cal.dig_T2) >> 11
    var2 = (((((adc_t >> 4) - cal.dig_T1) * ((adc_t >> 4) - cal.dig_T1)) >> 12) * cal.dig_T3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero); Python's ``//`` floors."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def compensate_pressure(cal: Calibration, adc_p: int, t_fine: int) -> int:
    """Pressure in Pa as Q24.8 (24674867 = 24674867 / 256 = 96386.2 Pa), the int64 code; 0 if the
    calibration would divide by zero."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.dig_P6
    var2 = var2 + ((var1 * cal.dig_P5) << 17)
    var2 = var2 + (cal.dig_P4 << 35)
    var1 = ((var1 * var1 * cal.dig_P3) >> 8) + ((var1 * cal.dig_P2) << 12)
    var1 = (((1 << 47) + var1) * cal.dig_P1) >> 33
    if var1 == 0:
        return 0
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (cal.dig_P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.dig_P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.dig_P7 << 4)


def compensate_humidity(cal: Calibration, adc_h: int, t_fine: int) -> int:
    """Relative humidity in %RH as Q22.10 (47445 = 47445 / 1024 = 46.333 %RH), clamped to 0..100 %."""
    v = t_fine - 76800
    v = (((((adc_h << 14) - (cal.dig_H4 << 20) - (cal.dig_H5 * v)) + 16384) >> 15)
         * (((((((v * cal.dig_H6) >> 10) * (((v * cal.dig_H3) >> 11) + 32768)) >> 10) + 2097152)
             * cal.dig_H2 + 8192) >> 14))
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * cal.dig_H1) >> 4)
    v = min(max(v, 0), 419430400)
    return v >> 12


def measurement_time_s(osrs_t: int, osrs_p: int, osrs_h: int) -> float:
    """Maximum duration of one forced measurement, datasheet 9.1 (oversampling factors, 0 = skipped)."""
    ms = 1.25 + 2.3 * osrs_t
    ms += 2.3 * osrs_p + 0.575 if osrs_p else 0.0
    ms += 2.3 * osrs_h + 0.575 if osrs_h else 0.0
    return ms / 1000.0
