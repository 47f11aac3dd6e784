"""The one place where ``backend = "simulated"`` becomes an emulated device (DESIGN.md, "Hardware seams").

A driver asks this module for the object it talks to, exactly as it would talk to the hardware
library's own: an ``smbus2.SMBus``-compatible bus, a 1-Wire sysfs devices directory, a serial port
path, a ``sounddevice.InputStream``-compatible stream, a ``picamera2`` backend or a gpiozero pin
factory. With ``backend = "hardware"`` that is the library's object; with ``"simulated"`` it is the
emulator behind the same seam, fed from the sensor's replay or synthetic source. Drivers never import
an emulator; emulators import their package's chip logic (``chip.py``) and :mod:`.replay`, never a
driver.

Each sensor package's ``emulator`` module provides what its seam needs here: ``emulated_chip(sensor,
replay)`` for an I2C chip, ``W1Tree`` for 1-Wire probes, ``serial_source(sensor)`` and
``ScaleEmulator`` for the scale, ``SimulatedInputStream`` for audio, ``StandInBackend`` for the
camera, ``PinPulser`` for GPIO inputs. The package is found through :mod:`beemond.registry`, so a new
sensor type on an existing seam (an I2C chip) needs no line here.

Emulators are imported only when a sensor is simulated, in its own worker process: the orchestrator
and the config loader never import them.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from beemond import registry

SYSFS_W1_DEVICES = Path("/sys/bus/w1/devices")


def simulated(section) -> bool:
    """Whether *section* (a sensor's config) runs against an emulator instead of its hardware."""
    return section.simulated


def emulator(sensor):
    """The ``emulator`` module of *sensor*'s package (``beemond.sensors.TYPE.emulator``)."""
    return importlib.import_module(f"{registry.package(registry.SENSORS, sensor.type)}.emulator")


# ---------------------------------------------------------------------------------------------- I2C

def i2c_bus(sensor) -> tuple[Any, Any, Any]:
    """``(bus, chip, replay)`` for a sensor with ``bus``, ``address`` and ``replay`` keys.

    Hardware: ``smbus2.SMBus(sensor.bus)`` (``/dev/i2c-N``; raises ``OSError`` when it cannot be
    opened), and ``None, None``. Simulated: an :class:`beemond.sensors.emulated_i2c.EmulatedSMBus`
    with the package's emulated chip at ``sensor.address``, and that chip (whose ``served`` lists the
    replay row behind each value) and its :class:`beemond.sensors.replay.CsvReplay`. Raises
    ``ValueError`` for a replay file that cannot be replayed.
    """
    if not simulated(sensor):
        from smbus2 import SMBus

        return SMBus(sensor.bus), None, None
    from beemond.sensors.emulated_i2c import EmulatedSMBus
    from beemond.sensors.replay import CsvReplay

    replay = CsvReplay.from_config(sensor.replay, sensor.replay_columns())
    chip = emulator(sensor).emulated_chip(sensor, replay)
    return EmulatedSMBus(sensor.bus, {sensor.address: chip}), chip, replay


# ---------------------------------------------------------------------------------------------- 1-Wire

@dataclass
class W1Devices:
    """The sysfs 1-Wire devices directory a DS18B20 driver reads, and (simulated) the emulated tree
    that writes it; :meth:`close` removes a temporary tree."""

    base: Path
    tree: Any = None          # beemond.sensors.ds18b20.emulator.W1Tree when simulated
    scratch: str | None = None

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def w1_devices(sensor) -> W1Devices:
    """Hardware: ``base_path`` or ``/sys/bus/w1/devices``. Simulated: a tree in the kernel's format at
    ``base_path``, or in a temporary directory (not in the spool: a stand-in for sysfs is neither data
    nor worth SD-card writes), with one emulated probe per configured ROM id."""
    if not simulated(sensor):
        return W1Devices(sensor.base_path or SYSFS_W1_DEVICES)
    scratch = None
    base = sensor.base_path
    if base is None:
        scratch = tempfile.mkdtemp(prefix=f"beemond-w1-{sensor.name}-")
        base = Path(scratch)
    return W1Devices(base, emulator(sensor).W1Tree.from_replay(base, sensor), scratch)


# ---------------------------------------------------------------------------------------------- serial

def serial_port(sensor, request: bytes) -> tuple[str, Any]:
    """``(path, emulator)``: the serial device to open with pyserial's ``serial.Serial``.

    Hardware: ``sensor.port`` and ``None``. Simulated: the pty of a started scale emulator (a thread in
    this process speaking the line protocol, answering *request* or streaming) and that emulator,
    whose ``source`` is the replay or the synthetic weight; stop it with ``emulator.stop()``.
    """
    if not simulated(sensor):
        return sensor.port, None
    emu = emulator(sensor)
    device = emu.ScaleEmulator(emu.serial_source(sensor), request=request,
                               period_s=sensor.simulation_or_default().line_period_s).start()
    return device.path, device


# ---------------------------------------------------------------------------------------------- audio

def input_stream(sensor, hardware: Callable[..., tuple[Any, str]], **kwargs) -> tuple[Any, str]:
    """``(stream, device name)``: an unstarted ``sounddevice.InputStream``-compatible stream.

    Hardware: ``hardware(**kwargs)`` (the driver's PortAudio path, which raises its own errors).
    Simulated: a :class:`beemond.sensors.audio.emulator.SimulatedInputStream` with the same
    arguments, playing the sensor's ``tone_hz``/``noise`` hum and flagging ``overflow_every``.
    """
    if not simulated(sensor):
        return hardware(**kwargs)
    stream = emulator(sensor).SimulatedInputStream(tone_hz=sensor.tone_hz, noise=sensor.noise,
                                                   overflow_every=sensor.overflow_every, **kwargs)
    return stream, "simulated"   # the device name in logs and record metadata


# ---------------------------------------------------------------------------------------------- camera

def camera_backend(sensor, hardware: Callable[[], Any]):
    """picamera2's classes (``hardware()``, which raises ``CameraUnavailable``), or simulated the
    stand-in with the same methods (:class:`beemond.sensors.camera.emulator.StandInBackend`)."""
    if not simulated(sensor):
        return hardware()
    return emulator(sensor).StandInBackend()


# ---------------------------------------------------------------------------------------------- GPIO

def pin_factory(sensor):
    """gpiozero's ``MockFactory`` for a simulated sensor; ``None`` (gpiozero's default, lgpio on
    Raspberry Pi OS bookworm) on hardware. Also the factory of a sensor's power switch."""
    if not simulated(sensor):
        return None
    from gpiozero.pins.mock import MockFactory

    return MockFactory()


def input_pulsers(sensor, devices: dict) -> list:
    """Simulated: a :class:`beemond.sensors.gpio.emulator.PinPulser` (a person at the hive) for each
    input with ``trigger_every_s``, driving its gpiozero device's mock pin; hardware: none."""
    if not simulated(sensor):
        return []
    PinPulser = emulator(sensor).PinPulser
    return [PinPulser(devices[name].pin, active_low=devices[name].pull_up, every_s=inp.trigger_every_s)
            for name, inp in sensor.inputs.items() if inp.trigger_every_s]
