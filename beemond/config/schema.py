"""What every config section is built from: :func:`opt` fields, :class:`ConfigError`, and the base
classes of sensor and processor sections (each type's subclass lives in its own package).

A section is a frozen dataclass whose fields carry their validation facts (:func:`opt`: range,
choices, path, secret); :mod:`beemond.config.loader` builds it from a table and checks each key.
Imports only the standard library and :mod:`beemond.core.names`: every section module imports this one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beemond import errors
from beemond.errors import BeemondError
from beemond.core.names import HOST_RE, NAME_RE  # noqa: F401  (shared with the lab)

EX_CONFIG = errors.EX_CONFIG
HARDWARE, SIMULATED = "hardware", "simulated"   # a sensor's backend


class ConfigError(BeemondError, ValueError):
    """A configuration problem; ``str()`` is the one line shown to the user."""

    def __init__(self, file: str | os.PathLike, key: str, message: str):
        self.file, self.key, self.message = str(file), key, message
        super().__init__(f"{self.file}: {key}: {message}" if key else f"{self.file}: {message}")


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, doc: str = "",
         min: float | None = None, max: float | None = None, choices: tuple | None = None,
         path: bool = False, secret: bool = False):
    """A dataclass field with the validation facts the loader checks."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "path": path, "secret": secret}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_TEMPLATE = "{{ sensor }}_{{ start }}_{{ end }}.{{ ext }}"


@dataclass(frozen=True)
class SensorConfig:
    """Keys every sensor has. A sensor type is a subclass in its package (``beemond/sensors/TYPE/section.py``, named by ``beemond.registry.SENSORS``); it may
    override :meth:`check` (cross-key rules), :meth:`describe` (its ``check-config`` line),
    :meth:`subscribes_to` (other sensors whose readings the orchestrator must forward to it) and
    :meth:`check_sources` (rules about those sensors)."""

    # Sends ``temperature_celsius`` samples (a scale's temperature_sensor must be such a sensor).
    measures_temperature = False

    name: str = opt("")
    type: str = opt("")
    backend: str = opt(HARDWARE, choices=(HARDWARE, SIMULATED))
    enabled: bool = opt(True)
    filename_template: str = opt("", doc="overrides [archive] filename_template")
    # A GPIO pin that switches the sensor's supply (a MOSFET or load switch): on power_lead_s before
    # each measurement or capture, off after it (beemond.sensors.power.PowerSwitch).
    power_pin: int | None = opt(None, min=0, max=27, doc="BCM pin enabling the sensor's power, if any")
    power_lead_s: float = opt(0.0, min=0.0, max=600, doc="power on this long before a measurement")
    power_active_high: bool = opt(True, doc="false: the enable pin is active low")

    @property
    def simulated(self) -> bool:
        """``backend = "simulated"``: an emulator stands behind the library's seam (which one:
        :mod:`beemond.sensors.seams`, the only module that builds a device from this)."""
        return self.backend == SIMULATED

    def check(self, path: Path, key: str) -> None:
        """Raise :class:`ConfigError` for a rule that spans several keys or needs a file."""

    def describe(self) -> str:
        return ""

    def subscribes_to(self) -> tuple[str, ...]:
        """Names of sensors whose ``sample`` events this sensor receives as ``sample`` commands."""
        return ()

    def check_sources(self, path: Path, key: str, sensors: dict[str, "SensorConfig"]) -> None:
        """Raise :class:`ConfigError` when a sensor named by :meth:`subscribes_to` (configured, in
        *sensors* by name) cannot give what this one needs."""

    def gpio_pins(self) -> dict[str, int]:
        """BCM pins this sensor claims, by key (relative to the sensor's table); each pin once per host."""
        return {"power_pin": self.power_pin} if self.power_pin is not None else {}

    def capture_targets(self) -> dict[str, tuple[str, ...]]:
        """Sensors this one asks to capture (``ipc.CAPTURE_REQUEST``), by key; each must be configured."""
        return {}


@dataclass(frozen=True)
class ProcessorConfig:
    """Keys every processor has (``beemond.processors``). A processor type is a subclass registered in
    ``beemond.registry.PROCESSORS``. The three spacings (seconds, 0 = off) are defined exactly in
    :class:`beemond.processors.base.Spacing`."""

    name: str = opt("")
    type: str = opt("")
    sensor: str = opt("", doc="the sensor whose records or samples this processor reads")
    enabled: bool = opt(True)
    min_input_spacing: float = opt(0.0, min=0.0, max=86400 * 7, doc="s of data time between accepted inputs")
    min_step_spacing: float = opt(0.0, min=0.0, max=86400 * 7, doc="s of run time between processing steps")
    min_output_spacing: float = opt(0.0, min=0.0, max=86400 * 7, doc="s of data time between output records")
    filename_template: str = opt("", doc="overrides [archive] filename_template")

    def check(self, path: Path, key: str, sensor: SensorConfig) -> None:
        """Raise :class:`ConfigError` for a rule that spans several keys or needs the sensor's config."""

    def describe(self) -> str:
        return ""
