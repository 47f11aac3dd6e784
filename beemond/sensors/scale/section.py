"""``[sensors.NAME]`` with ``type = "scale"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from beemond import registry
from beemond.config.schema import ConfigError, SensorConfig, opt


# The default line of a serial scale: an optional label ("W:", "NET="), a signed number, an optional
# unit (any case). Accepts "W: 42.315 kg", "42.315", "-0.5 kg", "42315 g", "NET=92.6 LB".
DEFAULT_SCALE_REGEX = r"^\s*(?:[A-Za-z]+\s*[:=]?\s*)?(?P<value>[-+]?\d+(?:\.\d*)?)\s*(?P<unit>(?i:kg|g|lbs?))?\s*$"
SCALE_UNITS = ("kg", "g", "lb")


@dataclass(frozen=True)
class ScaleSimulationConfig:
    """The synthetic hive weight a simulated scale reports (there is no weight data set in shared/data)."""

    base_kg: float = opt(42.0, min=0.0, max=500, doc="hive weight at the start")
    daily_swing_kg: float = opt(0.8, min=0.0, max=50, doc="mid-day loss while foragers are out")
    trend_kg_per_day: float = opt(0.3, min=-50, max=50, doc="slow nectar-flow gain (negative: loss)")
    noise_kg: float = opt(0.005, min=0.0, max=10, doc="standard deviation of the reading noise")
    seed: int = opt(1, min=0, max=2**32 - 1)
    start: str = opt("", doc="ISO 8601 UTC time the simulated clock starts at (default: now)")
    speedup: float = opt(1.0, min=0.0, max=1e7, doc="simulated time runs this much faster than wall time")
    line_period_s: float = opt(0.1, min=0.01, max=60, doc="streamed mode: time between lines")


@dataclass(frozen=True)
class WeightReplayConfig:
    """A CSV of (time, weight in kg) replayed through a simulated scale (e.g. a swarm's drop)."""

    file: Path = opt(Path(""), path=True)
    time_column: str = opt("time")
    weight_column: str = opt("weight_kg")
    start: str = opt("", doc="ISO 8601 time of the first row to replay (default: the first row)")
    speedup: float = opt(0.0, min=0.0, max=1e7,
                          doc="0: one row per line sent; >0: replay time runs this much faster than wall time")
    loop: bool = opt(True)


@dataclass(frozen=True)
class ScaleConfig(SensorConfig):
    """A hive scale with a serial line protocol (beemond.sensors.scale.driver has the formula and the units)."""

    port: str = opt("/dev/beemond-scale", doc="serial device (the udev rule's stable name)")
    baudrate: int = opt(9600, min=50, max=4_000_000)
    bytesize: int = opt(8, min=5, max=8)
    parity: str = opt("N", choices=("N", "E", "O", "M", "S"))
    stopbits: float = opt(1.0, min=1.0, max=2.0, doc="1, 1.5 or 2")
    request: str = opt("", doc='sent to poll the scale, e.g. "W\\r\\n" (backslash escapes are decoded, '
                                'so INI files can write them too); empty: the scale streams lines')
    line_regex: str = opt(DEFAULT_SCALE_REGEX, doc="named groups: value (required), unit (optional)")
    unit: str = opt("kg", choices=SCALE_UNITS, doc="unit of a line without one")
    tare_offset_kg: float = opt(0.0, min=-10_000, max=10_000, doc="subtracted from the raw weight")
    calibration_factor: float = opt(1.0, min=1e-6, max=1e6, doc="multiplies the tared weight")
    samples: int = opt(5, min=1, max=99, doc="lines per reading; the reading is their median")
    min_kg: float = opt(-5.0, min=-10_000, max=10_000, doc="a lighter weight is implausible: rejected, counted")
    max_kg: float = opt(300.0, min=-10_000, max=10_000, doc="a heavier weight is implausible: rejected, counted")
    read_timeout_s: float = opt(2.0, min=0.01, max=60, doc="longest wait for one line")
    interval_s: float = opt(60.0, min=0.05, max=86400, doc="time between readings")
    record_window_s: float = opt(600.0, min=0.1, max=86400, doc="readings batched per CSV record")
    max_retries: int = opt(3, min=0, max=100, doc="retries of a failed reading before it counts as lost")
    temperature_sensor: str = opt("", doc="climate sensor whose temperature compensates the weight")
    temperature_position: str = opt("", doc="the probe position to use when temperature_sensor is a "
                                             "ds18b20 with several probes")
    compensation_kg_per_c: float = opt(0.0, min=-100, max=100, doc="weight drift per °C above the reference")
    reference_temperature_c: float = opt(20.0, min=-50, max=100)
    max_temperature_age_s: float = opt(300.0, min=0.01, max=86400, doc="an older temperature is not used")
    simulation: ScaleSimulationConfig | None = opt(None)
    replay: WeightReplayConfig | None = opt(None)

    def simulation_or_default(self) -> ScaleSimulationConfig:
        """The ``[simulation]`` table, or its defaults (a replaying scale uses its ``line_period_s``)."""
        return self.simulation or ScaleSimulationConfig()

    def request_bytes(self) -> bytes:
        """``request`` as sent on the wire: latin-1, with backslash escapes (``\\r``, ``\\x05``) decoded.
        Raises ``ValueError``."""
        raw = self.request.encode("latin-1")
        return raw.decode("unicode_escape").encode("latin-1") if b"\\" in raw else raw

    def check(self, path: Path, key: str) -> None:
        if self.record_window_s < self.interval_s:
            raise ConfigError(path, f"{key}.record_window_s", "must be >= interval_s")
        try:
            self.request_bytes()
        except ValueError as e:  # UnicodeError is one
            raise ConfigError(path, f"{key}.request", f"must be latin-1 text with valid escapes: {e}") from None
        if self.max_kg <= self.min_kg:
            raise ConfigError(path, f"{key}.max_kg", "must be > min_kg")
        if self.stopbits not in (1.0, 1.5, 2.0):
            raise ConfigError(path, f"{key}.stopbits", f"allowed: 1, 1.5, 2; got {self.stopbits:g}")
        try:
            regex = re.compile(self.line_regex)
        except re.error as e:
            raise ConfigError(path, f"{key}.line_regex", f"not a regular expression: {e}") from None
        if "value" not in regex.groupindex:
            raise ConfigError(path, f"{key}.line_regex", "needs a named group (?P<value>...) for the number")
        if self.temperature_sensor == self.name:
            raise ConfigError(path, f"{key}.temperature_sensor", "must name another sensor")
        if self.compensation_kg_per_c and not self.temperature_sensor:
            raise ConfigError(path, f"{key}.compensation_kg_per_c", "needs temperature_sensor")
        if self.simulated:
            if self.simulation is not None and self.replay is not None:
                raise ConfigError(path, f"{key}.replay", "set [simulation] or [replay], not both")
            if self.replay is not None:
                from beemond.sensors.scale.weights import weight_replay   # at check time: reads the file

                if not os.access(self.replay.file, os.R_OK) or not self.replay.file.is_file():
                    raise ConfigError(path, f"{key}.replay.file", f"cannot read {self.replay.file}")
                try:
                    weight_replay(self.replay)
                except ValueError as e:
                    raise ConfigError(path, f"{key}.replay", str(e)) from None
        elif self.simulation is not None or self.replay is not None:
            which = "simulation" if self.simulation is not None else "replay"
            raise ConfigError(path, f"{key}.{which}", "only a simulated backend has this table")

    def describe(self) -> str:
        where = "emulated on a pty" if self.simulated else f"{self.port} at {self.baudrate} baud"
        source = self.temperature_sensor + (f".{self.temperature_position}" if self.temperature_position else "")
        comp = f", {self.compensation_kg_per_c:g} kg/°C from {source}" if self.compensation_kg_per_c else ""
        return (f"{where}, median of {self.samples} every {self.interval_s:g} s, "
                f"a record per {self.record_window_s:g} s{comp}")

    def subscribes_to(self) -> tuple[str, ...]:
        return (self.temperature_sensor,) if self.temperature_sensor else ()

    def check_sources(self, path: Path, key: str, sensors: dict[str, SensorConfig]) -> None:
        if not self.temperature_sensor:
            if self.temperature_position:
                raise ConfigError(path, f"{key}.temperature_position", "needs temperature_sensor")
            return
        source = sensors[self.temperature_sensor]
        if not source.measures_temperature:
            kinds = ", ".join(t for t in registry.SENSORS if registry.section(registry.SENSORS, t, "sensor").measures_temperature)
            raise ConfigError(path, f"{key}.temperature_sensor", f"{source.name!r} is a {source.type} sensor, "
                              f"which measures no temperature (types that do: {kinds})")
        probes = getattr(source, "probes", None) or {}
        if self.temperature_position:
            if self.temperature_position not in probes:
                where = f"one of {', '.join(probes)}" if probes else f"only for a sensor with probes, not {source.type}"
                raise ConfigError(path, f"{key}.temperature_position",
                                  f"{self.temperature_position!r} is not a probe of {source.name}: {where}")
        elif len(probes) > 1:
            # Each probe sends its own temperature: without a choice the scale would mix them.
            raise ConfigError(path, f"{key}.temperature_position", f"required: {source.name} has "
                              f"{len(probes)} probes, name the one to use ({', '.join(probes)})")
