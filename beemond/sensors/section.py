"""Config sections shared by sensor types: a polled sensor's keys and the ``[replay]`` table of a
simulated one. Each type's own section is in its package (``beemond/sensors/TYPE/section.py``).

The replay is column-generic: ``columns`` maps each quantity the sensor records (its record column:
``temperature_c``, ``humidity_rh``, ``pressure_pa``, ``co2_ppm``, ...) to a column of the CSV file.
Without an entry a quantity uses :data:`DEFAULT_COLUMNS` (the UrBAN 2021 file's ``temperature`` and
``humidity``), so a table that names only ``file`` replays that data set. The older keys
``temperature_column``, ``humidity_column`` and ``pressure_column`` still name those three columns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, SensorConfig, opt

log = logging.getLogger(__name__)

# quantity -> the CSV column it is read from when the [replay] table does not say
DEFAULT_COLUMNS = {"temperature_c": "temperature", "humidity_rh": "humidity"}
# the older keys, each naming one quantity's column
LEGACY_KEYS = {"temperature_c": "temperature_column", "humidity_rh": "humidity_column", "pressure_pa": "pressure_column"}


@dataclass(frozen=True)
class ReplayConfig:
    """A CSV replayed through a simulated sensor (see data/urban-2021/README.md)."""

    file: Path = opt(Path(""), path=True)
    time_column: str = opt("Date")
    columns: dict[str, str] = opt(factory=dict, doc="quantity -> CSV column, e.g. {temperature_c = \"temperature\", "
                                                    "co2_ppm = \"co2\"} (default: temperature_c = \"temperature\", "
                                                    "humidity_rh = \"humidity\")")
    temperature_column: str = opt("", doc="older spelling of columns.temperature_c")
    humidity_column: str = opt("", doc="older spelling of columns.humidity_rh")
    pressure_column: str = opt("", doc="older spelling of columns.pressure_pa (bme280; default: the sensor's pressure_pa)")
    filter_column: str = opt("", doc="only rows whose column equals filter_value")
    filter_value: str = opt("")
    start: str = opt("", doc="ISO 8601 time of the first row to replay (default: the first row)")
    speedup: float = opt(0.0, min=0.0, max=1e7,
                         doc="0: one row per measurement; >0: replay time runs this much faster than wall time")
    loop: bool = opt(True, doc="start again from the first row at the end of the file")
    timezone: str = opt("UTC", doc="IANA zone of timestamps without an offset (e.g. Europe/Paris)")
    resume: bool = opt(True, doc="after a restart or crash continue after the last durable reading's row "
                                 "(kept in the sensor's journal); false: from start again")

    def column_keys(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
        """quantity -> (CSV column, the key that named it, relative to the table) for each quantity in
        *required* and each in *optional* that has a column. Raises ``ValueError`` (with that key) for
        a quantity named twice, a quantity not in either, or a required one without a column."""
        out: dict[str, tuple[str, str]] = {}
        for quantity in (*required, *optional):
            legacy = LEGACY_KEYS.get(quantity)
            given = [(self.columns[quantity], f"columns.{quantity}")] if quantity in self.columns else []
            if legacy and getattr(self, legacy):
                given.append((getattr(self, legacy), legacy))
            if len(given) > 1:
                raise ValueError(f"{legacy}: names the column of {quantity} again; keep columns.{quantity}")
            if given:
                out[quantity] = given[0]
            elif quantity in DEFAULT_COLUMNS:
                out[quantity] = (DEFAULT_COLUMNS[quantity], f"columns.{quantity}")
            elif quantity in required:
                raise ValueError(f"columns.{quantity}: required: the CSV column of {quantity}")
        known = (*required, *optional)
        for quantity in self.columns:
            if quantity not in known:
                raise ValueError(f"columns.{quantity}: not a quantity this sensor replays; allowed: {', '.join(known)}")
        return out

    def unread_legacy_keys(self, quantities: tuple[str, ...]) -> list[str]:
        """The older ``*_column`` keys set for a quantity not in *quantities*. Before ``columns``
        every table had all three and a sensor read its own (a DS18B20's copied ``humidity_column``):
        they are ignored, as then, never an error, so that such a config still loads."""
        return [key for quantity, key in LEGACY_KEYS.items() if getattr(self, key) and quantity not in quantities]


@dataclass(frozen=True)
class PolledSensorConfig(SensorConfig):
    """Keys of a sensor measured at an interval (``beemond.sensors.base.PolledSensorWorker``)."""

    interval_s: float = opt(60.0, min=0.05, max=86400, doc="time between measurements")
    record_window_s: float = opt(600.0, min=0.1, max=86400, doc="readings batched per CSV record")
    max_retries: int = opt(3, min=0, max=100, doc="retries of a failed measurement before it counts as lost")
    replay: ReplayConfig | None = opt(None)

    # The quantities (record columns) a simulated sensor of this type replays: each required one needs
    # a CSV column (its own or DEFAULT_COLUMNS'), an optional one is read only when named.
    replay_required = ("temperature_c", "humidity_rh")
    replay_optional = ()

    def replay_columns(self) -> dict[str, str]:
        """quantity -> CSV column of this sensor's replay (``{}`` without a ``[replay]`` table).
        Raises ``ValueError`` (see :meth:`ReplayConfig.column_keys`)."""
        if self.replay is None:
            return {}
        return {q: col for q, (col, _) in self.replay.column_keys(self.replay_required, self.replay_optional).items()}

    def check(self, path: Path, key: str) -> None:
        if self.record_window_s < self.interval_s:
            raise ConfigError(path, f"{key}.record_window_s", "must be >= interval_s")
        if self.simulated:
            if self.replay is None:
                raise ConfigError(path, f"{key}.replay", f"a simulated {self.type} needs a [replay] table with a CSV file")
            check_replay(self.replay, path, f"{key}.replay", self.replay_required, self.replay_optional)
        elif self.replay is not None:
            raise ConfigError(path, f"{key}.replay", "only a simulated backend replays a file")

    def describe(self) -> str:
        return f"every {self.interval_s:g} s, a record per {self.record_window_s:g} s"


def check_replay(replay: ReplayConfig, path: Path, key: str, required: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
    """The replay file is readable, has every column it names, and has rows to replay. Raises
    :class:`ConfigError` naming the key (``KEY.columns.QUANTITY``, ``KEY.time_column``, ...)."""
    from beemond.sensors.replay import CsvReplay, read_header, zone   # at check time: reads the file

    try:
        columns = replay.column_keys(required, optional)
    except ValueError as e:
        sub, _, message = str(e).partition(": ")
        raise ConfigError(path, f"{key}.{sub}", message) from None
    for sub in replay.unread_legacy_keys((*required, *optional)):
        log.warning("%s: %s.%s: ignored: this sensor replays only %s", path, key, sub, ", ".join((*required, *optional)))
    if not os.access(replay.file, os.R_OK) or not replay.file.is_file():
        raise ConfigError(path, f"{key}.file", f"cannot read {replay.file}")
    header = read_header(replay.file)
    named = [(replay.time_column, "time_column"), *columns.values(), (replay.filter_column, "filter_column")]
    for name, sub in named:
        if name and name not in header:
            raise ConfigError(path, f"{key}.{sub}", f"no column {name!r} in {replay.file.name} (has: {', '.join(header)})")
    try:
        zone(replay.timezone)
    except ValueError as e:
        raise ConfigError(path, f"{key}.timezone", str(e)) from None
    try:
        CsvReplay.from_config(replay, {q: col for q, (col, _) in columns.items()})
    except ValueError as e:
        raise ConfigError(path, key, str(e)) from None
