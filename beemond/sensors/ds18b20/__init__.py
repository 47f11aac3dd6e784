"""Maxim DS18B20 1-Wire temperature probes through the kernel's w1 sysfs files.

``section`` holds the ``[sensors.NAME]`` table's class, ``driver`` the worker, ``emulator`` the device
that :mod:`beemond.sensors.seams` puts behind the library's seam for ``backend = "simulated"``, and
``example.toml`` a config snippet.
"""

from beemond.registry import exports

__getattr__ = exports(__name__, Section=".section:DS18B20Config", Worker=".driver:DS18B20Worker")
