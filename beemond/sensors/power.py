"""A sensor's power switch: a GPIO pin (a MOSFET or load switch) that powers it around each use.

Any sensor type may have one (``power_pin``, ``power_lead_s``, ``power_active_high``); the polled
worker, the audio and the camera workers wrap each measurement or capture in it. The pin is a
gpiozero ``DigitalOutputDevice`` on the pin factory :func:`beemond.sensors.seams.pin_factory` chooses
(gpiozero's ``MockFactory`` for a simulated sensor).
"""

from __future__ import annotations

import contextlib
import time

from beemond.sensors import seams


class PowerSwitch:
    """A sensor's power-enable pin: on ``lead_s`` seconds before a measurement, off after it.

    Use as a context manager around one measurement or capture. The lead wait calls *beat* (the
    worker's ``Channel.beat``) so a long warm-up never looks like a hung worker. Nested use keeps the
    power on until the outermost block ends.
    """

    def __init__(self, pin: int, lead_s: float = 0.0, active_high: bool = True, factory=None, beat=None):
        from gpiozero import DigitalOutputDevice

        self.device = DigitalOutputDevice(pin, active_high=active_high, initial_value=False, pin_factory=factory)
        self.lead_s = lead_s
        self.beat = beat or (lambda: None)
        self.depth = 0

    def __enter__(self) -> "PowerSwitch":
        self.depth += 1
        if self.depth == 1:
            self.device.on()
            until = time.monotonic() + self.lead_s
            while (left := until - time.monotonic()) > 0:
                self.beat()
                time.sleep(min(left, 0.5))
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.device.off()

    def close(self) -> None:
        self.device.close()


def power_switch(sensor, beat=None, factory=None):
    """The sensor's :class:`PowerSwitch`, or a do-nothing context (with ``close``) if it has no power_pin."""
    if sensor.power_pin is None:
        return _NoPower()
    if factory is None:
        factory = seams.pin_factory(sensor)
    return PowerSwitch(sensor.power_pin, sensor.power_lead_s, sensor.power_active_high, factory, beat)


class _NoPower(contextlib.nullcontext):
    def close(self) -> None:
        pass
