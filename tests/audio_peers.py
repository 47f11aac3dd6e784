"""A real capture device for audio tests and bench/audio.py: a private PulseAudio with a null sink.

Recipe from shared/TESTBED.md ("Audio: a real capture device"): PortAudio's ALSA ``pulse`` device
records the monitor of a 48 kHz mono null sink named ``hive``; ``paplay --device=hive`` plays into
it. The server runs with its own HOME/XDG_RUNTIME_DIR and socket (no session bus, no login), is
ready once ``pactl info`` answers, and is stopped by the PID we started.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile

PULSEAUDIO = shutil.which("pulseaudio")


class PulseServer:
    SINK = "hive"

    def __init__(self, rate: int = 48000, channels: int = 1):
        self.rate, self.channels = rate, channels
        # A short path of our own: a unix socket path must fit in 108 bytes (pytest's tmp_path may not).
        self.root = Path(tempfile.mkdtemp(prefix="beemond-pa-"))
        self.socket = self.root / "native"
        self.proc: subprocess.Popen | None = None

    @property
    def server(self) -> str:
        """The value for ``PULSE_SERVER``."""
        return f"unix:{self.socket}"

    def env(self) -> dict:
        return {**os.environ, "PULSE_SERVER": self.server, "HOME": str(self.root / "home"),
                "XDG_RUNTIME_DIR": str(self.root / "run")}

    def start(self, timeout: float = 15) -> "PulseServer":
        for sub in ("home", "run"):
            (self.root / sub).mkdir(mode=0o700)
        script = self.root / "pa.pa"
        script.write_text(
            f"load-module module-native-protocol-unix socket={self.socket} auth-anonymous=1\n"
            f"load-module module-null-sink sink_name={self.SINK} rate={self.rate} channels={self.channels}\n"
            f"set-default-source {self.SINK}.monitor\n")
        self.log = open(self.root / "pulseaudio.log", "wb")
        self.proc = subprocess.Popen(
            [PULSEAUDIO, "-n", "-F", str(script), "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
             "--use-pid-file=no", "--log-target=stderr"],
            env=self.env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self._pactl("info").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pulseaudio did not come up: {(self.root / 'pulseaudio.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def _pactl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["pactl", *args], env=self.env(), capture_output=True, text=True, timeout=10)

    def count(self, kind: str) -> int:
        """Number of ``sink-inputs`` (players) or ``source-outputs`` (recorders) connected now."""
        out = self._pactl("list", "short", kind)
        return len([line for line in out.stdout.splitlines() if line.strip()])

    def play(self, wav: Path) -> subprocess.Popen:
        """``paplay`` *wav* into the sink (returns at once; wait on the process or stop it)."""
        return subprocess.Popen(["paplay", f"--device={self.SINK}", str(wav)], env=self.env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def tone_wav(path: Path, hz: float, seconds: float, rate: int = 48000, amplitude: float = 0.5) -> Path:
    """A sine of *hz* as 16-bit mono WAV."""
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, amplitude * np.sin(2 * np.pi * hz * t), rate, subtype="PCM_16")
    return path


def peak_hz(data: np.ndarray, rate: int) -> float:
    """Frequency of the largest bin of the Hann-windowed spectrum of mono *data* (resolution rate/len)."""
    spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data))))
    return float(np.argmax(spectrum) * rate / len(data))


class AudioThread:
    """The real AudioWorker of sensor *name* in config file *path*, run on a thread, with its command
    queue and event pipe. ``with AudioThread(...) as run:`` starts it; leaving sends SHUTDOWN, joins
    it and collects its events. ``run.error`` is what ``run()`` raised, if anything."""

    def __init__(self, path: Path, name: str = "hive_audio"):
        from beemond import config, ipc
        from beemond.sensors.audio.driver import AudioWorker
        from beemond.spool import Spool

        self.ipc = ipc
        cfg = config.load(path)
        self.sensor = next(s for s in cfg.sensors if s.name == name)
        self.commands: queue.Queue = queue.Queue()
        self.reader, writer = multiprocessing.Pipe(duplex=False)
        self.worker = AudioWorker(cfg, self.sensor, ipc.Channel(name, self.commands, writer, 0.2))
        self.staging = Spool(cfg.spool).staging_dir(name)
        self.error: BaseException | None = None
        self.events: list = []
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        try:
            self.worker.run()
        except BaseException as e:
            self.error = e

    def __enter__(self) -> "AudioThread":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.commands.put(self.ipc.Shutdown())
        self.thread.join(20)
        assert not self.thread.is_alive(), "the audio worker did not stop"
        while self.reader.poll():
            self.events.append(self.reader.recv())

    def records(self, ext: str = "flac") -> list[Path]:
        return sorted(self.staging.glob(f"*.{ext}"))

    def metadata(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.staging.glob("*.meta.json"))]
