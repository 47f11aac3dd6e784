"""Every pluggable kind, named as a ``"module:Class"`` string and imported only when asked for.

The supervisor, the config loader and the worker runtime reach sensors, processors and worker roles
through these tables alone, so none of them imports a worker implementation (a worker loads only its
own libraries: numpy, PyAV, pyrage, ...). Adding a sensor type means one new package and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

# type = "..." in a [[sensor]] table -> its worker class.
SENSORS = {
    "sht3x": "beemond.sensors.sht3x:SHT3xWorker",
    "bme280": "beemond.sensors.bme280:BME280Worker",
    "ds18b20": "beemond.sensors.ds18b20:DS18B20Worker",
    "audio": "beemond.sensors.audio:AudioWorker",
    "camera": "beemond.sensors.camera:CameraWorker",
    "gpio": "beemond.sensors.gpio:GpioWorker",
    "scale": "beemond.sensors.scale:ScaleWorker",
}

# type = "..." in a [[processor]] table -> its worker class.
PROCESSORS = {
    "audio_bands": "beemond.processors.audio_bands:AudioBandsWorker",
    "swarm": "beemond.processors.swarm:SwarmWorker",
}

# The daemon's own singleton roles -> their worker class.
ROLES = {
    "aggregator": "beemond.aggregator:Aggregator",
    "uploader": "beemond.upload.uploader:Uploader",
    "telemetry": "beemond.telemetry.worker:TelemetryWorker",
}

# protocol = "..." in [upload] -> its transport class (beemond.upload.transport describes the interface).
UPLOADS = {
    "ftp": "beemond.upload.ftp:FtpTransport",
    "ftps": "beemond.upload.ftp:FtpsTransport",
    "sftp": "beemond.upload.sftp:SftpTransport",
    "s3": "beemond.upload.s3:S3Transport",
    "local": "beemond.upload.local:LocalTransport",
}


def load(spec: str) -> Any:
    """The object named by ``"module:attr"``, importing its module now."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def lookup(table: dict[str, str], kind: str, what: str) -> Any:
    """``load(table[kind])``. Raises ``ValueError`` naming *what* for a kind the table lacks."""
    try:
        spec = table[kind]
    except KeyError:
        raise ValueError(f"no {what} of type {kind!r}") from None
    return load(spec)
