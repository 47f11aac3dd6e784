"""Configuration: the loader (:mod:`beemond.config.loader`) and the sections it builds."""

from beemond.config.loader import *  # noqa: F401,F403
