"""The SCD4x as a polled sensor: CSV records of (UTC time, CO2 ppm, °C, %RH).

Plausibility (``limits``, checked and counted by :class:`beemond.sensors.base.PolledSensorWorker`):
CO2 1...40 000 ppm (the output range, datasheet page 1; a CO2 word of 0 is no measurement: Sensirion's
arduino-i2c-scd4x usage example skips it as an "invalid sample"), -10...60 °C and 0...100 %RH (the
measurement ranges, datasheet 1.2 and 1.3). A reading outside is rejected whole and never recorded.
"""

from __future__ import annotations

import time

from beemond.sensors.base import I2CWorker
from beemond.sensors.scd4x import chip
from beemond.sensors.scd4x.driver import SCD4x, SCD4xReader

BEAT_SLICE_S = 1.0     # a long wait (5 s single shot) is cut into slices that each send a heartbeat


class SCD4xWorker(I2CWorker):
    """An SCD4x polled at ``interval_s`` (>= 5 s, the signal update interval)."""

    columns = ("co2_ppm", "temperature_c", "humidity_rh")
    quantities = ("co2_ppm", "temperature_celsius", "relative_humidity_percent")
    limits = ((1.0, chip.CO2_RANGE_PPM[1]), chip.TEMPERATURE_RANGE_C, chip.HUMIDITY_RANGE_RH)

    def __init__(self, cfg, sensor, channel, **kw):
        super().__init__(cfg, sensor, channel, **kw)
        self.device = SCD4x(self.bus, sensor.address, sleep=self._sleep)
        self.reader = SCD4xReader(self.device, sensor.mode)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, BEAT_SLICE_S))
            self.channel.beat()

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
