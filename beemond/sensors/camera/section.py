"""``[sensors.NAME]`` with ``type = "camera"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, SensorConfig, opt


@dataclass(frozen=True)
class CameraConfig(SensorConfig):
    """A Raspberry Pi camera through picamera2 (beemond.sensors.camera.driver)."""

    width: int = opt(640, min=16, max=9152, doc="frame width in pixels (AppMAIS: 640)")
    height: int = opt(480, min=16, max=6944, doc="frame height in pixels (AppMAIS: 480)")
    framerate_fps: float = opt(30.0, min=0.1, max=240, doc="frame rate of clips (AppMAIS: 30)")
    still_interval_s: float = opt(60.0, min=0.0, max=86400, doc="time between stills; 0: none on a schedule")
    format: str = opt("jpeg", choices=("jpeg", "npy"), doc="stills as JPEG files or NumPy arrays (HxWx3 uint8)")
    jpeg_quality: int = opt(90, min=1, max=95)
    burst_frames: int = opt(1, min=1, max=1000, doc="npy: frames per still record (an N x H x W x 3 array)")
    split_data_array: bool = opt(False, doc="npy: one record per frame, named with _split_index")
    clip_s: float = opt(10.0, min=0.1, max=3600, doc="length of an H.264 clip (MP4 container)")
    clip_interval_s: float = opt(0.0, min=0.0, max=86400, doc="time between clips; 0: none on a schedule")
    bitrate_bps: int = opt(2_000_000, min=10_000, max=50_000_000, doc="H.264 bitrate")
    on_capture_now: str = opt("still", choices=("still", "clip"), doc="what a capture_now (a GPIO trigger) takes")
    stall_timeout_s: float = opt(10.0, min=0.5, max=600, doc="no frame for this long: close and reopen the camera")
    daylight_only: bool = opt(False, doc="scheduled captures only between sunrise and sunset")
    # No default: 0,0 is the Gulf of Guinea, whose sunrise and sunset would silently rule the schedule.
    latitude: float | None = opt(None, min=-90, max=90, doc="degrees north, for the daylight schedule")
    longitude: float | None = opt(None, min=-180, max=180, doc="degrees east, for the daylight schedule")
    sunrise_offset_min: float = opt(0.0, min=-720, max=720, doc="start this many minutes after sunrise")
    sunset_offset_min: float = opt(0.0, min=-720, max=720, doc="stop this many minutes after sunset")

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
