"""Band power of audio records (FFT), and optional spectrograms.

``section`` holds the ``[processors.NAME]`` table's class, ``worker`` the worker, ``example.toml`` a
config snippet.
"""

from beemond.registry import exports

__getattr__ = exports(__name__, Section=".section:AudioBandsConfig", Worker=".worker:AudioBandsWorker")
