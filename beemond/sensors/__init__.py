"""Sensor drivers, one module per device, each with an emulator behind the library's seam."""

from __future__ import annotations


def make_sensor_worker(cfg, sensor, channel):
    """The worker object for *sensor* (a ``SensorConfig``); imports only that driver's libraries."""
    if sensor.type == "sht3x":
        from beemond.sensors.sht3x import SHT3xWorker

        return SHT3xWorker(cfg, sensor, channel)
    if sensor.type == "audio":
        from beemond.sensors.audio import AudioWorker

        return AudioWorker(cfg, sensor, channel)
    raise ValueError(f"no driver for sensor type {sensor.type!r}")
