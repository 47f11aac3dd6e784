"""Clean stops are clean: start the real daemon, let it record and upload, stop it with SIGTERM, and
count the ERROR lines in its log; N times in a row, each on a fresh spool.

What it does
  Runs ``beemond run`` on the simulated hive of config/simulated.toml (sped up as in tests/conftest:
  SHT3x replay, audio, DS18B20, scale, the audio-bands and swarm processors) uploading to a local
  pyftpdlib server (scripts/ftp_server.py) on 127.0.0.1. Each run waits until a first bundle is
  uploaded (so the uploader's inotify observer is busy with the outbox), plus a random 0..--jitter s so
  the stop lands at varied moments, then sends SIGTERM and waits for the exit.
What it counts
  ``error_lines``: log lines at ERROR or above over all runs (a traceback's lines count once, on its
  first line); ``bad_exits``: runs whose exit status was not 0. Both must be 0. Each offending line is
  printed with its run number.
  The cause it guards against is rare in whole-daemon runs, so it is also measured directly
  (--observer-cycles): an outbox observer started and stopped N times while a thread reads a bundle
  in that directory (as a transfer does), counting watchdog's ERROR records, once with watchdog's
  default event mask (``default_mask_errors``) and once through the uploader's own
  ``_start_observer``/``_stop_observer`` (``uploader_observer_errors``, goal 0).

Reproduce (from the repo root):  .venv/bin/python bench/clean_stops.py [--stops 20] [--seed 1]
Ends with one line: stops= error_lines= bad_exits= default_mask_errors= uploader_observer_errors= seconds=
Exit status 1 if error_lines or bad_exits is not 0.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FtpServer, make_config  # noqa: E402

from beemond import config, ipc  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.upload.uploader import Uploader  # noqa: E402

# A human-format log line's level comes after the time stamp and the worker name (beemond.core.journal).
ERROR_RE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ", re.M)


def one_run(work: Path, n: int, ftp: FtpServer, keys: dict, password: Path, jitter: float,
            rng: random.Random) -> tuple[list[str], int]:
    """(ERROR lines, exit status) of one daemon lifetime on a fresh spool under *work*/run-N."""
    run = work / f"run-{n}"
    run.mkdir()
    cfg = make_config(run, keys, password, ftp.port)
    log_path = run / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "beemond", "run", "--config", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while not re.search(r"uploaded \S+", log_path.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"run {n}: no upload (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            time.sleep(rng.uniform(0, jitter))
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log_path.read_text(errors="replace")
    return [m.string[m.start():text.find("\n", m.start())] for m in ERROR_RE.finditer(text)], status


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record):
        self.count += 1


def observer_stops(work: Path, cycles: int) -> tuple[int, int]:
    """(watchdog ERROR records with the default event mask, with the uploader's observer) over
    *cycles* start/stop cycles each, while a thread keeps reading a bundle in the outbox."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    ident, rcpt, public = crypto.keygen(work / "obs-keys")
    password = work / "obs-password"
    password.write_text("x\n")
    cfg = config.load(make_config(work, {"identity": ident, "recipient": rcpt, "public": public}, password, 21))
    up = Uploader(cfg, ipc.Channel("uploader", queue.Queue(), multiprocessing.Pipe(False)[1], 1))
    bundle = up.outbox / "bundle.tar.age"
    bundle.write_bytes(os.urandom(64 * 1024))
    done = threading.Event()

    def read_bundle():
        while not done.is_set():
            with open(bundle, "rb") as f:
                while f.read(8192):
                    pass

    def default_mask():
        o = Observer()
        o.schedule(FileSystemEventHandler(), str(up.outbox), recursive=False)
        o.daemon = True
        o.start()
        time.sleep(0.01)   # the emitter in its read loop, as in a running uploader
        o.stop()
        o.join(5)

    def uploaders():
        up._start_observer()
        time.sleep(0.01)
        up._stop_observer()

    reader = threading.Thread(target=read_bundle, daemon=True)
    reader.start()
    counts = []
    try:
        for cycle in (default_mask, uploaders):
            handler = _Errors()
            logging.getLogger().addHandler(handler)
            try:
                for _ in range(cycles):
                    cycle()
            finally:
                logging.getLogger().removeHandler(handler)
            counts.append(handler.count)
    finally:
        done.set()
        reader.join(5)
    return counts[0], counts[1]


def clean_stops(stops: int, seed: int = 1, jitter: float = 3.0) -> dict:
    rng = random.Random(seed)
    t0 = time.monotonic()
    errors = bad = 0
    with tempfile.TemporaryDirectory(prefix="beemond-stops-") as tmp:
        work = Path(tmp)
        ident, rcpt, public = crypto.keygen(work / "keys")
        keys = {"identity": ident, "recipient": rcpt, "public": public}
        password = work / "ftp-password"
        password.write_text("stops\n")
        (work / "ftp-root").mkdir()
        ftp = FtpServer(work / "ftp-root", password).start()
        try:
            for n in range(1, stops + 1):
                lines, status = one_run(work, n, ftp, keys, password, jitter, rng)
                errors += len(lines)
                bad += status != 0
                for line in lines:
                    print(f"run {n}: {line}")
                if status != 0:
                    print(f"run {n}: exit status {status}")
        finally:
            ftp.stop()
    return {"stops": stops, "error_lines": errors, "bad_exits": bad}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stops", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jitter", type=float, default=3.0, help="random extra run time after the first upload, s")
    ap.add_argument("--observer-cycles", type=int, default=300, help="0: skip the direct observer measurement")
    args = ap.parse_args()
    t0 = time.monotonic()
    result = clean_stops(args.stops, args.seed, args.jitter)
    if args.observer_cycles:
        with tempfile.TemporaryDirectory(prefix="beemond-observer-") as tmp:
            result["default_mask_errors"], result["uploader_observer_errors"] = observer_stops(Path(tmp),
                                                                                             args.observer_cycles)
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 1 if result["error_lines"] or result["bad_exits"] or result.get("uploader_observer_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
