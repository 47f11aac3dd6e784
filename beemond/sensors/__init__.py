"""Sensor drivers, one module per device, each with an emulator behind the library's seam."""

from __future__ import annotations

from beemond.ipc import load_worker_class

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
    return load_worker_class(DRIVERS, sensor.type, "sensor driver")(cfg, sensor, channel)
