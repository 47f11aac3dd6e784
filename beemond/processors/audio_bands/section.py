"""``[processors.NAME]`` with ``type = "audio_bands"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from beemond.config.schema import ConfigError, ProcessorConfig, SensorConfig, opt


@dataclass(frozen=True)
class AudioBandsConfig(ProcessorConfig):
    bands: tuple[str, ...] = opt(("100-300", "300-600"), doc='"LOW-HIGH" in Hz, e.g. "100-300"')
    frame: int = opt(4096, min=64, max=1 << 20, doc="FFT frame length in samples (Hann window, 50 % overlap)")
    spectrogram: bool = opt(False, doc="also write a small grey-scale spectrogram PNG per segment")
    spectrogram_max_hz: float = opt(2000.0, min=10, max=192000, doc="top of the spectrogram's frequency axis")

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
        if sensor.type != "audio":
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
