"""Configuration: TOML (``tomllib``) first, legacy INI (``configparser``) with the same schema.

The file is parsed once, at load, into typed dataclasses. Anything wrong (an unknown key, a
wrong type, a value out of range, an unreadable file, a template that does not compile, a recipient
that is not an age public key) raises :class:`ConfigError`, whose one-line message names the file, the
key and what is allowed. The CLI turns it into exit status 78 (``EX_CONFIG``, sysexits.h).

Relative paths in the file are resolved against the directory that holds the file, so a config and
the data it points at can move together.

Schema (TOML; INI uses ``[daemon]``, ``[archive]``, ``[bundle]``, ``[upload]``, ``[sensor.NAME]`` and
``[sensor.NAME.replay]`` sections with the same keys)::

    [daemon]   host, spool_dir, log_level, heartbeat_interval_s, heartbeat_timeout_s,
               restart_backoff_initial_s, restart_backoff_max_s, crash_loop_limit,
               crash_loop_window_s, shutdown_timeout_s, spool_max_bytes, spool_min_free_bytes,
               drop_oldest_when_full, status_socket
    [archive]  filename_template, default_metadata (a table), max_retries
    [bundle]   max_duration_s, max_bytes, recipients, split_by_sensor, signing_key, signing_key_credential
    [upload]   protocol, endpoint, bucket, region (s3), host, port, user, password_file, password_credential, ca_file, key_file,
               key_credential, known_hosts, remote_dir, layout, timeout_s, backoff_initial_s,
               backoff_max_s, shutdown_grace_s, backlog_order, rate_limit_bytes_per_s,
               keep_uploaded_bytes
    [upload.windows]  SENSOR = "HH:MM-HH:MM"
    [sensors.NAME]          type = one of beemond.registry.SENSORS ("sht3x", "bme280", "ds18b20", "audio",
                            "camera", "gpio", "scale"), backend = "hardware" | "simulated", power_pin,
                            power_lead_s, power_active_high, and the type's own keys
                            (beemond/sensors/TYPE/section.py; an example in TYPE/example.toml)
    [sensors.NAME.replay]   (sht3x, bme280, ds18b20; simulated) file, time_column, columns (quantity ->
                            CSV column), filter_column, filter_value, ... (beemond.sensors.section)
    [sensors.NAME.probes]   (ds18b20) position = "28-xxxxxxxxxxxx", one per probe
    [sensors.NAME.inputs.INPUT]  (gpio) pin, kind, targets, pull_up, bounce_s, cooldown_s, trigger_every_s
    [metrics]  enabled, address, port, staleness_s
    [telemetry]  enabled, broker, port, tls, ca_file, user, password_file, password_credential, client_id,
               layout ("beemond" | "kotori"), topic, status_topic, home_assistant, ... (beemond.telemetry)
    [processors.NAME]       type = one of beemond.registry.PROCESSORS ("audio_bands", "swarm"),
                            sensor = "NAME", min_input_spacing, min_step_spacing, min_output_spacing,
                            and the type's own keys (beemond/processors/TYPE/section.py)

This module reads the file and walks its tables: each daemon-wide table is built as its class in
:mod:`beemond.config.sections`, each ``[sensors.NAME]``/``[processors.NAME]`` table as the ``Section``
of the package :mod:`beemond.registry` names for its ``type``; every key is checked against the
class's fields (:func:`beemond.config.schema.opt`). Rules across sections are in
:mod:`beemond.config.rules`.
"""
from __future__ import annotations

import configparser
import dataclasses
import math
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from beemond import registry
import beemond.config.checks as config_checks
from beemond.config.rules import check_semantics
from beemond.config.schema import HOST_RE, NAME_RE, ConfigError
from beemond.config.sections import (ArchiveConfig, BundleConfig, Config, DaemonConfig, MetricsConfig,
                                     TelemetryConfig, UploadConfig)

_SECTIONS = {"daemon": DaemonConfig, "archive": ArchiveConfig, "bundle": BundleConfig, "upload": UploadConfig,
             "metrics": MetricsConfig, "telemetry": TelemetryConfig}


def load(path: str | os.PathLike, *, semantics: bool = True) -> Config:
    """Read, validate and type a config file. Raises :class:`ConfigError`.

    *semantics* False skips the cross-field checks (:func:`beemond.config.rules.check_semantics`: templates compiled with
    Jinja2, recipients parsed with pyrage, the signing key, replay files read): the daemon runs the full
    load in a short-lived child instead (``Orchestrator.from_file``), so that the orchestrator, which
    lives for months, never imports those libraries."""
    path = Path(path)
    return _from_tree(path, *_read_tree(path), semantics=semantics)


def _read_tree(path: Path) -> tuple[dict, bool]:
    """The parsed file and whether its values are INI strings. Raises :class:`ConfigError`, whose
    ``__cause__`` is the ``OSError`` (e.g. ``PermissionError``) when the file could not be read."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read file: {e.strerror or e}") from e
    if path.suffix.lower() in (".ini", ".conf", ".cfg"):
        return _ini_tree(path, raw), True
    try:
        return tomllib.loads(raw.decode("utf-8")), False
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:  # tomllib: an integer over 4,300 digits; arrays nested 1,000 deep
        raise ConfigError(path, "", f"not valid TOML: {'a number too long' if isinstance(e, ValueError) else 'nested too deeply'} "
                          "for any config") from None


def status_socket(path: str | os.PathLike) -> Path:
    """The daemon's status socket as *path* configures it (``daemon.status_socket``, else
    ``SPOOL/status.sock``), reading only those two keys: the command-line clients need nothing else,
    so a user who may read the config but not the recipients or the signing key can still ask.
    Raises :class:`ConfigError` (unreadable file, not TOML/INI, a bad value of these keys)."""
    path = Path(path)
    tree, strings = _read_tree(path)
    table = tree.get("daemon", {})
    if not isinstance(table, dict):
        raise ConfigError(path, "daemon", "must be a table")
    fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    hints = get_type_hints(DaemonConfig)
    found = {k: _coerce(hints[k], fields[k], table[k], path, f"daemon.{k}", path.parent.resolve(), strings)
             for k in ("spool_dir", "status_socket") if k in table}
    return found.get("status_socket") or found.get("spool_dir", fields["spool_dir"].default) / "status.sock"


def _ini_tree(path: Path, raw: bytes) -> dict:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive, as in TOML
    try:
        parser.read_string(raw.decode("utf-8"), source=str(path))
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(path, "", f"not valid INI: {' '.join(str(e).split())}") from None
    tree: dict[str, Any] = {}
    for key, message in config_checks.ini_shadowing({s: tuple(parser[s]) for s in parser}):
        raise ConfigError(path, key, message)
    for section in parser.sections():
        parts = section.split(".")
        if parts[0] in ("sensor", "processor"):  # [sensor.NAME], [sensor.NAME.replay], [processor.NAME]
            parts[0] += "s"
        node = tree
        for part in parts:
            node = node.setdefault(part, {})
        node.update(parser[section])
    return tree


def _from_tree(path: Path, tree: dict, strings: bool, semantics: bool = True) -> Config:
    base = path.parent.resolve()
    unknown = set(tree) - set(_SECTIONS) - {"sensors", "processors"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(path, key, f"unknown section; allowed: {', '.join([*_SECTIONS, 'sensors', 'processors'])}")
    built = {}
    for name, cls in _SECTIONS.items():
        table = tree.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(path, name, "must be a table")
        built[name] = _build(cls, table, path, name, base, strings)
    daemon: DaemonConfig = built["daemon"]
    if not daemon.host:
        daemon = dataclasses.replace(daemon, host=socket.gethostname().split(".")[0] or "beemond")
    if not HOST_RE.match(daemon.host):
        raise ConfigError(path, "daemon.host", f"must match {HOST_RE.pattern}, got {daemon.host!r}")
    if daemon.heartbeat_timeout_s <= daemon.heartbeat_interval_s:
        raise ConfigError(path, "daemon.heartbeat_timeout_s", "must be greater than heartbeat_interval_s")

    sensors = _typed_tables(path, tree, "sensors", "sensor", registry.SENSORS, base, strings)
    if not sensors:
        raise ConfigError(path, "sensors", "at least one enabled sensor is required")
    processors = _typed_tables(path, tree, "processors", "processor", registry.PROCESSORS, base, strings)
    cfg = Config(source=path.resolve(), daemon=daemon, archive=built["archive"], bundle=built["bundle"],
                 upload=built["upload"], sensors=tuple(sensors), metrics=built["metrics"],
                 processors=processors, telemetry=built["telemetry"])
    if semantics:
        check_semantics(cfg, path)
    return cfg


def _typed_tables(path: Path, tree: dict, section: str, what: str, types: dict, base: Path, strings: bool) -> tuple:
    """The enabled ``[section.NAME]`` tables, each built as the ``Section`` of the package that
    *types* (``registry.SENSORS`` or ``registry.PROCESSORS``) names for its ``type``."""
    tables = tree.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(path, section, f"must be a table of tables, one per {what}")
    out = []
    for name, table in tables.items():
        key = f"{section}.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(path, key, f"{what} name must match {NAME_RE.pattern}")
        if not isinstance(table, dict):
            raise ConfigError(path, key, "must be a table")
        kind = table.get("type")
        if not isinstance(kind, str) or kind not in types:
            raise ConfigError(path, f"{key}.type", f"required; allowed: {', '.join(types)}, got {kind!r}")
        item = _build(registry.section(types, kind, what), {**table, "name": name}, path, key, base, strings)
        if item.enabled:
            out.append(item)
    return tuple(out)


# Keys that moved (never released where they were): a clear pointer beats "unknown key".
MOVED = {"upload.min_free_bytes": "daemon.spool_min_free_bytes",
         "upload.drop_oldest_when_full": "daemon.drop_oldest_when_full"}


def _build(cls, table: dict, path: Path, prefix: str, base: Path, strings: bool):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if full in MOVED:
            raise ConfigError(path, full, f"moved to {MOVED[full]}")
        if key not in fields:
            allowed = ", ".join(n for n in fields if n != "name")
            raise ConfigError(path, full, f"unknown key; allowed: {allowed}")
        values[key] = _coerce(hints[key], fields[key], value, path, full, base, strings)
    return cls(**values)


def _coerce(hint, f: dataclasses.Field, value, path: Path, key: str, base: Path, strings: bool):
    meta = f.metadata
    origin, args = get_origin(hint), get_args(hint)
    if origin is not None and type(None) in args:  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    if origin is dict and dataclasses.is_dataclass(args[1]):  # named tables: [sensors.NAME.inputs.X]
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError(path, key, "must be a table of tables")
        return {name: _build(args[1], table, path, f"{key}.{name}", base, strings) for name, table in value.items()}
    if dataclasses.is_dataclass(hint):  # a nested table such as [sensors.NAME.replay]
        if not isinstance(value, dict):
            raise ConfigError(path, key, "must be a table")
        return _build(hint, value, path, key, base, strings)

    def bad(expected: str):
        return ConfigError(path, key, f"must be {expected}, got {value!r}")

    if hint is dict:  # a free-form table of plain values (INI: a section's keys, as strings)
        if not isinstance(value, dict):
            raise bad("a table")
        for k, v in value.items():
            ok = isinstance(v, (str, int, float, bool)) or (isinstance(v, dict) and all(
                isinstance(x, (str, int, float, bool)) for x in v.values()))
            if not ok:
                raise ConfigError(path, f"{key}.{k}", f"must be a string, number, boolean or a table of them, got {v!r}")
        return dict(value)
    if hint is bool:
        if strings and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "yes", "true", "on"):
                return True
            if low in ("0", "no", "false", "off"):
                return False
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint in (int, float):
        if strings and isinstance(value, str):
            try:
                value = int(value, 0) if hint is int else float(value)
            except ValueError:
                raise bad("an integer" if hint is int else "a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            raise bad("an integer" if hint is int else "a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(path, key, f"must be >= {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(path, key, f"must be <= {meta['max']}, got {value!r}")
        return hint(value)
    if origin is dict:  # a table of strings, such as [sensors.NAME.probes], [upload.windows]
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of strings")
        return dict(value)
    if origin is tuple:
        if strings and isinstance(value, str):
            value = [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty path string")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else Path(os.path.normpath(base / p))
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(path, key, f"allowed: {', '.join(meta['choices'])}; got {value!r}")
        return value
    raise ConfigError(path, key, f"unsupported type {hint}")  # a bug in the schema, not in the file
