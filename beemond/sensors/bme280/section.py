"""``[sensors.NAME]`` with ``type = "bme280"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, opt
from beemond.sensors.section import PolledSensorConfig


OVERSAMPLING = (0, 1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BME280Config(PolledSensorConfig):
    measures_temperature = True
    bus: int = opt(1, min=0, max=255, doc="I2C bus number (/dev/i2c-N)")
    address: int = opt(0x76, min=0x76, max=0x77, doc="0x76 (SDO low) or 0x77 (SDO high)")
    temperature_oversampling: int = opt(1, min=1, max=16, doc="1, 2, 4, 8 or 16")
    pressure_oversampling: int = opt(1, min=0, max=16, doc="0 (skip), 1, 2, 4, 8 or 16")
    humidity_oversampling: int = opt(1, min=0, max=16, doc="0 (skip), 1, 2, 4, 8 or 16")
    pressure_pa: float = opt(101325.0, min=30000, max=110000,
                              doc="simulated: pressure when the replay has no pressure_column")

    replay_optional = ("pressure_pa",)   # else every reading has the fixed pressure_pa

    def check(self, path: Path, key: str) -> None:
        for name in ("temperature_oversampling", "pressure_oversampling", "humidity_oversampling"):
            value = getattr(self, name)
            if value not in OVERSAMPLING:
                allowed = ", ".join(str(v) for v in OVERSAMPLING if v or name != "temperature_oversampling")
                raise ConfigError(path, f"{key}.{name}", f"allowed: {allowed}; got {value}")
        super().check(path, key)

    def describe(self) -> str:
        osrs = f"oversampling T x{self.temperature_oversampling} P x{self.pressure_oversampling} " \
               f"H x{self.humidity_oversampling}"
        return f"0x{self.address:02x} on bus {self.bus}, {osrs}, {super().describe()}"
