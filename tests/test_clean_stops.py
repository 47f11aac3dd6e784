"""Clean stops are clean: the uploader's inotify observer stops without watchdog logging an ERROR, and
the real daemon stopped with SIGTERM logs no ERROR line (bench/clean_stops.py does 20 in a row)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import subprocess
import sys
import threading

import pytest

from beemond import config, ipc
from beemond.upload.uploader import FILE_EVENT, Uploader
from conftest import ROOT, make_config, wait_for


def test_outbox_observer_stops_cleanly_while_a_bundle_is_being_read(tmp_path, keys, password_file, caplog):
    """Reading the bundle being uploaded used to feed watchdog's emitter open/close events; stopping
    the observer while it held one logged "queue_events() called when the thread is inactive" at
    ERROR (10 to 43 of 300 stops, bench/clean_stops.py). Bundles renamed into the outbox must still be seen."""
    cfg = config.load(make_config(tmp_path, keys, password_file, 21))
    commands: queue.Queue = queue.Queue()
    up = Uploader(cfg, ipc.Channel("uploader", commands, multiprocessing.Pipe(False)[1], 1))
    bundle = up.outbox / "bundle.tar.age"
    bundle.write_bytes(os.urandom(64 * 1024))
    reading = threading.Event()

    def uploading():   # what a transfer does to the outbox: read the bundle, over and over
        while not reading.is_set():
            with open(bundle, "rb") as f:
                while f.read(8192):
                    pass

    reader = threading.Thread(target=uploading, daemon=True)
    reader.start()
    caplog.set_level(logging.INFO)
    try:
        for _ in range(150):
            up._start_observer()
            up._stop_observer()
        up._start_observer()
        staged = up.outbox / ".sealing.tmp-1"
        staged.write_bytes(b"x")
        os.replace(staged, up.outbox / "new.tar.age")   # as the aggregator publishes a bundle
        got = wait_for(lambda: next((c for c in iter_queue(commands) if c.kind == FILE_EVENT), None), 10,
                       "the rename into the outbox")
        assert got.path.endswith("new.tar.age")
    finally:
        up._stop_observer()
        reading.set()
        reader.join(5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def iter_queue(q: queue.Queue):
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


@pytest.mark.slow
def test_three_clean_stops_of_the_daemon_log_no_error():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "clean_stops.py"), "--stops", "3", "--jitter", "0.5",
                          "--observer-cycles", "0"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = res.stdout.strip().splitlines()[-1]
    values = dict(kv.split("=", 1) for kv in last.split())
    assert values["stops"] == "3"
    assert values["error_lines"] == "0" and values["bad_exits"] == "0", res.stdout + res.stderr[-3000:]
    assert res.returncode == 0
