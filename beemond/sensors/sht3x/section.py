"""``[sensors.NAME]`` with ``type = "sht3x"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass

from beemond.config.schema import opt
from beemond.sensors.section import PolledSensorConfig


@dataclass(frozen=True)
class SHT3xConfig(PolledSensorConfig):
    measures_temperature = True
    bus: int = opt(1, min=0, max=255, doc="I2C bus number (/dev/i2c-N)")
    address: int = opt(0x44, min=0x44, max=0x45, doc="0x44 (ADDR low) or 0x45 (ADDR high)")
    repeatability: str = opt("high", choices=("high", "medium", "low"))
