"""``[sensors.NAME]`` with ``type = "audio"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, SensorConfig, opt


@dataclass(frozen=True)
class AudioConfig(SensorConfig):
    device: str = opt("", doc="PortAudio input device: case-insensitive name substring or index; empty for the default")
    sample_rate_hz: int = opt(48000, min=1000, max=384000)
    channels: int = opt(1, min=1, max=32)
    segment_s: float = opt(60.0, min=0.5, max=86400, doc="longest record; a capture is split into records this long")
    format: str = opt("flac", choices=("flac", "wav"))
    subtype: str = opt("PCM_24", choices=("PCM_16", "PCM_24"), doc="sample format (PCM_24 is read as int32)")
    block_s: float = opt(0.1, min=0.005, max=5, doc="PortAudio callback block length")
    schedule: str = opt("continuous", choices=("continuous", "window"),
                         doc="continuous, or capture_s every every_s between window_start and window_end")
    window_start: str = opt("08:00", doc="HH:MM local time the daily window opens (schedule = window)")
    window_end: str = opt("20:00", doc="HH:MM local time it closes; earlier than window_start crosses midnight")
    capture_s: float = opt(60.0, min=0.1, max=86400, doc="length of one capture (also of a capture_now)")
    every_s: float = opt(300.0, min=1, max=86400, doc="interval between capture starts in the window")
    timezone: str = opt("", doc="IANA zone of the window, e.g. Europe/Berlin (default: the system's)")
    open_retries: int = opt(4, min=0, max=100, doc="retries of a missing device before the worker exits")
    open_backoff_s: float = opt(1.0, min=0.01, max=300, doc="first retry delay, doubling up to 30 s")
    tone_hz: float = opt(250.0, min=0.0, max=20000, doc="simulated backend: hum frequency")
    noise: float = opt(0.02, min=0.0, max=1.0, doc="simulated backend: noise amplitude (full scale 1.0)")
    overflow_every: int = opt(0, min=0, max=1_000_000,
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
