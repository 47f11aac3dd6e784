"""Audio capture on a real device: input overflows and the audio worker's CPU share.

What is measured
  A private PulseAudio with a 48 kHz mono null sink (tests/audio_peers.py, the TESTBED.md recipe) is
  the capture device: PortAudio's ALSA ``pulse`` device records the sink's monitor. ``paplay`` plays
  a generated hive-like hum (250 Hz fundamental, two harmonics, noise; 30 s, looped) into the sink.
  The real daemon (``.venv/bin/beemond run``) runs with only the audio sensor: device "pulse",
  48 kHz, PCM_24 FLAC, continuous, ``--segment-s`` records; bundles are not sealed during the run
  and upload is off, so the other workers idle.
  After a warm-up (default 5 s) the audio worker's utime+stime (/proc/PID/stat; its pid from the
  daemon's "started worker" log line) is sampled at the start and end of a ``--seconds`` window:
  cpu_percent = CPU seconds / wall seconds * 100, i.e. its share of ONE core. Then, before SIGTERM,
  every staged record's sidecar is read: overflows = sum of the per-segment ``overflows`` (PortAudio
  input_overflow flags), segments = records with the full frame count. peak_hz is the spectral peak
  of the last full segment (should be 250: the hum came through). max_gap_ms is the largest
  |next segment's start - this one's end|: PulseAudio's ALSA plugin drops audio without raising the
  overflow flag (measured: a callback stalled 3 s lost ~1.9 s, 0 flags), so a loss shows only there.
  restarts counts worker pid changes.

Reproduce (from the repo root):  .venv/bin/python bench/audio.py [--seconds 60] [--segment-s 10]
Goals (issue 3, item 4): overflows=0 over 600 s; cpu_percent <= 5.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from audio_peers import PULSEAUDIO, PulseServer, peak_hz  # noqa: E402

from beemond.spool import Spool  # noqa: E402

BEEMOND = REPO / ".venv" / "bin" / "beemond"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def hum_wav(path: Path, seconds: float = 30, rate: int = 48000) -> Path:
    rng = np.random.default_rng(7)
    t = np.arange(round(seconds * rate)) / rate
    w = 2 * np.pi * 250 * t
    x = 0.3 * np.sin(w) + 0.1 * np.sin(2 * w) + 0.05 * np.sin(3 * w) + 0.02 * rng.standard_normal(len(t))
    soundfile.write(path, x, rate, subtype="PCM_16")
    return path


def config(tmp: Path, segment_s: float) -> Path:
    from beemond.bundle import crypto

    _ident, recipient, _public = crypto.keygen(tmp / "keys")
    cfg = {
        "daemon": {"host": "bench-audio", "spool_dir": str(tmp / "spool"), "heartbeat_interval_s": 5},
        "bundle": {"max_duration_s": 86400, "max_bytes": 2 ** 40, "recipients": [str(recipient)]},
        "upload": {"protocol": "none"},
        "sensors": {"hive_audio": {"type": "audio", "backend": "hardware", "device": "pulse",
                                   "sample_rate_hz": 48000, "channels": 1, "subtype": "PCM_24", "format": "flac",
                                   "schedule": "continuous", "segment_s": segment_s}},
    }
    path = tmp / "beemond.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def worker_pid(log: Path, name: str = "hive_audio") -> int | None:
    found = re.findall(rf"started worker {name} \(sensor, pid (\d+)\)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--segment-s", type=float, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (log, spool)")
    args = ap.parse_args()
    if PULSEAUDIO is None:
        raise SystemExit("pulseaudio is not installed: run scripts/setup")

    tmp = Path(tempfile.mkdtemp(prefix="beemond-bench-audio-"))
    pulse = PulseServer().start()
    stop_playing = threading.Event()

    def play_loop():
        wav = hum_wav(tmp / "hum.wav")
        while not stop_playing.is_set():
            player = pulse.play(wav)
            while player.poll() is None:
                if stop_playing.wait(0.2):
                    player.kill()
            player.wait()

    player = threading.Thread(target=play_loop, daemon=True)
    player.start()
    log_path = tmp / "daemon.log"
    cfg = config(tmp, args.segment_s)
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([str(BEEMOND), "run", "--config", str(cfg)], stdout=log,
                                  stderr=subprocess.STDOUT, env=pulse.env())
    print(f"daemon pid {daemon.pid}, pulseaudio pid {pulse.proc.pid}, work dir {tmp}")
    pids = set()
    try:
        time.sleep(args.warmup)
        pid = worker_pid(log_path)
        if pid is None:
            raise SystemExit(f"the audio worker did not start:\n{log_path.read_text()[-3000:]}")
        pids.add(pid)
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        pulse_c0 = cpu_ticks(pulse.proc.pid)
        while time.monotonic() - t0 < args.seconds:
            time.sleep(min(1.0, args.seconds - (time.monotonic() - t0)))
            now_pid = worker_pid(log_path)
            if now_pid is not None:
                pids.add(now_pid)
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited early:\n{log_path.read_text()[-3000:]}")
        wall = time.monotonic() - t0
        c1, pulse_c1 = cpu_ticks(pid), cpu_ticks(pulse.proc.pid)
        staging = Spool(tmp / "spool").staging_dir("hive_audio")
        # Read before SIGTERM: at shutdown the aggregator seals the staged records into a bundle.
        metas = [json.loads(p.read_text()) for p in sorted(staging.glob("*.flac.meta.json"))]
        full_frames = round(args.segment_s * 48000)
        full = [m for m in metas if m["frames"] == full_frames]
        peak = 0.0
        complete = [p for p in sorted(staging.glob("*.flac")) if soundfile.info(p).frames == full_frames]
        if complete:
            data, rate = soundfile.read(complete[-1], dtype="float64")
            peak = peak_hz(data, rate)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(120)
        stop_playing.set()
        player.join(10)
        pulse.stop()
    overflows = sum(m["overflows"] for m in metas)
    # The ALSA pulse plugin drops audio silently when the reader falls behind (no input_overflow
    # flag): a loss shows as a gap between one segment's end and the next one's start instead.
    from beemond.core.clock import parse_iso

    spans = sorted((parse_iso(m["start"]), parse_iso(m["end"])) for m in metas)
    gaps = [(b[0] - a[1]).total_seconds() * 1000 for a, b in zip(spans, spans[1:])]
    max_gap_ms = max((abs(g) for g in gaps), default=0.0)
    cpu = (c1 - c0) / TICK / wall * 100 if c1 is not None and c0 is not None else float("nan")
    pulse_cpu = (pulse_c1 - pulse_c0) / TICK / wall * 100
    problems = [line for line in log_path.read_text().splitlines() if re.search(r" (WARNING|ERROR) |Traceback", line)]
    print(f"audio worker pid {pid}: {(c1 - c0) / TICK:.2f} CPU s in {wall:.1f} s; pulseaudio {pulse_cpu:.2f} % "
          f"(the sound server, not ours); daemon exit status {status} (expected 0)")
    print(f"{len(metas)} records, {len(full)} full {args.segment_s:g} s segments; log problems: {len(problems)}")
    for line in problems[:10]:
        print("  " + line)
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"seconds={args.seconds:g} overflows={overflows} cpu_percent={cpu:.2f} segments={len(full)} "
          f"peak_hz={peak:.0f} max_gap_ms={max_gap_ms:.0f} restarts={len(pids) - 1} exit_status={status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
