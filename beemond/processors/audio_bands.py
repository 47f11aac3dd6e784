"""Audio band power: RMS and the power in configured frequency bands of each audio record.

Per record (FLAC or WAV, read with ``soundfile`` in frames, so memory stays at a few frames whatever
the segment length): the channels are averaged to mono (full scale 1.0), the RMS is taken over every
sample, and the power spectrum is estimated with Welch's method (``numpy.fft.rfft`` of Hann-windowed
frames of ``frame`` samples, 50 % overlap, averaged). Each bin is scaled so that the bins sum to the
signal's mean square (Parseval, corrected for the window), so a band's power is the mean square of
the signal's content in ``[low, high)`` Hz, in units of full scale squared: a full-scale sine has RMS
0.707 and power 0.5 in the band that holds its frequency. A record shorter than one frame is
analysed as one zero-padded frame.

Output record: ``{"rms", "rms_dbfs", "bands": {"100-300": power, ...}, "sample_rate_hz", "frames"}``.
Metrics (``sample`` events under the audio sensor's name): ``audio_rms_ratio`` and, with a ``band``
label, ``audio_band_power_ratio``. No spectrogram image: it would need an imaging library the Pi
does not otherwise load.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from beemond import ipc
from beemond.processors.base import ProcessorWorker

log = logging.getLogger(__name__)


def band_power(path: Path, bands: list[tuple[float, float]], frame: int = 4096) -> dict:
    """RMS and band powers of an audio file (see the module docstring). Raises ``soundfile`` errors
    (``RuntimeError``) for an unreadable file."""
    import numpy as np
    import soundfile

    info = soundfile.info(str(path))
    rate, total = info.samplerate, info.frames
    n = max(16, min(frame, total or 16))
    hop = n // 2
    window = np.hanning(n)
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    masks = [(freqs >= lo) & (freqs < hi) for lo, hi in bands]
    psd = np.zeros(len(freqs))
    frames_fft = 0
    square_sum, seen = 0.0, 0
    for i, block in enumerate(soundfile.blocks(str(path), blocksize=n, overlap=n - hop, dtype="float64",
                                               always_2d=True)):
        mono = block.mean(axis=1)
        new = mono if i == 0 else mono[n - hop:]  # overlapping samples were counted already
        square_sum += float(np.dot(new, new))
        seen += len(new)
        if len(mono) < n:
            if frames_fft:
                continue  # the tail shorter than a frame: its samples count in the RMS only
            mono = np.pad(mono, (0, n - len(mono)))
        spectrum = np.abs(np.fft.rfft(mono * window)) ** 2
        psd += spectrum
        frames_fft += 1
    if frames_fft:
        # One-sided power per bin, summing to the mean square: 2|X|^2 / (N * sum(w^2)), DC and
        # Nyquist not doubled.
        psd *= 2.0 / (n * float(np.dot(window, window)) * frames_fft)
        psd[0] /= 2
        if n % 2 == 0:
            psd[-1] /= 2
    rms = math.sqrt(square_sum / seen) if seen else 0.0
    return {"rms": rms, "rms_dbfs": 20 * math.log10(rms) if rms > 0 else None,
            "band_power": [float(psd[m].sum()) for m in masks], "sample_rate_hz": rate, "frames": total}


class AudioBandsWorker(ProcessorWorker):
    def __init__(self, cfg, proc, channel: ipc.Channel):
        super().__init__(cfg, proc, channel)
        self.edges = proc.band_edges()

    def process_record(self, path: Path, metadata: dict) -> dict:
        got = band_power(path, self.edges, self.proc.frame)
        bands = dict(zip(self.proc.bands, got.pop("band_power")))
        src = self.proc.sensor
        self.channel.send(ipc.SAMPLE, sensor=src, values={"audio_rms_ratio": got["rms"]})
        for label, power in bands.items():
            self.channel.send(ipc.SAMPLE, sensor=src, values={"audio_band_power_ratio": power},
                              labels={"band": label})
        log.debug("%s: rms %.4f, bands %s", path.name, got["rms"], bands)
        return {**got, "bands": bands, "record": path.name}
