"""beemond: a field recorder daemon for research beehives."""

__version__ = "0.1.0"
