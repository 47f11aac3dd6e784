"""Every pluggable kind, named as a ``"module:Class"`` string and imported only when asked for.

The supervisor, the config loader and the worker runtime reach sensors, processors and worker roles
through these tables alone, so none of them imports a worker implementation (a worker loads only its
own libraries: numpy, PyAV, pyrage, ...). Adding a sensor type means one new package and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

# type = "..." in a [sensors.NAME] table -> its package's worker class. The package (beemond/sensors/TYPE/)
# exports ``Worker`` and ``Section`` (its config table's class) lazily, so that the config loader
# imports only the section and the supervisor nothing of it.
SENSORS = {
    "sht3x": "beemond.sensors.sht3x:Worker",
    "bme280": "beemond.sensors.bme280:Worker",
    "ds18b20": "beemond.sensors.ds18b20:Worker",
    "audio": "beemond.sensors.audio:Worker",
    "camera": "beemond.sensors.camera:Worker",
    "gpio": "beemond.sensors.gpio:Worker",
    "scale": "beemond.sensors.scale:Worker",
    "scd4x": "beemond.sensors.scd4x:Worker",
}

# type = "..." in a [processors.NAME] table -> its package's worker class (exports as for SENSORS).
PROCESSORS = {
    "audio_bands": "beemond.processors.audio_bands:Worker",
    "swarm": "beemond.processors.swarm:Worker",
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


def package(table: dict[str, str], kind: str) -> str:
    """The module (a plugin's package) that *table* names for *kind*. Raises ``KeyError``."""
    return table[kind].partition(":")[0]


def section(table: dict[str, str], kind: str, what: str) -> Any:
    """The config section class (``Section``) of the package *table* names for *kind*. Raises
    ``ValueError`` naming *what* for a kind the table lacks."""
    if kind not in table:
        raise ValueError(f"no {what} of type {kind!r}")
    return load(f"{package(table, kind)}:Section")


def exports(module: str, **specs: str):
    """A module ``__getattr__`` (PEP 562) for a plugin package: each name in *specs* is
    ``".submodule:attr"`` relative to *module*, imported on first use. A package's ``__init__`` sets
    ``__getattr__ = exports(__name__, Section=".section:XConfig", Worker=".driver:XWorker")``."""

    def __getattr__(name: str) -> Any:
        try:
            spec = specs[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        return load(module + spec)

    return __getattr__


def lookup(table: dict[str, str], kind: str, what: str) -> Any:
    """``load(table[kind])``. Raises ``ValueError`` naming *what* for a kind the table lacks."""
    try:
        spec = table[kind]
    except KeyError:
        raise ValueError(f"no {what} of type {kind!r}") from None
    return load(spec)
