"""Sensor drivers, one module per device, each with an emulator behind the library's seam."""

from __future__ import annotations

import importlib

# type = "..." -> "module:WorkerClass". One line per driver; the config class is in
# beemond.config.SENSOR_TYPES. Imported lazily so a worker loads only its own driver's libraries.
DRIVERS = {
    "sht3x": "beemond.sensors.sht3x:SHT3xWorker",
    "bme280": "beemond.sensors.bme280:BME280Worker",
    "ds18b20": "beemond.sensors.ds18b20:DS18B20Worker",
    "audio": "beemond.sensors.audio:AudioWorker",
    "camera": "beemond.sensors.camera:CameraWorker",
    "gpio": "beemond.sensors.gpio:GpioWorker",
    "scale": "beemond.sensors.scale:ScaleWorker",
}


def make_sensor_worker(cfg, sensor, channel):
    """The worker object for *sensor* (a ``SensorConfig``). Raises ``ValueError`` for an unknown type."""
    try:
        module, cls = DRIVERS[sensor.type].split(":")
    except KeyError:
        raise ValueError(f"no driver for sensor type {sensor.type!r}") from None
    return getattr(importlib.import_module(module), cls)(cfg, sensor, channel)
