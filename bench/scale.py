"""Cost of a hive-scale reading: the real driver (beemond.sensors.scale.driver) reading the scale emulator over
a pty, as ``backend = "simulated"`` does.

- latency of one reading (median of ``--samples`` polled lines), over ``--readings`` readings;
- CPU time of this process per reading (driver + emulator thread);
- CPU used while idle between readings (the emulator sleeps on select until polled; the goal is ~0).

Usage: ``.venv/bin/python bench/scale.py [--readings 200] [--samples 5] [--idle-seconds 5]``. About 10 s.
Ends with one line of key=value pairs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from beemond import config, ipc  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.sensors.scale.driver import ScaleWorker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=200)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crypto.keygen(tmp / "keys")
        tree = {"daemon": {"spool_dir": "spool"},
                "sensors": {"scale": {"type": "scale", "backend": "simulated", "request": "W\r\n",
                                      "samples": args.samples, "read_timeout_s": 1.0,
                                      "simulation": {"start": "2021-06-19T00:00:00Z", "speedup": 600}}},
                "bundle": {"recipients": ["keys/recipient.txt"]}, "upload": {"protocol": "none"}}
        (tmp / "beemond.toml").write_text(tomli_w.dumps(tree))
        cfg = config.load(tmp / "beemond.toml")
        _r, w = multiprocessing.Pipe(duplex=False)
        channel = ipc.Channel("scale", queue.Queue(), w, heartbeat_interval_s=3600)
        worker = ScaleWorker(cfg, cfg.sensors[0], channel)
        try:
            worker.read()  # opens the port
            latencies = []
            cpu0 = time.process_time()
            for _ in range(args.readings):
                t0 = time.perf_counter()
                weight, raw, _temp, n = worker.read()
                latencies.append(time.perf_counter() - t0)
                assert n == args.samples and 30 < weight < 60, (weight, n)
            cpu_per_reading = (time.process_time() - cpu0) / args.readings
            cpu0, t0 = time.process_time(), time.monotonic()
            time.sleep(args.idle_seconds)   # idle between readings: nothing should run
            idle = (time.process_time() - cpu0) / (time.monotonic() - t0)
        finally:
            worker.close()
    med, p95 = statistics.median(latencies), sorted(latencies)[int(0.95 * (len(latencies) - 1))]
    print(f"{args.readings} readings of {args.samples} polled lines over a pty:")
    print(f"  latency median {med * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms")
    print(f"  CPU {cpu_per_reading * 1000:.2f} ms per reading; idle {idle * 100:.3f} % of a core")
    print(f"readings={args.readings} samples={args.samples} latency_median_ms={med * 1000:.2f} "
          f"latency_p95_ms={p95 * 1000:.2f} cpu_ms_per_reading={cpu_per_reading * 1000:.2f} "
          f"idle_cpu_percent={idle * 100:.3f}")


if __name__ == "__main__":
    main()
