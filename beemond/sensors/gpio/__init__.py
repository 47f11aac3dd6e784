"""GPIO inputs that trigger captures, and a status LED, through gpiozero.

``section`` holds the ``[sensors.NAME]`` table's class, ``driver`` the worker, ``emulator`` the device
that :mod:`beemond.sensors.seams` puts behind the library's seam for ``backend = "simulated"``, and
``example.toml`` a config snippet.
"""

from beemond.registry import exports

__getattr__ = exports(__name__, Section=".section:GpioConfig", Worker=".driver:GpioWorker")
