"""Cost of the health features on this machine: the audio_bands processor on one segment, and a
/metrics scrape of a Health collector holding many series.

    .venv/bin/python bench/health.py [--seconds 60] [--rate 48000] [--series 200] [--repeat 5]

Prints the medians, then one line of key=value pairs. A Pi 4 is roughly 3-4x slower than a desktop core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beemond import ipc  # noqa: E402
from beemond.processors.audio_bands.worker import band_power  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0, help="segment length (s)")
    ap.add_argument("--rate", type=int, default=48000, help="sample rate (Hz)")
    ap.add_argument("--series", type=int, default=200, help="readings held by the collector")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        seg = Path(tmp) / "segment.flac"
        n = int(args.seconds * args.rate)
        t = np.arange(n) / args.rate
        x = 0.3 * np.sin(2 * np.pi * 250 * t) + 0.02 * np.random.default_rng(0).standard_normal(n)
        soundfile.write(str(seg), x, args.rate, subtype="PCM_24", format="FLAC")
        del x, t
        bands = [(100, 300), (300, 600), (600, 1000), (1000, 2000)]
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            band_power(seg, bands)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak is the working set
        band_power(seg, bands)
        peak_mb = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        bands_s = statistics.median(times)
        print(f"audio_bands: {args.seconds:g} s at {args.rate} Hz PCM_24 FLAC in {bands_s:.3f} s "
              f"({args.seconds / bands_s:.0f}x real time); peak Python+numpy memory {peak_mb:.2f} MB")

    scrape_s, size = scrape_cost(args.series, args.repeat)
    print(f"scrape: {args.series} readings + daemon series in {scrape_s * 1000:.2f} ms, {size} bytes")
    print(f"bands_seconds={bands_s:.4f} bands_realtime_x={args.seconds / bands_s:.0f} "
          f"bands_peak_mb={peak_mb:.2f} scrape_ms={scrape_s * 1000:.2f} scrape_bytes={size}")
    return 0


def scrape_cost(series: int, repeat: int) -> tuple[float, int]:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from beemond.supervisor.metrics import Health
    from beemond.supervisor.state import Worker, WorkerState

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SimpleNamespace(
            daemon=SimpleNamespace(host="bench"), metrics=SimpleNamespace(staleness_s=600.0), spool=Path(tmp),
            sensors=[SimpleNamespace(name=f"s{i}", type="sht3x") for i in range(10)], processors=[])
        workers = {f"s{i}": Worker("sensor", f"s{i}", state=WorkerState.RUNNING, starts=1) for i in range(10)}
        h = Health(cfg, workers)
        for i in range(series):
            w = workers[f"s{i % 10}"]
            h(w, ipc.Sample(worker=w.name, sensor=w.name, values={f"q{i // 10}_celsius": 20.0 + i}))
        reg = CollectorRegistry(auto_describe=False)
        reg.register(h)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            body = generate_latest(reg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), len(body)


if __name__ == "__main__":
    raise SystemExit(main())
