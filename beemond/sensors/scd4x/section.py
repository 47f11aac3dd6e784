"""``[sensors.NAME]`` with ``type = "scd4x"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, opt
from beemond.sensors.scd4x import chip, source
from beemond.sensors.section import PolledSensorConfig


@dataclass(frozen=True)
class SCD4xConfig(PolledSensorConfig):
    measures_temperature = True
    bus: int = opt(1, min=0, max=255, doc="I2C bus number (/dev/i2c-N)")
    address: int = opt(chip.ADDRESS, min=chip.ADDRESS, max=chip.ADDRESS, doc="fixed at 0x62 (datasheet table 8)")
    model: str = opt("scd41", choices=chip.MODELS, doc="scd41 can also measure single shots")
    mode: str = opt("periodic", choices=chip.MODES,
                    doc="periodic: the sensor measures every 5 s and each reading takes the latest; "
                        "single_shot (SCD41): one 5 s measurement per reading, idle in between")
    co2_low_ppm: float = opt(source.LOW_PPM, min=0, max=40000, doc="simulated: the daily CO2 minimum")
    co2_high_ppm: float = opt(source.HIGH_PPM, min=0, max=40000, doc="simulated: the daily CO2 maximum")
    co2_peak_hour: float = opt(source.PEAK_HOUR, min=0, max=24, doc="simulated: local hour of the maximum")
    co2_utc_offset_h: float = opt(source.URBAN_UTC_OFFSET_H, min=-14, max=14,
                                  doc="simulated: local time minus UTC at the replayed hive, in hours")

    replay_optional = ("co2_ppm",)   # a file with CO2 in ppm; else the respiration curve

    def check(self, path: Path, key: str) -> None:
        if self.interval_s < chip.SIGNAL_UPDATE_INTERVAL_S:
            raise ConfigError(path, f"{key}.interval_s", f"must be >= {chip.SIGNAL_UPDATE_INTERVAL_S:g} "
                              "(the SCD4x measures at most every 5 s, datasheet 3.5.1 and 3.10.1)")
        if self.mode == "single_shot" and self.model != "scd41":
            raise ConfigError(path, f"{key}.mode", 'single_shot needs model = "scd41" (an SCD40 measures '
                              "only periodically)")
        if self.power_pin is not None:
            if self.mode != "single_shot":
                raise ConfigError(path, f"{key}.power_pin", 'a switched supply needs mode = "single_shot": '
                                  "the periodic mode measures only while powered, every 5 s")
            if self.power_lead_s < chip.POWER_UP_S:
                raise ConfigError(path, f"{key}.power_lead_s", f"must be >= {chip.POWER_UP_S:g}: the SCD4x "
                                  "takes 1000 ms from power-up to idle (datasheet 3.1)")
        if self.co2_low_ppm >= self.co2_high_ppm:
            raise ConfigError(path, f"{key}.co2_low_ppm", "must be below co2_high_ppm")
        super().check(path, key)

    def describe(self) -> str:
        return f"{self.model} at 0x{self.address:02x} on bus {self.bus}, {self.mode}, {super().describe()}"
