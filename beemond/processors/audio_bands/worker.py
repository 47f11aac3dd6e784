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
label, ``audio_band_power_ratio``.

With ``spectrogram = true`` a second record, a grey-scale PNG (at most ``SPECTROGRAM_COLUMNS`` x
``SPECTROGRAM_ROWS`` pixels: time left to right, 0 Hz to ``spectrogram_max_hz`` bottom to top, 60 dB
of range below the loudest pixel), is written beside the JSON. It is built from the same frames (no
second read) and encoded with ``zlib`` alone (PNG spec, ISO/IEC 15948: IHDR colour type 0, filter 0).
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from datetime import datetime, timezone
from pathlib import Path

from beemond import ipc
from beemond.core import clock
from beemond.processors.base import ProcessorWorker
from beemond.records import staged_metadata

log = logging.getLogger(__name__)

SPECTROGRAM_ROWS = 64
SPECTROGRAM_COLUMNS = 240
SPECTROGRAM_RANGE_DB = 60.0


def band_power(path: Path, bands: list[tuple[float, float]], frame: int = 4096, spectrogram_max_hz: float = 0.0) -> dict:
    """RMS and band powers of an audio file (see the module docstring); with *spectrogram_max_hz* also
    ``"spectrogram"``: an array (rows = SPECTROGRAM_ROWS bands from 0 Hz up, columns = frames) of
    power. Raises ``soundfile`` errors (``RuntimeError``) for an unreadable file."""
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
    rows = None
    if spectrogram_max_hz:
        # each bin's spectrogram row (-1: above the top); frames reduced to rows at once keep memory small
        row_of = np.where(freqs < spectrogram_max_hz, (freqs / spectrogram_max_hz * SPECTROGRAM_ROWS).astype(int), -1)
        keep = row_of >= 0
        rows = []
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
        if rows is not None:
            rows.append(np.bincount(row_of[keep], weights=spectrum[keep], minlength=SPECTROGRAM_ROWS))
        frames_fft += 1
    if frames_fft:
        # One-sided power per bin, summing to the mean square: 2|X|^2 / (N * sum(w^2)), DC and
        # Nyquist not doubled.
        psd *= 2.0 / (n * float(np.dot(window, window)) * frames_fft)
        psd[0] /= 2
        if n % 2 == 0:
            psd[-1] /= 2
    rms = math.sqrt(square_sum / seen) if seen else 0.0
    out = {"rms": rms, "rms_dbfs": 20 * math.log10(rms) if rms > 0 else None,
           "band_power": [float(psd[m].sum()) for m in masks], "sample_rate_hz": rate, "frames": total}
    if rows is not None:
        out["spectrogram"] = np.array(rows).T
    return out


def spectrogram_png(power) -> bytes:
    """A grey-scale PNG of *power* (rows from low to high frequency, columns in time): averaged down to
    at most SPECTROGRAM_COLUMNS columns, in dB, SPECTROGRAM_RANGE_DB below the maximum to white."""
    import numpy as np

    n = power.shape[1]
    groups = max(1, math.ceil(n / SPECTROGRAM_COLUMNS))
    cols = math.ceil(n / groups)
    padded = np.pad(power, ((0, 0), (0, cols * groups - n)), mode="edge")
    power = padded.reshape(power.shape[0], cols, groups).mean(axis=2)
    db = 10 * np.log10(np.maximum(power, 1e-20))
    top = db.max()
    pixels = np.clip((db - (top - SPECTROGRAM_RANGE_DB)) / SPECTROGRAM_RANGE_DB * 255, 0, 255).astype(np.uint8)
    pixels = pixels[::-1]  # the top row of an image is the highest frequency
    height, width = pixels.shape
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class AudioBandsWorker(ProcessorWorker):
    def __init__(self, cfg, proc, channel: ipc.Channel):
        super().__init__(cfg, proc, channel)
        self.edges = proc.band_edges()
        self.spectrogram = None

    def process_record(self, path: Path, metadata: dict) -> dict:
        got = band_power(path, self.edges, self.proc.frame,
                         self.proc.spectrogram_max_hz if self.proc.spectrogram else 0.0)
        bands = dict(zip(self.proc.bands, got.pop("band_power")))
        self.spectrogram = got.pop("spectrogram", None)
        src = self.proc.sensor
        self.channel.send(ipc.SAMPLE, sensor=src, values={"audio_rms_ratio": got["rms"]})
        for label, power in bands.items():
            self.channel.send(ipc.SAMPLE, sensor=src, values={"audio_band_power_ratio": power},
                              labels={"band": label})
        log.debug("%s: rms %.4f, bands %s", path.name, got["rms"], bands)
        return {**got, "bands": bands, "record": path.name}

    def emit(self, result: dict, start: float, end: float) -> bool:
        written = super().emit(result, start, end)
        if written and self.spectrogram is not None:
            t0, t1 = (datetime.fromtimestamp(t, timezone.utc) for t in (start, end))
            meta = {"sensor": self.proc.name, "type": self.proc.type, "source": self.proc.sensor,
                    "start": clock.utc_iso(t0), "end": clock.utc_iso(t1), "image": "spectrogram",
                    "max_hz": self.proc.spectrogram_max_hz, "range_db": SPECTROGRAM_RANGE_DB}
            self.write_output(t0, t1, staged_metadata(self, meta), spectrogram_png(self.spectrogram), ext="png")
        return written
