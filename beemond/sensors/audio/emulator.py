"""A generated signal at the ``sounddevice.InputStream`` boundary.

:class:`SimulatedInputStream` takes the same constructor arguments as ``sounddevice.InputStream``
and calls the same ``callback(indata, frames, time, status)`` from its own thread, paced by the
monotonic clock like a sound card's, so the audio driver cannot tell it from PortAudio. The signal
is a colony-like hum: a fundamental (default 250 Hz, the band where a colony's wing beat sits) with
two harmonics and white noise.

``overflow_every`` (tests) flags every N-th block with ``input_overflow``, as PortAudio does after
an xrun.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class CallbackFlags:
    input_overflow: bool = False
    input_underflow: bool = False

    def __bool__(self) -> bool:
        return self.input_overflow or self.input_underflow


class SimulatedInputStream:
    def __init__(self, samplerate: float, blocksize: int, channels: int = 1, dtype: str = "float32",
                 callback=None, device=None, tone_hz: float = 250.0, noise: float = 0.02,
                 overflow_every: int = 0, seed: int | None = None, **_ignored):
        self.samplerate = float(samplerate)
        self.blocksize = int(blocksize)
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.callback = callback
        self.device = device
        self.tone_hz = tone_hz
        self.noise = noise
        self.overflow_every = overflow_every
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame = 0
        self.active = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        self.close()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="simulated-audio", daemon=True)
        self.active = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.active = False

    def close(self) -> None:
        self.stop()

    def _block(self) -> np.ndarray:
        n = self.blocksize
        t = (self._frame + np.arange(n)) / self.samplerate
        w = 2 * np.pi * self.tone_hz * t
        x = 0.3 * np.sin(w) + 0.1 * np.sin(2 * w) + 0.05 * np.sin(3 * w)
        x = x + self.noise * self._rng.standard_normal(n)
        self._frame += n
        x = np.repeat(x[:, None], self.channels, axis=1)
        if self.dtype.kind == "i":
            full = np.iinfo(self.dtype).max
            return np.clip(x * full, -full, full).astype(self.dtype)
        return x.astype(self.dtype)

    def _run(self) -> None:
        period = self.blocksize / self.samplerate
        due = time.monotonic() + period
        count = 0
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            count += 1
            flags = CallbackFlags(input_overflow=bool(self.overflow_every and count % self.overflow_every == 0))
            self.callback(self._block(), self.blocksize, None, flags)
            due += period
