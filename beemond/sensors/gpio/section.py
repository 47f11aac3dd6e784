"""``[sensors.NAME]`` with ``type = "gpio"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import NAME_RE, ConfigError, SensorConfig, opt


@dataclass(frozen=True)
class GpioInputConfig:
    """One input of a ``gpio`` sensor: ``[sensors.NAME.inputs.INPUT]``."""

    pin: int = opt(-1, min=0, max=27, doc="BCM pin number")
    kind: str = opt("button", choices=("button", "motion", "beam"), doc="push button, PIR sensor, IR break beam")
    targets: tuple[str, ...] = opt(factory=tuple, doc="sensors that capture when this input activates")
    pull_up: bool | None = opt(None, doc="internal pull-up (default: on for button and beam, off for motion)")
    bounce_s: float = opt(0.05, min=0.0, max=10, doc="debounce time")
    cooldown_s: float = opt(5.0, min=0.0, max=86400, doc="ignore activations this long after one that triggered")
    trigger_every_s: float = opt(0.0, min=0.0, max=86400,
                                  doc="simulated backend: the emulated input activates this often (0: never)")


@dataclass(frozen=True)
class GpioConfig(SensorConfig):
    """GPIO inputs that trigger captures, and a status LED (beemond.sensors.gpio.driver)."""

    inputs: dict[str, GpioInputConfig] = opt(factory=dict, doc="named inputs: [sensors.NAME.inputs.INPUT]")
    status_led_pin: int | None = opt(None, min=0, max=27, doc="BCM pin of a status LED (blinks while running)")
    record_window_s: float = opt(600.0, min=0.1, max=86400, doc="input events batched per CSV record")

    def check(self, path: Path, key: str) -> None:
        if not self.inputs and self.status_led_pin is None:
            raise ConfigError(path, key, "a gpio sensor needs at least one [inputs.NAME] table or status_led_pin")
        for name, inp in self.inputs.items():
            if not NAME_RE.match(name):
                raise ConfigError(path, f"{key}.inputs.{name}", f"input name must match {NAME_RE.pattern}")
            if inp.pin < 0:
                raise ConfigError(path, f"{key}.inputs.{name}.pin", "required: a BCM pin number 0-27")
            if inp.trigger_every_s and not self.simulated:
                raise ConfigError(path, f"{key}.inputs.{name}.trigger_every_s", "only a simulated backend emulates inputs")

    def gpio_pins(self) -> dict[str, int]:
        pins = super().gpio_pins()
        if self.status_led_pin is not None:
            pins["status_led_pin"] = self.status_led_pin
        pins.update({f"inputs.{name}.pin": inp.pin for name, inp in self.inputs.items()})
        return pins

    def capture_targets(self) -> dict[str, tuple[str, ...]]:
        return {f"inputs.{name}.targets": inp.targets for name, inp in self.inputs.items()}

    def describe(self) -> str:
        parts = [f"{name}: {inp.kind} on GPIO{inp.pin} -> {', '.join(inp.targets) or 'nothing'}"
                 for name, inp in self.inputs.items()]
        if self.status_led_pin is not None:
            parts.append(f"status LED on GPIO{self.status_led_pin}")
        return "; ".join(parts)
