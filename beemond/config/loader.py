"""Configuration: TOML (``tomllib``) first, legacy INI (``configparser``) with the same schema.

The file is parsed once, at load, into the typed dataclasses below. Anything wrong (an unknown key, a
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
    [sensors.NAME]          type = "sht3x" | "bme280" | "ds18b20" | "audio" | "camera" | "gpio" | "scale",
                            backend = "hardware" | "simulated", power_pin, power_lead_s, power_active_high, ...
    [sensors.NAME.replay]   (sht3x, bme280, ds18b20; simulated) file, time_column, temperature_column, ...
    [sensors.NAME.probes]   (ds18b20) position = "28-xxxxxxxxxxxx", one per probe
    [sensors.NAME.inputs.INPUT]  (gpio) pin, kind, targets, pull_up, bounce_s, cooldown_s, trigger_every_s
    [metrics]  enabled, address, port, staleness_s
    [telemetry]  enabled, broker, port, tls, ca_file, user, password_file, password_credential, client_id,
               layout ("beemond" | "kotori"), topic, status_topic, home_assistant, ... (beemond.telemetry)
    [processors.NAME]       type = "audio_bands" | "swarm", sensor = "NAME", min_input_spacing,
                            min_step_spacing, min_output_spacing, ... (see beemond.processors)
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from beemond import registry
from beemond.names import HOST_RE, NAME_RE  # noqa: F401  (shared with the lab)

EX_CONFIG = 78


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line shown to the user."""

    def __init__(self, file: str | os.PathLike, key: str, message: str):
        self.file, self.key, self.message = str(file), key, message
        super().__init__(f"{self.file}: {key}: {message}" if key else f"{self.file}: {message}")


def _opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, doc: str = "",
         min: float | None = None, max: float | None = None, choices: tuple | None = None,
         path: bool = False, secret: bool = False):
    """A dataclass field with the validation facts the loader checks."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "path": path, "secret": secret}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_TEMPLATE = "{{ sensor }}_{{ start }}_{{ end }}.{{ ext }}"


@dataclass(frozen=True)
class DaemonConfig:
    host: str = _opt("", doc="host name used in names and manifests (default: this machine's)")
    spool_dir: Path = _opt(Path("/var/lib/beemond/spool"), path=True, doc="durable queue directory")
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    heartbeat_interval_s: float = _opt(5.0, min=0.1, max=300)
    heartbeat_timeout_s: float = _opt(60.0, min=1, max=3600)
    restart_backoff_initial_s: float = _opt(1.0, min=0.0, max=3600)
    restart_backoff_max_s: float = _opt(300.0, min=0.0, max=86400)
    crash_loop_limit: int = _opt(10, min=1, max=1000, doc="restarts within the window before giving up")
    crash_loop_window_s: float = _opt(600.0, min=1, max=86400)
    failed_retry_s: float = _opt(3600.0, min=1, max=7 * 86400,
                                 doc="a sensor or processor failed by its crash loop is tried again this often")
    shutdown_timeout_s: float = _opt(60.0, min=1, max=3600)
    # The one space policy (enforced by the uploader, see Uploader.enforce_spool_limits): over a limit,
    # uploaded copies go first, un-uploaded bundles only with drop_oldest_when_full.
    spool_max_bytes: int = _opt(0, min=0, max=2**50,
                                doc="0: no limit; else the most the spool (staging, outbox, uploaded copies) may hold")
    spool_min_free_bytes: int = _opt(32 * 2**20, min=0, max=2**50,
                                     doc="free space to keep on the spool's file system")
    drop_oldest_when_full: bool = _opt(False, doc="over a limit, delete the oldest un-uploaded bundles too "
                                                  "(each logged and counted); false: keep all data")
    journal_sync_s: float = _opt(1.0, min=0.0, max=60, doc="a reading is fdatasync'ed to its sensor's journal at "
                                                         "most this long after it was taken (0: each at once)")
    # Where `beemond status` / `reload` / `pause` reach the daemon. Under systemd the example config puts
    # it in the unit's RuntimeDirectory=beemond (0750, group beemond), so that members of the group can
    # ask; the spool itself stays 0700.
    status_socket: Path | None = _opt(None, path=True, doc="unix socket of the daemon (default SPOOL/status.sock)")


@dataclass(frozen=True)
class ArchiveConfig:
    filename_template: str = _opt(DEFAULT_TEMPLATE, doc="sandboxed Jinja2 template of a record's name")
    default_metadata: dict = _opt(factory=dict, doc="metadata every record carries, under its own keys "
                                                    "(e.g. apiary, hive, site); strings, numbers, booleans")
    max_retries: int = _opt(3, min=0, max=20, doc="retries of a failed derived-record write (1, 2, 4... s "
                                                  "apart) before it goes to spool/failed/NAME/")


@dataclass(frozen=True)
class ReplayConfig:
    """A CSV replayed through a simulated sensor (see shared/data/urban-2021/README.md)."""

    file: Path = _opt(Path(""), path=True)
    time_column: str = _opt("Date")
    temperature_column: str = _opt("temperature")
    humidity_column: str = _opt("humidity")
    pressure_column: str = _opt("", doc="bme280: a column of pressures in Pa (default: the sensor's pressure_pa)")
    filter_column: str = _opt("", doc="only rows whose column equals filter_value")
    filter_value: str = _opt("")
    start: str = _opt("", doc="ISO 8601 time of the first row to replay (default: the first row)")
    speedup: float = _opt(0.0, min=0.0, max=1e7,
                          doc="0: one row per measurement; >0: replay time runs this much faster than wall time")
    loop: bool = _opt(True, doc="start again from the first row at the end of the file")
    timezone: str = _opt("UTC", doc="IANA zone of timestamps without an offset (e.g. Europe/Paris)")
    resume: bool = _opt(True, doc="after a restart or crash continue after the last durable reading's row "
                                  "(kept in the sensor's journal); false: from start again")


@dataclass(frozen=True)
class SensorConfig:
    """Keys every sensor has. A sensor type is a subclass registered in :data:`SENSOR_TYPES`; it may
    override :meth:`check` (cross-key rules), :meth:`describe` (its ``check-config`` line),
    :meth:`subscribes_to` (other sensors whose readings the orchestrator must forward to it) and
    :meth:`check_sources` (rules about those sensors)."""

    # Sends ``temperature_celsius`` samples (a scale's temperature_sensor must be such a sensor).
    measures_temperature = False

    name: str = _opt("")
    type: str = _opt("")
    backend: str = _opt("hardware", choices=("hardware", "simulated"))
    enabled: bool = _opt(True)
    filename_template: str = _opt("", doc="overrides [archive] filename_template")
    # A GPIO pin that switches the sensor's supply (a MOSFET or load switch): on power_lead_s before
    # each measurement or capture, off after it (beemond.sensors.gpio.PowerSwitch).
    power_pin: int | None = _opt(None, min=0, max=27, doc="BCM pin enabling the sensor's power, if any")
    power_lead_s: float = _opt(0.0, min=0.0, max=600, doc="power on this long before a measurement")
    power_active_high: bool = _opt(True, doc="false: the enable pin is active low")

    def check(self, path: Path, key: str) -> None:
        """Raise :class:`ConfigError` for a rule that spans several keys or needs a file."""

    def describe(self) -> str:
        return ""

    def subscribes_to(self) -> tuple[str, ...]:
        """Names of sensors whose ``sample`` events this sensor receives as ``sample`` commands."""
        return ()

    def check_sources(self, path: Path, key: str, sensors: dict[str, "SensorConfig"]) -> None:
        """Raise :class:`ConfigError` when a sensor named by :meth:`subscribes_to` (configured, in
        *sensors* by name) cannot give what this one needs."""

    def gpio_pins(self) -> dict[str, int]:
        """BCM pins this sensor claims, by key (relative to the sensor's table); each pin once per host."""
        return {"power_pin": self.power_pin} if self.power_pin is not None else {}

    def capture_targets(self) -> dict[str, tuple[str, ...]]:
        """Sensors this one asks to capture (``ipc.CAPTURE_REQUEST``), by key; each must be configured."""
        return {}


@dataclass(frozen=True)
class PolledSensorConfig(SensorConfig):
    """Keys of a sensor measured at an interval (``beemond.sensors.base.PolledSensorWorker``)."""

    interval_s: float = _opt(60.0, min=0.05, max=86400, doc="time between measurements")
    record_window_s: float = _opt(600.0, min=0.1, max=86400, doc="readings batched per CSV record")
    max_retries: int = _opt(3, min=0, max=100, doc="retries of a failed measurement before it counts as lost")
    replay: ReplayConfig | None = _opt(None)

    # ReplayConfig columns a simulated backend of this type reads
    replay_columns = ("time_column", "temperature_column", "humidity_column", "filter_column")

    def check(self, path: Path, key: str) -> None:
        if self.record_window_s < self.interval_s:
            raise ConfigError(path, f"{key}.record_window_s", "must be >= interval_s")
        if self.backend == "simulated":
            if self.replay is None:
                raise ConfigError(path, f"{key}.replay", f"a simulated {self.type} needs a [replay] table with a CSV file")
            _check_replay(self.replay, path, f"{key}.replay", self.replay_columns)
        elif self.replay is not None:
            raise ConfigError(path, f"{key}.replay", "only a simulated backend replays a file")

    def describe(self) -> str:
        return f"every {self.interval_s:g} s, a record per {self.record_window_s:g} s"


@dataclass(frozen=True)
class SHT3xConfig(PolledSensorConfig):
    measures_temperature = True
    bus: int = _opt(1, min=0, max=255, doc="I2C bus number (/dev/i2c-N)")
    address: int = _opt(0x44, min=0x44, max=0x45, doc="0x44 (ADDR low) or 0x45 (ADDR high)")
    repeatability: str = _opt("high", choices=("high", "medium", "low"))


OVERSAMPLING = (0, 1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BME280Config(PolledSensorConfig):
    measures_temperature = True
    bus: int = _opt(1, min=0, max=255, doc="I2C bus number (/dev/i2c-N)")
    address: int = _opt(0x76, min=0x76, max=0x77, doc="0x76 (SDO low) or 0x77 (SDO high)")
    temperature_oversampling: int = _opt(1, min=1, max=16, doc="1, 2, 4, 8 or 16")
    pressure_oversampling: int = _opt(1, min=0, max=16, doc="0 (skip), 1, 2, 4, 8 or 16")
    humidity_oversampling: int = _opt(1, min=0, max=16, doc="0 (skip), 1, 2, 4, 8 or 16")
    pressure_pa: float = _opt(101325.0, min=30000, max=110000,
                              doc="simulated: pressure when the replay has no pressure_column")

    replay_columns = (*PolledSensorConfig.replay_columns, "pressure_column")

    def check(self, path: Path, key: str) -> None:
        for name in ("temperature_oversampling", "pressure_oversampling", "humidity_oversampling"):
            value = getattr(self, name)
            if value not in OVERSAMPLING:
                allowed = ", ".join(str(v) for v in OVERSAMPLING if v or name != "temperature_oversampling")
                raise ConfigError(path, f"{key}.{name}", f"allowed: {allowed}; got {value}")
        super().check(path, key)

    def describe(self) -> str:
        osrs = f"oversampling T x{self.temperature_oversampling} P x{self.pressure_oversampling} " \
               f"H x{self.humidity_oversampling}"
        return f"0x{self.address:02x} on bus {self.bus}, {osrs}, {super().describe()}"


W1_ID_RE = re.compile(r"^28-[0-9a-f]{12}$")


@dataclass(frozen=True)
class DS18B20Config(PolledSensorConfig):
    measures_temperature = True
    base_path: Path | None = _opt(None, path=True, doc="sysfs 1-Wire devices directory "
                                  "(default /sys/bus/w1/devices; simulated: a temporary directory)")
    probes: dict[str, str] = _opt(factory=dict, doc="position -> ROM id as the kernel names it (28-0316a2794eff)")
    replay_filter_values: dict[str, str] = _opt(
        factory=dict, doc="simulated: position -> replay filter_value of the rows that drive that probe")

    replay_columns = ("time_column", "temperature_column", "filter_column")   # no humidity

    def check(self, path: Path, key: str) -> None:
        if not self.probes:
            raise ConfigError(path, f"{key}.probes", 'at least one probe: position = "28-xxxxxxxxxxxx"')
        seen: dict[str, str] = {}
        for position, rom in self.probes.items():
            if not NAME_RE.match(position):
                raise ConfigError(path, f"{key}.probes.{position}", f"position must match {NAME_RE.pattern}")
            if not W1_ID_RE.match(rom):
                raise ConfigError(path, f"{key}.probes.{position}",
                                  f'must be a DS18B20 id "28-" and 12 lowercase hex digits, got {rom!r}')
            if rom in seen:
                raise ConfigError(path, f"{key}.probes.{position}", f"{rom} is already probe {seen[rom]!r}")
            seen[rom] = position
        for position in self.replay_filter_values:
            if position not in self.probes:
                raise ConfigError(path, f"{key}.replay_filter_values.{position}", "not a position in probes")
        if self.replay_filter_values and self.backend != "simulated":
            raise ConfigError(path, f"{key}.replay_filter_values", "only a simulated backend replays a file")
        super().check(path, key)
        if self.replay is not None:
            from beemond.sensors.replay import CsvReplay

            for position, value in self.replay_filter_values.items():
                try:
                    CsvReplay.from_config(dataclasses.replace(self.replay, filter_value=value),
                                          values=replay_values(self.replay_columns))
                except ValueError as e:
                    raise ConfigError(path, f"{key}.replay_filter_values.{position}", str(e)) from None

    def describe(self) -> str:
        where = self.base_path or ("a temporary tree" if self.backend == "simulated" else "/sys/bus/w1/devices")
        return f"{len(self.probes)} probe(s) ({', '.join(self.probes)}) in {where}, {super().describe()}"


def _check_replay(replay: ReplayConfig, path: Path, key: str, columns: tuple[str, ...]) -> None:
    """The replay file is readable and has every named column (*columns*: ReplayConfig field names)."""
    from beemond.sensors.replay import CsvReplay, read_header, zone

    if not os.access(replay.file, os.R_OK) or not replay.file.is_file():
        raise ConfigError(path, f"{key}.file", f"cannot read {replay.file}")
    header = read_header(replay.file)
    for col in columns:
        name = getattr(replay, col)
        if name and name not in header:
            raise ConfigError(path, f"{key}.{col}", f"no column {name!r} in {replay.file.name} (has: {', '.join(header)})")
    try:
        zone(replay.timezone)
    except ValueError as e:
        raise ConfigError(path, f"{key}.timezone", str(e)) from None
    try:
        CsvReplay.from_config(replay, values=replay_values(columns))
    except ValueError as e:
        raise ConfigError(path, key, str(e)) from None


def replay_values(columns: tuple[str, ...]) -> tuple[str, ...]:
    """The quantities a replay reads, from a sensor config's ``replay_columns``."""
    return tuple(c[:-len("_column")] for c in columns if c in ("temperature_column", "humidity_column"))


@dataclass(frozen=True)
class AudioConfig(SensorConfig):
    device: str = _opt("", doc="PortAudio input device: case-insensitive name substring or index; empty for the default")
    sample_rate_hz: int = _opt(48000, min=1000, max=384000)
    channels: int = _opt(1, min=1, max=32)
    segment_s: float = _opt(60.0, min=0.5, max=86400, doc="longest record; a capture is split into records this long")
    format: str = _opt("flac", choices=("flac", "wav"))
    subtype: str = _opt("PCM_24", choices=("PCM_16", "PCM_24"), doc="sample format (PCM_24 is read as int32)")
    block_s: float = _opt(0.1, min=0.005, max=5, doc="PortAudio callback block length")
    schedule: str = _opt("continuous", choices=("continuous", "window"),
                         doc="continuous, or capture_s every every_s between window_start and window_end")
    window_start: str = _opt("08:00", doc="HH:MM local time the daily window opens (schedule = window)")
    window_end: str = _opt("20:00", doc="HH:MM local time it closes; earlier than window_start crosses midnight")
    capture_s: float = _opt(60.0, min=0.1, max=86400, doc="length of one capture (also of a capture_now)")
    every_s: float = _opt(300.0, min=1, max=86400, doc="interval between capture starts in the window")
    timezone: str = _opt("", doc="IANA zone of the window, e.g. Europe/Berlin (default: the system's)")
    open_retries: int = _opt(4, min=0, max=100, doc="retries of a missing device before the worker exits")
    open_backoff_s: float = _opt(1.0, min=0.01, max=300, doc="first retry delay, doubling up to 30 s")
    tone_hz: float = _opt(250.0, min=0.0, max=20000, doc="simulated backend: hum frequency")
    noise: float = _opt(0.02, min=0.0, max=1.0, doc="simulated backend: noise amplitude (full scale 1.0)")
    overflow_every: int = _opt(0, min=0, max=1_000_000,
                               doc="simulated backend: flag every N-th block as an input overflow (0: never)")

    def check(self, path: Path, key: str) -> None:
        if self.block_s >= self.segment_s:
            raise ConfigError(path, f"{key}.block_s", "must be shorter than segment_s")
        if self.format == "wav" and self.subtype not in ("PCM_16", "PCM_24"):
            raise ConfigError(path, f"{key}.subtype", "allowed for wav: PCM_16, PCM_24")
        from beemond.sensors.audio.schedule import parse_hhmm

        for name in ("window_start", "window_end"):
            try:
                parse_hhmm(getattr(self, name))
            except ValueError as e:
                raise ConfigError(path, f"{key}.{name}", str(e)) from None
        try:
            self.zone()
        except (ValueError, OSError) as e:  # ZoneInfoNotFoundError is a KeyError; see zone()
            raise ConfigError(path, f"{key}.timezone", str(e)) from None
        if self.schedule == "window":
            if self.capture_s > self.every_s:
                raise ConfigError(path, f"{key}.capture_s", f"must be <= every_s ({self.every_s:g})")
            if self.block_s >= self.capture_s:
                raise ConfigError(path, f"{key}.block_s", "must be shorter than capture_s")

    def zone(self):
        """The window's ``tzinfo`` (``None``: the system's local time). Raises ``ValueError``."""
        if not self.timezone:
            return None
        import zoneinfo

        try:
            return zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {self.timezone!r} (e.g. Europe/Berlin, UTC)") from None

    def capture_window(self):
        """A :class:`beemond.sensors.audio.schedule.CaptureWindow`, or ``None`` when continuous."""
        if self.schedule != "window":
            return None
        from beemond.sensors.audio.schedule import CaptureWindow, parse_hhmm

        return CaptureWindow(parse_hhmm(self.window_start), parse_hhmm(self.window_end), self.every_s, self.zone())

    def describe(self) -> str:
        what = f"{self.sample_rate_hz} Hz x{self.channels} {self.subtype} {self.format}"
        if self.schedule == "window":
            when = ("all day" if self.window_start == self.window_end
                    else f"from {self.window_start} to {self.window_end}")
            return f"{what}, {self.capture_s:g} s every {self.every_s:g} s {when} ({self.timezone or 'local time'})"
        return f"{what}, continuous in {self.segment_s:g} s segments"


@dataclass(frozen=True)
class CameraConfig(SensorConfig):
    """A Raspberry Pi camera through picamera2 (beemond.sensors.camera.driver)."""

    width: int = _opt(640, min=16, max=9152, doc="frame width in pixels (AppMAIS: 640)")
    height: int = _opt(480, min=16, max=6944, doc="frame height in pixels (AppMAIS: 480)")
    framerate_fps: float = _opt(30.0, min=0.1, max=240, doc="frame rate of clips (AppMAIS: 30)")
    still_interval_s: float = _opt(60.0, min=0.0, max=86400, doc="time between stills; 0: none on a schedule")
    format: str = _opt("jpeg", choices=("jpeg", "npy"), doc="stills as JPEG files or NumPy arrays (HxWx3 uint8)")
    jpeg_quality: int = _opt(90, min=1, max=95)
    burst_frames: int = _opt(1, min=1, max=1000, doc="npy: frames per still record (an N x H x W x 3 array)")
    split_data_array: bool = _opt(False, doc="npy: one record per frame, named with _split_index")
    clip_s: float = _opt(10.0, min=0.1, max=3600, doc="length of an H.264 clip (MP4 container)")
    clip_interval_s: float = _opt(0.0, min=0.0, max=86400, doc="time between clips; 0: none on a schedule")
    bitrate_bps: int = _opt(2_000_000, min=10_000, max=50_000_000, doc="H.264 bitrate")
    on_capture_now: str = _opt("still", choices=("still", "clip"), doc="what a capture_now (a GPIO trigger) takes")
    stall_timeout_s: float = _opt(10.0, min=0.5, max=600, doc="no frame for this long: close and reopen the camera")
    daylight_only: bool = _opt(False, doc="scheduled captures only between sunrise and sunset")
    # No default: 0,0 is the Gulf of Guinea, whose sunrise and sunset would silently rule the schedule.
    latitude: float | None = _opt(None, min=-90, max=90, doc="degrees north, for the daylight schedule")
    longitude: float | None = _opt(None, min=-180, max=180, doc="degrees east, for the daylight schedule")
    sunrise_offset_min: float = _opt(0.0, min=-720, max=720, doc="start this many minutes after sunrise")
    sunset_offset_min: float = _opt(0.0, min=-720, max=720, doc="stop this many minutes after sunset")

    def check(self, path: Path, key: str) -> None:
        if self.split_data_array and self.format != "npy":
            raise ConfigError(path, f"{key}.split_data_array", "only for format = \"npy\"")
        if self.burst_frames > 1 and self.format != "npy":
            raise ConfigError(path, f"{key}.burst_frames", "only for format = \"npy\" (a JPEG is one frame)")
        if self.clip_interval_s and self.clip_interval_s < self.clip_s:
            raise ConfigError(path, f"{key}.clip_interval_s", "must be 0 (off) or >= clip_s")
        if self.width % 2 or self.height % 2:
            raise ConfigError(path, f"{key}.width", "width and height must be even (H.264 4:2:0)")
        if self.daylight_only:
            for name in ("latitude", "longitude"):
                if getattr(self, name) is None:
                    raise ConfigError(path, f"{key}.{name}", "required with daylight_only = true: the hive's "
                                      "position in degrees (north/east positive), e.g. latitude = 50.63")

    def describe(self) -> str:
        stills = f"a {self.format} still every {self.still_interval_s:g} s" if self.still_interval_s else "no scheduled stills"
        clips = f"a {self.clip_s:g} s clip every {self.clip_interval_s:g} s" if self.clip_interval_s else "no scheduled clips"
        when = f", daylight only at {self.latitude:g},{self.longitude:g}" if self.daylight_only else ""
        return f"{self.width}x{self.height} @ {self.framerate_fps:g} fps, {stills}, {clips}{when}"


@dataclass(frozen=True)
class GpioInputConfig:
    """One input of a ``gpio`` sensor: ``[sensors.NAME.inputs.INPUT]``."""

    pin: int = _opt(-1, min=0, max=27, doc="BCM pin number")
    kind: str = _opt("button", choices=("button", "motion", "beam"), doc="push button, PIR sensor, IR break beam")
    targets: tuple[str, ...] = _opt(factory=tuple, doc="sensors that capture when this input activates")
    pull_up: bool | None = _opt(None, doc="internal pull-up (default: on for button and beam, off for motion)")
    bounce_s: float = _opt(0.05, min=0.0, max=10, doc="debounce time")
    cooldown_s: float = _opt(5.0, min=0.0, max=86400, doc="ignore activations this long after one that triggered")
    trigger_every_s: float = _opt(0.0, min=0.0, max=86400,
                                  doc="simulated backend: the emulated input activates this often (0: never)")


@dataclass(frozen=True)
class GpioConfig(SensorConfig):
    """GPIO inputs that trigger captures, and a status LED (beemond.sensors.gpio.driver)."""

    inputs: dict[str, GpioInputConfig] = _opt(factory=dict, doc="named inputs: [sensors.NAME.inputs.INPUT]")
    status_led_pin: int | None = _opt(None, min=0, max=27, doc="BCM pin of a status LED (blinks while running)")
    record_window_s: float = _opt(600.0, min=0.1, max=86400, doc="input events batched per CSV record")

    def check(self, path: Path, key: str) -> None:
        if not self.inputs and self.status_led_pin is None:
            raise ConfigError(path, key, "a gpio sensor needs at least one [inputs.NAME] table or status_led_pin")
        for name, inp in self.inputs.items():
            if not NAME_RE.match(name):
                raise ConfigError(path, f"{key}.inputs.{name}", f"input name must match {NAME_RE.pattern}")
            if inp.pin < 0:
                raise ConfigError(path, f"{key}.inputs.{name}.pin", "required: a BCM pin number 0-27")
            if inp.trigger_every_s and self.backend != "simulated":
                raise ConfigError(path, f"{key}.inputs.{name}.trigger_every_s", "only a simulated backend emulates inputs")

    def gpio_pins(self) -> dict[str, int]:
        pins = super().gpio_pins()
        if self.status_led_pin is not None:
            pins["status_led_pin"] = self.status_led_pin
        pins.update({f"inputs.{name}.pin": inp.pin for name, inp in self.inputs.items()})
        return pins

    def capture_targets(self) -> dict[str, tuple[str, ...]]:
        return {f"inputs.{name}.targets": inp.targets for name, inp in self.inputs.items()}

    def describe(self) -> str:
        parts = [f"{name}: {inp.kind} on GPIO{inp.pin} -> {', '.join(inp.targets) or 'nothing'}"
                 for name, inp in self.inputs.items()]
        if self.status_led_pin is not None:
            parts.append(f"status LED on GPIO{self.status_led_pin}")
        return "; ".join(parts)


# The default line of a serial scale: an optional label ("W:", "NET="), a signed number, an optional
# unit (any case). Accepts "W: 42.315 kg", "42.315", "-0.5 kg", "42315 g", "NET=92.6 LB".
DEFAULT_SCALE_REGEX = r"^\s*(?:[A-Za-z]+\s*[:=]?\s*)?(?P<value>[-+]?\d+(?:\.\d*)?)\s*(?P<unit>(?i:kg|g|lbs?))?\s*$"
SCALE_UNITS = ("kg", "g", "lb")


@dataclass(frozen=True)
class ScaleSimulationConfig:
    """The synthetic hive weight a simulated scale reports (there is no weight data set in shared/data)."""

    base_kg: float = _opt(42.0, min=0.0, max=500, doc="hive weight at the start")
    daily_swing_kg: float = _opt(0.8, min=0.0, max=50, doc="mid-day loss while foragers are out")
    trend_kg_per_day: float = _opt(0.3, min=-50, max=50, doc="slow nectar-flow gain (negative: loss)")
    noise_kg: float = _opt(0.005, min=0.0, max=10, doc="standard deviation of the reading noise")
    seed: int = _opt(1, min=0, max=2**32 - 1)
    start: str = _opt("", doc="ISO 8601 UTC time the simulated clock starts at (default: now)")
    speedup: float = _opt(1.0, min=0.0, max=1e7, doc="simulated time runs this much faster than wall time")
    line_period_s: float = _opt(0.1, min=0.01, max=60, doc="streamed mode: time between lines")


@dataclass(frozen=True)
class WeightReplayConfig:
    """A CSV of (time, weight in kg) replayed through a simulated scale (e.g. a swarm's drop)."""

    file: Path = _opt(Path(""), path=True)
    time_column: str = _opt("time")
    weight_column: str = _opt("weight_kg")
    start: str = _opt("", doc="ISO 8601 time of the first row to replay (default: the first row)")
    speedup: float = _opt(0.0, min=0.0, max=1e7,
                          doc="0: one row per line sent; >0: replay time runs this much faster than wall time")
    loop: bool = _opt(True)


@dataclass(frozen=True)
class ScaleConfig(SensorConfig):
    """A hive scale with a serial line protocol (beemond.sensors.scale.driver has the formula and the units)."""

    port: str = _opt("/dev/beemond-scale", doc="serial device (the udev rule's stable name)")
    baudrate: int = _opt(9600, min=50, max=4_000_000)
    bytesize: int = _opt(8, min=5, max=8)
    parity: str = _opt("N", choices=("N", "E", "O", "M", "S"))
    stopbits: float = _opt(1.0, min=1.0, max=2.0, doc="1, 1.5 or 2")
    request: str = _opt("", doc='sent to poll the scale, e.g. "W\\r\\n" (backslash escapes are decoded, '
                                'so INI files can write them too); empty: the scale streams lines')
    line_regex: str = _opt(DEFAULT_SCALE_REGEX, doc="named groups: value (required), unit (optional)")
    unit: str = _opt("kg", choices=SCALE_UNITS, doc="unit of a line without one")
    tare_offset_kg: float = _opt(0.0, min=-10_000, max=10_000, doc="subtracted from the raw weight")
    calibration_factor: float = _opt(1.0, min=1e-6, max=1e6, doc="multiplies the tared weight")
    samples: int = _opt(5, min=1, max=99, doc="lines per reading; the reading is their median")
    min_kg: float = _opt(-5.0, min=-10_000, max=10_000, doc="a lighter weight is implausible: rejected, counted")
    max_kg: float = _opt(300.0, min=-10_000, max=10_000, doc="a heavier weight is implausible: rejected, counted")
    read_timeout_s: float = _opt(2.0, min=0.01, max=60, doc="longest wait for one line")
    interval_s: float = _opt(60.0, min=0.05, max=86400, doc="time between readings")
    record_window_s: float = _opt(600.0, min=0.1, max=86400, doc="readings batched per CSV record")
    max_retries: int = _opt(3, min=0, max=100, doc="retries of a failed reading before it counts as lost")
    temperature_sensor: str = _opt("", doc="climate sensor whose temperature compensates the weight")
    temperature_position: str = _opt("", doc="the probe position to use when temperature_sensor is a "
                                             "ds18b20 with several probes")
    compensation_kg_per_c: float = _opt(0.0, min=-100, max=100, doc="weight drift per °C above the reference")
    reference_temperature_c: float = _opt(20.0, min=-50, max=100)
    max_temperature_age_s: float = _opt(300.0, min=0.01, max=86400, doc="an older temperature is not used")
    simulation: ScaleSimulationConfig | None = _opt(None)
    replay: WeightReplayConfig | None = _opt(None)

    def request_bytes(self) -> bytes:
        """``request`` as sent on the wire: latin-1, with backslash escapes (``\\r``, ``\\x05``) decoded.
        Raises ``ValueError``."""
        raw = self.request.encode("latin-1")
        return raw.decode("unicode_escape").encode("latin-1") if b"\\" in raw else raw

    def check(self, path: Path, key: str) -> None:
        if self.record_window_s < self.interval_s:
            raise ConfigError(path, f"{key}.record_window_s", "must be >= interval_s")
        try:
            self.request_bytes()
        except ValueError as e:  # UnicodeError is one
            raise ConfigError(path, f"{key}.request", f"must be latin-1 text with valid escapes: {e}") from None
        if self.max_kg <= self.min_kg:
            raise ConfigError(path, f"{key}.max_kg", "must be > min_kg")
        if self.stopbits not in (1.0, 1.5, 2.0):
            raise ConfigError(path, f"{key}.stopbits", f"allowed: 1, 1.5, 2; got {self.stopbits:g}")
        try:
            regex = re.compile(self.line_regex)
        except re.error as e:
            raise ConfigError(path, f"{key}.line_regex", f"not a regular expression: {e}") from None
        if "value" not in regex.groupindex:
            raise ConfigError(path, f"{key}.line_regex", "needs a named group (?P<value>...) for the number")
        if self.temperature_sensor == self.name:
            raise ConfigError(path, f"{key}.temperature_sensor", "must name another sensor")
        if self.compensation_kg_per_c and not self.temperature_sensor:
            raise ConfigError(path, f"{key}.compensation_kg_per_c", "needs temperature_sensor")
        if self.backend == "simulated":
            if self.simulation is not None and self.replay is not None:
                raise ConfigError(path, f"{key}.replay", "set [simulation] or [replay], not both")
            if self.replay is not None:
                from beemond.sensors.scale.emulator import WeightReplay

                if not os.access(self.replay.file, os.R_OK) or not self.replay.file.is_file():
                    raise ConfigError(path, f"{key}.replay.file", f"cannot read {self.replay.file}")
                try:
                    WeightReplay(self.replay)
                except ValueError as e:
                    raise ConfigError(path, f"{key}.replay", str(e)) from None
        elif self.simulation is not None or self.replay is not None:
            which = "simulation" if self.simulation is not None else "replay"
            raise ConfigError(path, f"{key}.{which}", "only a simulated backend has this table")

    def describe(self) -> str:
        where = "emulated on a pty" if self.backend == "simulated" else f"{self.port} at {self.baudrate} baud"
        source = self.temperature_sensor + (f".{self.temperature_position}" if self.temperature_position else "")
        comp = f", {self.compensation_kg_per_c:g} kg/°C from {source}" if self.compensation_kg_per_c else ""
        return (f"{where}, median of {self.samples} every {self.interval_s:g} s, "
                f"a record per {self.record_window_s:g} s{comp}")

    def subscribes_to(self) -> tuple[str, ...]:
        return (self.temperature_sensor,) if self.temperature_sensor else ()

    def check_sources(self, path: Path, key: str, sensors: dict[str, SensorConfig]) -> None:
        if not self.temperature_sensor:
            if self.temperature_position:
                raise ConfigError(path, f"{key}.temperature_position", "needs temperature_sensor")
            return
        source = sensors[self.temperature_sensor]
        if not source.measures_temperature:
            kinds = ", ".join(t for t, c in SENSOR_TYPES.items() if c.measures_temperature)
            raise ConfigError(path, f"{key}.temperature_sensor", f"{source.name!r} is a {source.type} sensor, "
                              f"which measures no temperature (types that do: {kinds})")
        probes = getattr(source, "probes", None) or {}
        if self.temperature_position:
            if self.temperature_position not in probes:
                where = f"one of {', '.join(probes)}" if probes else f"only for a sensor with probes, not {source.type}"
                raise ConfigError(path, f"{key}.temperature_position",
                                  f"{self.temperature_position!r} is not a probe of {source.name}: {where}")
        elif len(probes) > 1:
            # Each probe sends its own temperature: without a choice the scale would mix them.
            raise ConfigError(path, f"{key}.temperature_position", f"required: {source.name} has "
                              f"{len(probes)} probes, name the one to use ({', '.join(probes)})")


# type = "..." -> its config class. One line per driver (the worker is in beemond.registry.SENSORS).
SENSOR_TYPES: dict[str, type[SensorConfig]] = {
    "sht3x": SHT3xConfig,
    "bme280": BME280Config,
    "ds18b20": DS18B20Config,
    "audio": AudioConfig,
    "camera": CameraConfig,
    "gpio": GpioConfig,
    "scale": ScaleConfig,
}
# A section that already lives in its sensor package is asked of the registry.
SENSOR_TYPES["scd4x"] = registry.section(registry.SENSORS, "scd4x", "sensor")


@dataclass(frozen=True)
class BundleConfig:
    max_duration_s: float = _opt(300.0, min=1, max=86400, doc="seal a bundle this long after its first record")
    max_bytes: int = _opt(100_000_000, min=1024, max=2**40, doc="seal a bundle once its records reach this size")
    recipients: tuple[str, ...] = _opt(factory=tuple, doc="age1... / ssh-... public keys or files of them")
    split_by_sensor: bool = _opt(True, doc="one bundle per sensor (AppMAIS layout, per-sensor upload windows); false: one for all")
    signing_key: Path | None = _opt(None, path=True, secret=True,
                                    doc="Ed25519 device key (beemond keygen --device) signing every bundle")
    signing_key_credential: str = _opt("", doc="name of a systemd credential holding the device key")

    def signing_key_path(self) -> Path | None:
        """The device key's file: ``signing_key``, or the credential in ``$CREDENTIALS_DIRECTORY``; None: unsigned."""
        if self.signing_key is not None:
            return self.signing_key
        if self.signing_key_credential:
            return Path(os.environ.get("CREDENTIALS_DIRECTORY", "")) / self.signing_key_credential
        return None


WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


def parse_window(spec: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (local time) -> (start, end) in minutes after midnight; end may be 24:00.

    A window whose end is before its start spans midnight (``"22:00-06:00"``). Raises ``ValueError``.
    """
    m = WINDOW_RE.match(spec.strip())
    if not m or (m[3] == "24" and m[4] != "00"):
        raise ValueError(f"must be \"HH:MM-HH:MM\" in local time (e.g. \"22:00-06:00\"), got {spec!r}")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ValueError(f"an empty window {spec!r}; omit the sensor to upload at any time")
    return start, end


@dataclass(frozen=True)
class UploadConfig:
    protocol: str = _opt("ftp", choices=("ftp", "ftps", "sftp", "s3", "local", "none"),
                         doc="none keeps bundles in the outbox; local copies to a mounted remote_dir")
    endpoint: str = _opt("", doc="s3: the service's URL, e.g. https://s3.eu-central-1.amazonaws.com or http://10.0.0.5:8333")
    bucket: str = _opt("", doc="s3: the bucket (path-style requests); remote_dir is a key prefix in it")
    region: str = _opt("us-east-1", doc="s3: the region signed into every request")
    host: str = _opt("127.0.0.1")
    port: int = _opt(0, min=0, max=65535, doc="0: the protocol's own (21 for ftp and ftps, 22 for sftp)")
    user: str = _opt("anonymous")
    password_file: Path | None = _opt(None, path=True, secret=True)
    password_credential: str = _opt("", doc="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    ca_file: Path | None = _opt(None, path=True, doc="ftps: PEM CA bundle trusted instead of the system CAs")
    key_file: Path | None = _opt(None, path=True, secret=True, doc="sftp: OpenSSH private key")
    key_credential: str = _opt("", doc="sftp: systemd credential holding the private key")
    known_hosts: Path | None = _opt(None, path=True, doc="sftp: OpenSSH known_hosts with the server's key (required)")
    remote_dir: str = _opt("", doc="directory on the server under which the layout starts (local: absolute path)")
    layout: str = _opt("{{ host }}/{{ date }}/{{ sensor }}/{{ name }}",
                       doc="sandboxed Jinja2 template of the remote path (default: AppMAIS layout)")
    timeout_s: float = _opt(30.0, min=1, max=3600, doc="a connection that moves no byte this long is dropped "
                                                      "(a transfer may take hours as long as it moves)")
    backoff_initial_s: float = _opt(2.0, min=0.01, max=3600)
    backoff_max_s: float = _opt(300.0, min=0.01, max=86400)
    shutdown_grace_s: float = _opt(10.0, min=0.0, max=3600, doc="time to keep uploading at shutdown")
    backlog_order: str = _opt("oldest", choices=("oldest", "newest"))
    rate_limit_bytes_per_s: int = _opt(0, min=0, max=2**40, doc="0: unlimited")
    windows: dict[str, str] = _opt(factory=dict, doc='sensor -> "HH:MM-HH:MM" local time when its bundles may go')
    keep_uploaded_bytes: int = _opt(0, min=0, max=2**50, doc="keep uploaded copies in spool/uploaded/ up to this "
                                                             "size (the [daemon] spool limits evict them first)")

    def password(self) -> str:
        """The password from ``password_file`` or the systemd credential; ``""`` if neither.

        Raises ``beemond.upload.transport.TransportError`` if a credential is named but ``$CREDENTIALS_DIRECTORY``
        is unset (not a file of that name in the working directory), ``OSError`` if it cannot be read.
        """
        from beemond.upload.transport import read_secret

        path = read_secret(self.password_file, self.password_credential)
        return path.read_text().strip() if path is not None else ""

    def check(self, path: Path, key: str = "upload") -> None:
        """Rules across keys and files. Raises :class:`ConfigError`; never quotes a secret."""
        for name, spec in self.windows.items():
            if not NAME_RE.match(name):
                raise ConfigError(path, f"{key}.windows", f"{name!r} is not a sensor name")
            try:
                parse_window(spec)
            except ValueError as e:
                raise ConfigError(path, f"{key}.windows.{name}", str(e)) from None
        if self.protocol == "none":
            return
        for name in ("password_file", "key_file", "ca_file", "known_hosts"):
            value = getattr(self, name)
            if value is not None and not (os.access(value, os.R_OK) and value.is_file()):
                raise ConfigError(path, f"{key}.{name}", f"cannot read {value}")
        if self.password_file is not None and self.password_credential:
            raise ConfigError(path, f"{key}.password_credential", "set password_file or password_credential, not both")
        if self.key_file is not None and self.key_credential:
            raise ConfigError(path, f"{key}.key_credential", "set key_file or key_credential, not both")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(path, f"{key}.backoff_max_s", "must be >= backoff_initial_s")
        if self.protocol != "ftps" and self.ca_file is not None:
            raise ConfigError(path, f"{key}.ca_file", "only used with protocol = \"ftps\"")
        if self.protocol != "sftp":
            for name in ("key_file", "key_credential", "known_hosts"):
                if getattr(self, name):
                    raise ConfigError(path, f"{key}.{name}", "only used with protocol = \"sftp\"")
        if self.protocol == "sftp" and self.known_hosts is None:
            raise ConfigError(path, f"{key}.known_hosts", "required for sftp: an OpenSSH known_hosts file with "
                              "the server's host key (unknown keys are refused, never added)")
        if self.protocol == "s3":
            if not re.match(r"^https?://[^/\s]+(/\S*)?$", self.endpoint):
                raise ConfigError(path, f"{key}.endpoint", "required for s3: http(s)://HOST[:PORT], e.g. "
                                  "https://s3.eu-central-1.amazonaws.com")
            if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", self.bucket):
                raise ConfigError(path, f"{key}.bucket", "required for s3: 3-63 lowercase letters, digits, dots, hyphens")
            if self.user in ("", "anonymous") or (self.password_file is None and not self.password_credential):
                raise ConfigError(path, f"{key}.user", "s3 needs user (the access key id) and password_file or "
                                  "password_credential (the secret access key)")
        elif self.endpoint or self.bucket:
            raise ConfigError(path, f"{key}.{'endpoint' if self.endpoint else 'bucket'}", "only used with protocol = \"s3\"")
        if self.protocol == "local" and not os.path.isabs(self.remote_dir):
            raise ConfigError(path, f"{key}.remote_dir", "protocol = \"local\" needs the absolute path of a mounted directory")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _opt(True, doc="serve /metrics (Prometheus text format)")
    address: str = _opt("127.0.0.1", doc="listen address of /metrics; keep it local unless a firewall guards it")
    port: int = _opt(9109, min=1, max=65535, doc="TCP port of /metrics (not Prometheus's own 9090)")
    staleness_s: float = _opt(600.0, min=1, max=86400, doc="readings older than this are not exported")


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: live readings over MQTT (beemond.telemetry). Bundles stay the record of truth."""

    enabled: bool = _opt(True, doc="false: no telemetry even with a broker set")
    broker: str = _opt("", doc="the broker's host name or address; set, it turns telemetry on")
    port: int = _opt(0, min=0, max=65535, doc="0: 1883, or 8883 with tls")
    tls: bool = _opt(False, doc="TLS to the broker (system CAs, or ca_file)")
    ca_file: Path | None = _opt(None, path=True, doc="PEM CA bundle trusted instead of the system CAs")
    user: str = _opt("", doc="user name; empty: anonymous")
    password_file: Path | None = _opt(None, path=True, secret=True)
    password_credential: str = _opt("", doc="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    client_id: str = _opt("", doc="MQTT client id (default beemond-HOST); the persistent session is keyed on it")
    keepalive_s: int = _opt(60, min=5, max=3600)
    session_expiry_s: int = _opt(7 * 86400, min=0, max=2**32 - 1,
                                 doc="how long the broker keeps the session (MQTT v5 Session Expiry Interval)")
    reconnect_max_s: int = _opt(120, min=1, max=3600, doc="longest wait between reconnection attempts")
    layout: str = _opt("beemond", choices=("beemond", "kotori"), doc="topic and payload layout")
    topic: str = _opt("beemond/{{ host }}/{{ sensor }}", doc="sandboxed Jinja2 template; /state and /alert are appended")
    status_topic: str = _opt("beemond/{{ host }}/status", doc="retained online/offline (the Last Will)")
    home_assistant: bool = _opt(True, doc="publish Home Assistant MQTT discovery configs (layout beemond)")
    discovery_prefix: str = _opt("homeassistant")
    expire_after_s: int = _opt(0, min=0, max=86400 * 7,
                               doc="Home Assistant marks a value unavailable this long after it; 0: 3 intervals of its sensor")
    kotori_realm: str = _opt("hiveeyes")
    kotori_network: str = _opt("", doc="layout kotori: the network (Hiveeyes: your user name); required")
    kotori_gateway: str = _opt("", doc="layout kotori: the gateway (apiary); default: host")
    kotori_node: str = _opt("", doc="layout kotori: the node (hive); default: host")
    max_buffer_bytes: int = _opt(16 * 2**20, min=65536, max=2**40,
                                 doc="readings kept in spool/telemetry/ while the broker is away; over it the oldest go")

    def password(self) -> str:
        """The password from ``password_file`` or the credential; ``""`` if neither (see UploadConfig.password)."""
        from beemond.upload.transport import read_secret

        path = read_secret(self.password_file, self.password_credential)
        return path.read_text().strip() if path is not None else ""

    @property
    def active(self) -> bool:
        """Telemetry runs: a broker is set and it is not turned off."""
        return self.enabled and bool(self.broker)

    def check(self, path: Path, key: str = "telemetry") -> None:
        if not self.active:
            return
        for name in ("password_file", "ca_file"):
            value = getattr(self, name)
            if value is not None and not (os.access(value, os.R_OK) and value.is_file()):
                raise ConfigError(path, f"{key}.{name}", f"cannot read {value}")
        if self.password_file is not None and self.password_credential:
            raise ConfigError(path, f"{key}.password_credential", "set password_file or password_credential, not both")
        if self.ca_file is not None and not self.tls:
            raise ConfigError(path, f"{key}.ca_file", "only used with tls = true")
        if self.layout == "kotori" and not self.kotori_network:
            raise ConfigError(path, f"{key}.kotori_network", "required with layout = \"kotori\"")
        from beemond import archive
        from beemond.telemetry.messages import check_topic

        for name in ("topic", "status_topic"):
            try:
                check_topic(getattr(self, name))
            except archive.TemplateError as e:
                raise ConfigError(path, f"{key}.{name}", str(e)) from None
        for name in ("discovery_prefix", "kotori_realm", "kotori_network", "kotori_gateway", "kotori_node"):
            if any(c in getattr(self, name) for c in "/+#"):
                raise ConfigError(path, f"{key}.{name}", "one topic level: no /, + or #")


@dataclass(frozen=True)
class ProcessorConfig:
    """Keys every processor has (``beemond.processors``). A processor type is a subclass registered in
    :data:`PROCESSOR_TYPES`. The three spacings (seconds, 0 = off) are defined exactly in
    :class:`beemond.processors.base.Spacing`."""

    name: str = _opt("")
    type: str = _opt("")
    sensor: str = _opt("", doc="the sensor whose records or samples this processor reads")
    enabled: bool = _opt(True)
    min_input_spacing: float = _opt(0.0, min=0.0, max=86400 * 7, doc="s of data time between accepted inputs")
    min_step_spacing: float = _opt(0.0, min=0.0, max=86400 * 7, doc="s of run time between processing steps")
    min_output_spacing: float = _opt(0.0, min=0.0, max=86400 * 7, doc="s of data time between output records")
    filename_template: str = _opt("", doc="overrides [archive] filename_template")

    def check(self, path: Path, key: str, sensor: SensorConfig) -> None:
        """Raise :class:`ConfigError` for a rule that spans several keys or needs the sensor's config."""

    def describe(self) -> str:
        return ""


@dataclass(frozen=True)
class AudioBandsConfig(ProcessorConfig):
    bands: tuple[str, ...] = _opt(("100-300", "300-600"), doc='"LOW-HIGH" in Hz, e.g. "100-300"')
    frame: int = _opt(4096, min=64, max=1 << 20, doc="FFT frame length in samples (Hann window, 50 % overlap)")
    spectrogram: bool = _opt(False, doc="also write a small grey-scale spectrogram PNG per segment")
    spectrogram_max_hz: float = _opt(2000.0, min=10, max=192000, doc="top of the spectrogram's frequency axis")

    def band_edges(self) -> list[tuple[float, float]]:
        """``bands`` as (low, high) Hz pairs. Raises ``ValueError`` naming the bad entry."""
        out = []
        for text in self.bands:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*", text)
            if not m or not float(m[1]) < float(m[2]):
                raise ValueError(f"{text!r} is not LOW-HIGH in Hz with LOW < HIGH")
            out.append((float(m[1]), float(m[2])))
        return out

    def check(self, path: Path, key: str, sensor: SensorConfig) -> None:
        if not isinstance(sensor, AudioConfig):
            raise ConfigError(path, f"{key}.sensor", f"{sensor.name!r} is a {sensor.type} sensor; audio_bands reads audio records")
        if not self.bands:
            raise ConfigError(path, f"{key}.bands", "at least one band is required")
        try:
            edges = self.band_edges()
        except ValueError as e:
            raise ConfigError(path, f"{key}.bands", str(e)) from None
        nyquist = sensor.sample_rate_hz / 2
        if self.spectrogram and self.spectrogram_max_hz > nyquist:
            raise ConfigError(path, f"{key}.spectrogram_max_hz", f"above the Nyquist frequency {nyquist:g} Hz of {sensor.name}")
        for text, (_, high) in zip(self.bands, edges):
            if high > nyquist:
                raise ConfigError(path, f"{key}.bands", f"{text!r} goes above the Nyquist frequency {nyquist:g} Hz of {sensor.name}")

    def describe(self) -> str:
        return f"band power in {', '.join(self.bands)} Hz"


@dataclass(frozen=True)
class SwarmConfig(ProcessorConfig):
    quantity: str = _opt("weight_kilograms", doc="the SAMPLE quantity holding the hive weight")
    drop_kg: float = _opt(1.0, min=0.05, max=100, doc="a fall of more than this ...")
    window_s: float = _opt(900.0, min=10, max=86400, doc="... within this many seconds raises a swarm alert")
    smoothing: int = _opt(3, min=1, max=100, doc="median of this many readings (rejects single spikes)")

    def describe(self) -> str:
        return f"swarm alert on a drop of more than {self.drop_kg:g} kg within {self.window_s:g} s"


# type = "..." -> its config class (the worker is in beemond.registry.PROCESSORS).
PROCESSOR_TYPES: dict[str, type[ProcessorConfig]] = {
    "audio_bands": AudioBandsConfig,
    "swarm": SwarmConfig,
}


@dataclass(frozen=True)
class Config:
    source: Path
    daemon: DaemonConfig
    archive: ArchiveConfig
    bundle: BundleConfig
    upload: UploadConfig
    sensors: tuple[SensorConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    processors: tuple[ProcessorConfig, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    @property
    def spool(self) -> Path:
        return self.daemon.spool_dir

    @property
    def status_socket(self) -> Path:
        return self.daemon.status_socket or self.daemon.spool_dir / "status.sock"

    def template_for(self, sensor: SensorConfig) -> str:
        return sensor.filename_template or self.archive.filename_template


# ---------------------------------------------------------------------------------------------- load

_SECTIONS = {"daemon": DaemonConfig, "archive": ArchiveConfig, "bundle": BundleConfig, "upload": UploadConfig,
             "metrics": MetricsConfig, "telemetry": TelemetryConfig}


def load(path: str | os.PathLike, *, semantics: bool = True) -> Config:
    """Read, validate and type a config file. Raises :class:`ConfigError`.

    *semantics* False skips the cross-field checks (:func:`_check_semantics`: templates compiled with
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

    sensors = _typed_tables(path, tree, "sensors", "sensor", SENSOR_TYPES, base, strings)
    if not sensors:
        raise ConfigError(path, "sensors", "at least one enabled sensor is required")
    processors = _typed_tables(path, tree, "processors", "processor", PROCESSOR_TYPES, base, strings)
    cfg = Config(source=path.resolve(), daemon=daemon, archive=built["archive"], bundle=built["bundle"],
                 upload=built["upload"], sensors=tuple(sensors), metrics=built["metrics"],
                 processors=processors, telemetry=built["telemetry"])
    if semantics:
        _check_semantics(cfg, path)
    return cfg


def _typed_tables(path: Path, tree: dict, section: str, what: str, types: dict, base: Path, strings: bool) -> tuple:
    """The enabled ``[section.NAME]`` tables, each built as ``types[type]`` (sensors, processors)."""
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
        item = _build(types[kind], {**table, "name": name}, path, key, base, strings)
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


def _check_semantics(cfg: Config, path: Path) -> None:
    """Cross-field checks that need more than one key, or outside files."""
    from beemond import archive  # late: keeps `import beemond.config` light
    from beemond.bundle import crypto

    for key, text in [("archive.filename_template", cfg.archive.filename_template),
                      *((f"sensors.{s.name}.filename_template", s.filename_template)
                        for s in cfg.sensors if s.filename_template)]:
        try:
            archive.check_template(text)
        except archive.TemplateError as e:
            raise ConfigError(path, key, str(e)) from None
    try:
        archive.check_layout(cfg.upload.layout)
    except archive.TemplateError as e:
        raise ConfigError(path, "upload.layout", str(e)) from None

    if not cfg.bundle.recipients:
        raise ConfigError(path, "bundle.recipients", "at least one age recipient (age1...) or recipients file is required")
    for i, item in enumerate(cfg.bundle.recipients):
        try:
            crypto.load_recipients([item], base=path.parent.resolve())
        except crypto.RecipientError as e:
            raise ConfigError(path, f"bundle.recipients[{i}]", str(e)) from None

    b = cfg.bundle
    if b.signing_key is not None and b.signing_key_credential:
        raise ConfigError(path, "bundle.signing_key_credential", "set signing_key or signing_key_credential, not both")
    if b.signing_key_path() is not None:
        try:
            crypto.load_signing_key(b.signing_key_path())
        except crypto.SigningKeyError as e:
            key = "bundle.signing_key" if b.signing_key is not None else "bundle.signing_key_credential"
            raise ConfigError(path, key, str(e)) from None

    cfg.upload.check(path)
    cfg.telemetry.check(path)

    d = cfg.daemon
    if d.restart_backoff_max_s < d.restart_backoff_initial_s:
        raise ConfigError(path, "daemon.restart_backoff_max_s", "must be >= restart_backoff_initial_s")

    names = {t.name for t in cfg.sensors}
    by_name = {t.name: t for t in cfg.sensors}
    pins: dict[int, str] = {}
    for s in cfg.sensors:
        key = f"sensors.{s.name}"
        s.check(path, key)
        for other in s.subscribes_to():
            if other not in names:
                # name the key that holds the reference, when one does
                where = next((f.name for f in dataclasses.fields(s) if f.name != "name" and getattr(s, f.name) == other), "")
                raise ConfigError(path, f"{key}.{where}" if where else key,
                                  f"refers to sensor {other!r}, which is not configured (or not enabled)")
        s.check_sources(path, key, by_name)
        for sub, targets in s.capture_targets().items():
            for other in targets:
                if other not in names:
                    raise ConfigError(path, f"{key}.{sub}", f"no sensor {other!r} is configured (or enabled); "
                                      f"configured: {', '.join(sorted(names))}")
        for sub, pin in s.gpio_pins().items():
            if pin in pins:
                raise ConfigError(path, f"{key}.{sub}", f"GPIO{pin} is already used by {pins[pin]}")
            pins[pin] = f"{key}.{sub}"

    sensors = {s.name: s for s in cfg.sensors}
    for p in cfg.processors:
        key = f"processors.{p.name}"
        # A processor's records go to staging/<name>/ and it is supervised under its name: both must
        # be free.
        if p.name in sensors or p.name in ("aggregator", "uploader", "orchestrator", "telemetry"):
            raise ConfigError(path, key, f"name {p.name!r} is already taken by a sensor or a daemon worker")
        if p.sensor not in sensors:
            raise ConfigError(path, f"{key}.sensor", f"{p.sensor!r} is not a configured (enabled) sensor; "
                                                    f"sensors: {', '.join(sensors)}")
        if p.filename_template:
            try:
                archive.check_template(p.filename_template)
            except archive.TemplateError as e:
                raise ConfigError(path, f"{key}.filename_template", str(e)) from None
        p.check(path, key, sensors[p.sensor])


def _signer(b: BundleConfig) -> str:
    from beemond.bundle import crypto

    return crypto.fingerprint(crypto.load_signing_key(b.signing_key_path()).public_key())


def summary(cfg: Config) -> str:
    """A short human summary for ``beemond check-config`` (never shows secrets)."""
    lines = [f"config {cfg.source}: ok",
             f"  host {cfg.daemon.host}, spool {cfg.daemon.spool_dir}"]
    for s in cfg.sensors:
        lines.append(f"  sensor {s.name}: {s.type} ({s.backend}), {s.describe()}")
    b = cfg.bundle
    lines.append(f"  bundles: every {b.max_duration_s:g} s or {b.max_bytes} bytes, "
                 f"{len(b.recipients)} recipient entr{'y' if len(b.recipients) == 1 else 'ies'}, "
                 + (f"signed by {_signer(b)}" if b.signing_key_path() is not None else "unsigned"))
    for p in cfg.processors:
        lines.append(f"  processor {p.name}: {p.type} of {p.sensor}, {p.describe()}")
    t = cfg.telemetry
    if t.active:
        lines.append(f"  telemetry: mqtt{'s' if t.tls else ''}://{t.broker}:{t.port or (8883 if t.tls else 1883)} "
                     f"layout {t.layout}{', Home Assistant discovery' if t.home_assistant and t.layout == 'beemond' else ''}")
    m = cfg.metrics
    lines.append(f"  metrics: http://{m.address}:{m.port}/metrics" if m.enabled else "  metrics: off")
    u = cfg.upload
    if u.protocol == "none":
        lines.append("  upload: none (bundles stay in the outbox)")
    else:
        where = u.remote_dir if u.protocol == "local" else f"s3://{u.bucket}/{u.remote_dir.strip('/')} at {u.endpoint}" \
            if u.protocol == "s3" else f"{u.protocol}://{u.user}@{u.host}:{u.port or 'default'}/{u.remote_dir.strip('/')}"
        lines.append(f"  upload: {where} layout {u.layout}")
        if u.rate_limit_bytes_per_s:
            lines.append(f"  upload rate limit: {u.rate_limit_bytes_per_s} bytes/s")
        for name, spec in u.windows.items():
            lines.append(f"  upload window {name}: {spec} local time")
    return "\n".join(lines)
