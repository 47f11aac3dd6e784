"""Drive a polled sensor worker in process, without mocks: a real config file loaded by
``beemond.config.load``, a real command queue and event pipe behind an ``ipc.Channel``, the worker's
own ``run()`` loop in a thread (as tests/test_sht3x.py does for the SHT3x)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import queue
import threading
import time
from pathlib import Path

import tomli_w

from beemond import config, ipc
from beemond.bundle import crypto
from beemond.sensors import make_sensor_worker
from beemond.spool import Spool

URBAN = Path(__file__).resolve().parents[1] / "data/urban-2021/hive_temperature_humidity_2021.csv"


def write_config(tmp_path: Path, name: str, sensor: dict) -> Path:
    crypto.keygen(tmp_path / "keys")
    tree = {"daemon": {"host": "test-hive", "spool_dir": "spool", "heartbeat_interval_s": 0.2,
                       "heartbeat_timeout_s": 5.0},
            "sensors": {name: sensor},
            "bundle": {"recipients": ["keys/recipient.txt"]},
            "upload": {"protocol": "none"}}
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(tree))
    return path


class CountingQueue(queue.Queue):
    """A worker's command queue, counting the worker's waits on it (``Channel.receive``)."""

    waits = 0

    def get(self, block=True, timeout=None):
        self.waits += 1
        return super().get(block, timeout)


class Harness:
    """One sensor's worker with a real command queue and a real event pipe, run in a thread."""

    def __init__(self, tmp_path: Path, name: str, sensor: dict | None = None):
        """*sensor* None: the config already written in *tmp_path* (a restart of the same sensor)."""
        self.cfg = config.load(write_config(tmp_path, name, sensor) if sensor is not None else tmp_path / "beemond.toml")
        self.sensor = self.cfg.sensors[0]
        self.commands = queue.Queue()
        self.events_r, self.events_w = multiprocessing.Pipe(duplex=False)
        self.channel = ipc.Channel(self.sensor.name, commands=self.commands, events=self.events_w,
                                   heartbeat_interval_s=self.cfg.daemon.heartbeat_interval_s)
        self.worker = make_sensor_worker(self.cfg, self.sensor, self.channel)
        self.staging = Spool(self.cfg.spool).staging_dir(self.sensor.name)
        self.failure: BaseException | None = None

    def run(self, captures: int, timeout: float = 20.0) -> list[ipc.Event]:
        """Queue *captures* CAPTURE_NOW commands and a SHUTDOWN, run the loop to its end, and return
        the events it sent. An exception that ends the loop is kept in ``self.failure``."""
        for _ in range(captures):
            self.commands.put(ipc.CaptureNow())
        self.commands.put(ipc.Shutdown(reason="test"))

        def target():
            try:
                self.worker.run()
            except BaseException as e:  # the worker process would exit non-zero on this
                self.failure = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(timeout)
        assert not t.is_alive(), "worker did not shut down"
        events = []
        while self.events_r.poll(0.05):
            events.append(self.events_r.recv())
        return events

    def records(self) -> list[tuple[Path, list[list[str]], dict]]:
        out = []
        if not self.staging.is_dir():
            return out
        for path in sorted(p for p in self.staging.iterdir() if not p.name.endswith(".meta.json")):
            with open(path, newline="") as f:
                table = list(csv.reader(f))
            meta = json.loads((path.parent / (path.name + ".meta.json")).read_text())
            out.append((path, table, meta))
        return out

    def record(self) -> tuple[Path, list[list[str]], dict]:
        recs = self.records()
        assert len(recs) == 1, [r[0].name for r in recs]
        return recs[0]


def expand(ranges: list[list[int]]) -> list[int]:
    return [i for a, b in ranges for i in range(a, b + 1)]


def wait_events(h: Harness, kind: str, deadline_s: float = 5.0) -> list[ipc.Event]:
    """Events read from the pipe until one of *kind* arrives or the deadline passes."""
    events, deadline = [], time.monotonic() + deadline_s
    while time.monotonic() < deadline and not any(e.kind == kind for e in events):
        if h.events_r.poll(0.05):
            events.append(h.events_r.recv())
    return events
