"""``[sensors.NAME]`` with ``type = "ds18b20"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import NAME_RE, ConfigError, opt
from beemond.sensors.section import PolledSensorConfig


W1_ID_RE = re.compile(r"^28-[0-9a-f]{12}$")


@dataclass(frozen=True)
class DS18B20Config(PolledSensorConfig):
    measures_temperature = True
    base_path: Path | None = opt(None, path=True, doc="sysfs 1-Wire devices directory "
                                  "(default /sys/bus/w1/devices; simulated: a temporary directory)")
    probes: dict[str, str] = opt(factory=dict, doc="position -> ROM id as the kernel names it (28-0316a2794eff)")
    replay_filter_values: dict[str, str] = opt(
        factory=dict, doc="simulated: position -> replay filter_value of the rows that drive that probe")

    replay_required = ("temperature_c",)   # no humidity

    def check(self, path: Path, key: str) -> None:
        if not self.probes:
            raise ConfigError(path, f"{key}.probes", 'at least one probe: position = "28-xxxxxxxxxxxx"')
        seen: dict[str, str] = {}
        for position, rom in self.probes.items():
            if not NAME_RE.match(position):
                raise ConfigError(path, f"{key}.probes.{position}", f"position must match {NAME_RE.pattern}")
            if not W1_ID_RE.match(rom):
                raise ConfigError(path, f"{key}.probes.{position}",
                                  f'must be a DS18B20 id "28-" and 12 lowercase hex digits, got {rom!r}')
            if rom in seen:
                raise ConfigError(path, f"{key}.probes.{position}", f"{rom} is already probe {seen[rom]!r}")
            seen[rom] = position
        for position in self.replay_filter_values:
            if position not in self.probes:
                raise ConfigError(path, f"{key}.replay_filter_values.{position}", "not a position in probes")
        if self.replay_filter_values and not self.simulated:
            raise ConfigError(path, f"{key}.replay_filter_values", "only a simulated backend replays a file")
        super().check(path, key)
        if self.replay is not None:
            from beemond.sensors.replay import CsvReplay

            for position, value in self.replay_filter_values.items():
                try:
                    CsvReplay.from_config(dataclasses.replace(self.replay, filter_value=value), self.replay_columns())
                except ValueError as e:
                    raise ConfigError(path, f"{key}.replay_filter_values.{position}", str(e)) from None

    def describe(self) -> str:
        where = self.base_path or ("a temporary tree" if self.simulated else "/sys/bus/w1/devices")
        return f"{len(self.probes)} probe(s) ({', '.join(self.probes)}) in {where}, {super().describe()}"
