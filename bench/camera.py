"""Camera driver costs with the picamera2 stand-in (beemond.sensors.camera.emulator), in process.

What is measured
  still_ms: median wall time of CameraWorker.capture("still") at WIDTHxHEIGHT: frame wait (the stand-in
  paces frames at the configured fps), JPEG encoding (Pillow), write temp+fsync+rename and the sidecar.
  npy_ms: the same for a 1-frame .npy still. jpeg_kb: size of one still.
  stall_recovery_s: from a capture call on a camera that has stalled to its record on a fresh
  Picamera2: stall_timeout_s + close + backoff + reopen + capture.
  On a Pi the stand-in's frame synthesis is replaced by the ISP and the numbers differ; this measures
  the driver's own overhead and the watchdog's reaction time.

Reproduce (from the repo root):  .venv/bin/python bench/camera.py [--width 640 --height 480 --repeat 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import tempfile
import time
from pathlib import Path

from beemond import config, ipc
from beemond.bundle import crypto
from beemond.sensors.camera.driver import CameraWorker
from beemond.sensors.camera.emulator import StandInBackend


def worker(tmp: Path, backend, **camera) -> CameraWorker:
    _ident, rcpt, _pub = crypto.keygen(tmp / "keys")
    keys = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in camera.items())
    path = tmp / "b.toml"
    path.write_text(f'[daemon]\nspool_dir = "{tmp}/spool"\n[bundle]\nrecipients = ["{rcpt}"]\n'
                    f'[upload]\nprotocol = "none"\n[sensors.cam]\ntype = "camera"\nbackend = "simulated"\n{keys}\n')
    cfg = config.load(path)
    _reader, writer = multiprocessing.Pipe(duplex=False)
    channel = ipc.Channel("cam", queue.Queue(), writer, 1.0)
    return CameraWorker(cfg, cfg.sensors[0], channel, backend=backend)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        size = dict(width=a.width, height=a.height, framerate_fps=120.0)
        w = worker(tmp / "jpeg", StandInBackend(), **size)
        w.capture("still", "bench")  # open and configure once
        still = timed(lambda: w.capture("still", "bench"), a.repeat)
        jpeg_kb = statistics.median(p.stat().st_size for p in w.staging.glob("*.jpg")) / 1024
        w._abandon()
        n = worker(tmp / "npy", StandInBackend(), format="npy", **size)
        n.capture("still", "bench")
        npy = timed(lambda: n.capture("still", "bench"), a.repeat)
        n._abandon()
        s = worker(tmp / "stall", StandInBackend(stall_after_frames=1), stall_timeout_s=1.0, **size)
        s.capture("still", "bench")                       # frame 1; the camera stalls from now on
        stall = timed(lambda: s.capture("still", "bench"), 1)[0]
        assert s.stalls == 1 and s.opens == 2, (s.stalls, s.opens)
        s._abandon()
    print(f"{a.width}x{a.height}: still (JPEG) median {statistics.median(still) * 1000:.1f} ms, "
          f"npy median {statistics.median(npy) * 1000:.1f} ms, JPEG {jpeg_kb:.0f} KiB; "
          f"stall detected and recovered in {stall:.2f} s with stall_timeout_s = 1")
    print(f"still_ms={statistics.median(still) * 1000:.1f} npy_ms={statistics.median(npy) * 1000:.1f} "
          f"jpeg_kb={jpeg_kb:.0f} stall_recovery_s={stall:.2f}")


if __name__ == "__main__":
    main()
