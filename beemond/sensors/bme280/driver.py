"""The BME280 driver: forced-mode measurements over an ``smbus2.SMBus``-compatible bus, and its worker.

The datasheet logic (register map, trimming parameters, compensation code, measurement time, section
numbers) is in :mod:`.chip`. The bus is ``/dev/i2c-N`` on a Pi, or with ``backend = "simulated"``
the emulated bus that :func:`beemond.sensors.seams.i2c_bus` builds around
:class:`.emulator.BME280Chip`.
"""

from __future__ import annotations

import errno
import os
import time

from beemond.sensors.base import I2CWorker, SensorFailure
from beemond.sensors.bme280.chip import (CALIB00_LEN, CALIB26_LEN, CHIP_ID, DATA_LEN, MODE_FORCED, OSRS,
                                         REG_CALIB00, REG_CALIB26, REG_CONFIG, REG_CTRL_HUM, REG_CTRL_MEAS,
                                         REG_DATA, REG_ID, REG_RESET, REG_STATUS, RESET_WORD, SKIPPED_16BIT,
                                         SKIPPED_20BIT, STARTUP_S, STATUS_IM_UPDATE, STATUS_MEASURING,
                                         Calibration, compensate_humidity, compensate_pressure,
                                         compensate_temperature, measurement_time_s)


class WrongChipError(SensorFailure):
    """Something other than a BME280 answers at the address (a BMP280 reads 0x58): not transient."""



class BME280:
    """One BME280 at *address* (0x76 with SDO low, 0x77 high) on *bus*, measured in forced mode.

    Oversampling factors are 1, 2, 4, 8 or 16 (0 skips pressure or humidity, which then read as
    ``None``). Bus errors surface as ``OSError`` (``EREMOTEIO``, ``ENXIO``, ...); a measurement that
    does not finish raises ``OSError(ETIMEDOUT)``; both are transient. :meth:`begin` raises
    :class:`WrongChipError` when the chip id is not 0x60.
    """

    def __init__(self, bus, address: int = 0x76, osrs_t: int = 1, osrs_p: int = 1, osrs_h: int = 1):
        for name, v in (("temperature", osrs_t), ("pressure", osrs_p), ("humidity", osrs_h)):
            if v not in OSRS or (name == "temperature" and v == 0):
                raise ValueError(f"{name} oversampling must be one of {sorted(OSRS)}, got {v}")
        self.bus = bus
        self.address = address
        self.osrs = (osrs_t, osrs_p, osrs_h)
        self.calibration: Calibration | None = None

    def _timeout(self, what: str) -> OSError:
        return OSError(errno.ETIMEDOUT, f"BME280 at 0x{self.address:02x}: {what} ({os.strerror(errno.ETIMEDOUT)})")

    def _wait_status_clear(self, bit: int, wait_s: float, what: str) -> None:
        time.sleep(wait_s)
        deadline = time.monotonic() + max(0.01, wait_s)
        while self.bus.read_byte_data(self.address, REG_STATUS) & bit:
            if time.monotonic() > deadline:
                raise self._timeout(what)
            time.sleep(0.001)

    def begin(self) -> Calibration:
        """Check the chip id, soft-reset, read the trimming parameters. Call again after a failure."""
        chip_id = self.bus.read_byte_data(self.address, REG_ID)
        if chip_id != CHIP_ID:
            hint = " (a BMP280, which has no humidity sensor)" if chip_id == 0x58 else ""
            raise WrongChipError(f"no BME280 at 0x{self.address:02x}: chip id 0x{chip_id:02x}{hint}, "
                                 f"expected 0x{CHIP_ID:02x}")
        self.bus.write_byte_data(self.address, REG_RESET, RESET_WORD)
        self._wait_status_clear(STATUS_IM_UPDATE, STARTUP_S, "NVM copy after reset did not finish")
        lo = bytes(self.bus.read_i2c_block_data(self.address, REG_CALIB00, CALIB00_LEN))
        hi = bytes(self.bus.read_i2c_block_data(self.address, REG_CALIB26, CALIB26_LEN))
        cal = Calibration.from_registers(lo, hi)
        if not cal.plausible():
            raise OSError(errno.EIO, f"BME280 at 0x{self.address:02x}: implausible calibration "
                                     f"(dig_T1={cal.dig_T1}, dig_P1={cal.dig_P1})")
        self.bus.write_byte_data(self.address, REG_CONFIG, 0x00)   # IIR filter off, sleep mode
        self.calibration = cal
        return cal

    def read_raw(self) -> tuple[int, int, int]:
        """One forced measurement: ``(adc_T, adc_P, adc_H)`` as read from 0xF7..0xFE."""
        osrs_t, osrs_p, osrs_h = self.osrs
        self.bus.write_byte_data(self.address, REG_CTRL_HUM, OSRS[osrs_h])
        self.bus.write_byte_data(self.address, REG_CTRL_MEAS, OSRS[osrs_t] << 5 | OSRS[osrs_p] << 2 | MODE_FORCED)
        self._wait_status_clear(STATUS_MEASURING, measurement_time_s(*self.osrs), "measurement did not finish")
        d = self.bus.read_i2c_block_data(self.address, REG_DATA, DATA_LEN)
        adc_p = d[0] << 12 | d[1] << 4 | d[2] >> 4
        adc_t = d[3] << 12 | d[4] << 4 | d[5] >> 4
        adc_h = d[6] << 8 | d[7]
        # Every data register at its reset value: the chip was reset (a brown-out) between the
        # trigger and the read and measured nothing. Decoding it would invent a plausible reading.
        if (adc_t, adc_p, adc_h) == (SKIPPED_20BIT, SKIPPED_20BIT, SKIPPED_16BIT):
            raise OSError(errno.EIO, f"BME280 at 0x{self.address:02x}: data registers hold their reset "
                                     "values (the chip reset during the measurement)")
        return adc_t, adc_p, adc_h

    def measure(self) -> tuple[float, float | None, float | None]:
        """One measurement: (temperature °C, relative humidity %RH or None, pressure Pa or None)."""
        if self.calibration is None:
            self.begin()
        cal = self.calibration
        adc_t, adc_p, adc_h = self.read_raw()
        t, t_fine = compensate_temperature(cal, adc_t)
        rh = compensate_humidity(cal, adc_h, t_fine) / 1024.0 if self.osrs[2] else None
        p = compensate_pressure(cal, adc_p, t_fine) / 256.0 if self.osrs[1] else None
        return t / 100.0, rh, p


class BME280Worker(I2CWorker):
    """A BME280 polled at ``interval_s``; CSV records of (UTC time, °C, %RH, Pa)."""

    columns = ("temperature_c", "humidity_rh", "pressure_pa")
    quantities = ("temperature_celsius", "relative_humidity_percent", "pressure_pascals")
    limits = ((-40.0, 85.0), (0.0, 100.0), (30_000.0, 110_000.0))   # datasheet section 1, table 1

    def __init__(self, cfg, sensor, channel):
        super().__init__(cfg, sensor, channel)
        self.device = BME280(self.bus, sensor.address, sensor.temperature_oversampling,
                             sensor.pressure_oversampling, sensor.humidity_oversampling)

    def read(self) -> tuple:
        try:
            return self.device.measure()
        except OSError:
            self.device.calibration = None   # re-check id and calibration after any bus trouble
            raise

    def format_row(self, reading: tuple) -> list[str]:
        t, rh, p = reading
        return [f"{t:.2f}", "" if rh is None else f"{rh:.3f}", "" if p is None else f"{p:.2f}"]

    def extra_metadata(self, readings: list[tuple]) -> dict:
        s = self.sensor
        return {**super().extra_metadata(readings), "oversampling": {
            "temperature": s.temperature_oversampling, "pressure": s.pressure_oversampling,
            "humidity": s.humidity_oversampling}}
