"""Sensor drivers, one module per device, each with an emulator behind the library's seam."""

from __future__ import annotations

from beemond import registry


def make_sensor_worker(cfg, sensor, channel):
    """The worker object for *sensor* (a ``SensorConfig``). Raises ``ValueError`` for an unknown type."""
    return registry.lookup(registry.SENSORS, sensor.type, "sensor driver")(cfg, sensor, channel)
