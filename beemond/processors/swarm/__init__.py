"""Swarm alerts from a sudden drop of the hive's weight.

``section`` holds the ``[processors.NAME]`` table's class, ``worker`` the worker, ``example.toml`` a
config snippet.
"""

from beemond.registry import exports

__getattr__ = exports(__name__, Section=".section:SwarmConfig", Worker=".worker:SwarmWorker")
