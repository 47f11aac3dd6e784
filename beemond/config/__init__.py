"""Configuration: TOML first, INI accepted; see :mod:`beemond.config.loader` for the schema.

``load(path)`` returns a :class:`Config` or raises :class:`ConfigError` (exit 78 in the CLI).
:mod:`.schema` has the field facts and base classes, :mod:`.sections` the daemon-wide sections,
:mod:`.rules` the rules across sections; each sensor's and processor's section is in its package.
"""

from beemond.config.loader import load, status_socket
from beemond.config.rules import summary
from beemond.config.schema import (DEFAULT_TEMPLATE, EX_CONFIG, HOST_RE, NAME_RE, ConfigError, ProcessorConfig,
                                   SensorConfig, opt)
from beemond.config.sections import (WINDOW_RE, ArchiveConfig, BundleConfig, Config, DaemonConfig, MetricsConfig,
                                     TelemetryConfig, UploadConfig, parse_window)

__all__ = ["load", "status_socket", "summary", "DEFAULT_TEMPLATE", "EX_CONFIG", "HOST_RE", "NAME_RE", "ConfigError",
           "ProcessorConfig", "SensorConfig", "opt", "WINDOW_RE", "ArchiveConfig", "BundleConfig", "Config",
           "DaemonConfig", "MetricsConfig", "TelemetryConfig", "UploadConfig", "parse_window"]
