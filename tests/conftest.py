"""Shared fixtures: a real FTP server, real age keys, configs, and the daemon as a subprocess."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "urban-2021" / "hive_temperature_humidity_2021.csv"  # a copy of ../shared/data: data/README.md
AGE = shutil.which("age")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll *predicate* until it returns a truthy value or *timeout* seconds pass (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FtpServer:
    """pyftpdlib in its own process (scripts/ftp_server.py), on 127.0.0.1."""

    def __init__(self, root: Path, password_file: Path, port: int = 0, extra_args: tuple[str, ...] = ()):
        self.root, self.password_file, self.port = root, password_file, port
        self.extra_args = list(extra_args)  # e.g. --tls-cert/--tls-key, --readonly (scripts/ftp_server.py)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FtpServer":
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "ftp_server.py"), "--root", str(self.root),
             "--port", str(self.port), "--password-file", str(self.password_file), *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # "ready PORT" once listening, or EOF if it died
        assert line.startswith("ready "), f"FTP server did not start: {line!r}"
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def bundles(self) -> list[Path]:
        return sorted(self.root.rglob("*.tar.age"))

    def parts(self) -> list[Path]:
        return sorted(self.root.rglob("*.part"))


def mount_loop_ext4(tmp_path: Path, size_mb: int, options: str) -> tuple[Path, Path]:
    """A fresh ext4 image of *size_mb* in *tmp_path*, mounted through a loop device with *options*
    (``loop,...``) on ``tmp_path/mnt``; returns (image, mount point). Skips without root or losetup."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and loop devices")
    img, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["mount", "-o", options, str(img), str(mnt)], check=True)
    return img, mnt


@pytest.fixture
def keys(tmp_path):
    from beemond.bundle import crypto

    ident, rcpt, public = crypto.keygen(tmp_path / "keys")
    return {"identity": ident, "recipient": rcpt, "public": public}


@pytest.fixture
def password_file(tmp_path):
    p = tmp_path / "ftp-password"
    p.write_text("hive-secret\n")
    return p


@pytest.fixture
def ftp(tmp_path, password_file):
    server = FtpServer(tmp_path / "ftp-root", password_file).start()
    yield server
    server.stop()


def set_dotted(tree: dict, dotted: str, value) -> None:
    """``tree["a"]["b"]["c"] = value`` for ``"a.b.c"``, tables made as needed; None removes the key."""
    node = tree
    *parents, key = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(key, None)
    else:
        node[key] = value


def make_config(tmp_path: Path, keys, password_file: Path, port: int, **over) -> Path:
    """A fast simulated hive derived from config/simulated.toml; *over* maps 'section.key' to values."""
    cfg = tomllib.loads((ROOT / "config" / "simulated.toml").read_text())
    cfg["daemon"].update(spool_dir=str(tmp_path / "spool"), heartbeat_interval_s=0.5, heartbeat_timeout_s=20,
                         restart_backoff_initial_s=0.5, restart_backoff_max_s=2, shutdown_timeout_s=30)
    clim = cfg["sensors"]["hive_climate"]
    clim.update(interval_s=0.2, record_window_s=2)
    for sensor in cfg["sensors"].values():   # the copy lives elsewhere: every replay reads the UrBAN file
        if "replay" in sensor:
            sensor["replay"]["file"] = str(DATA)
    cfg["sensors"]["hive_audio"].update(segment_s=1, sample_rate_hz=8000)
    # The SCD4x measures every 5 s (datasheet 3.5.1) and its worker waits out a measurement before it
    # reads a command: with it, every daemon test here took ~3 s longer (tests/test_daemon.py: 35 -> 52 s).
    # test_scd4x.py runs the daemon with it (an override of one of its keys keeps it).
    if not any(dotted.startswith("sensors.hive_co2.") for dotted in over):
        cfg["sensors"].pop("hive_co2", None)
    cfg["bundle"].update(max_duration_s=3, recipients=[str(keys["recipient"])])
    cfg.setdefault("metrics", {})["port"] = free_port()  # daemons of parallel runs never share a port
    cfg["upload"].update(port=port, password_file=str(password_file), backoff_initial_s=0.2, backoff_max_s=1,
                         shutdown_grace_s=10)
    for dotted, value in over.items():
        set_dotted(cfg, dotted, value)
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


class Daemon:
    """``beemond run`` as a subprocess, its log in a file we can wait on."""

    def __init__(self, config: Path, log: Path, duration: float | None = None):
        self.log_path = log
        cmd = [sys.executable, "-m", "beemond", "run", "--config", str(config)]
        if duration is not None:
            cmd += ["--duration", str(duration)]
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30, count: int = 1) -> list[re.Match]:
        def found():
            matches = list(re.finditer(pattern, self.log()))
            return matches if len(matches) >= count else None
        return wait_for(found, timeout, f"log line /{pattern}/ x{count}")

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def terminate(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill_tree(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(config: Path, log: Path, duration: float | None = None) -> Daemon:
        d = Daemon(config, log, duration)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill_tree()


def decrypt_with_age(bundle: Path, identity: Path) -> dict[str, bytes]:
    """Decrypt with the stock age CLI and check every manifest hash independently of beemond."""
    assert AGE, "the age CLI is required (scripts/setup installs it)"
    plain = subprocess.run([AGE, "-d", "-i", str(identity), str(bundle)], check=True, capture_output=True).stdout
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    manifest = json.loads(members.pop("manifest.json"))
    listed = {r["path"]: r for r in manifest["records"]}
    assert set(listed) == set(members), f"{bundle.name}: manifest and members differ"
    for name, data in members.items():
        assert hashlib.sha256(data).hexdigest() == listed[name]["sha256"], f"{name}: hash mismatch"
        assert len(data) == listed[name]["size"]
    return {"manifest": manifest, "members": members}


def climate_rows(members: dict[str, bytes]) -> list[tuple[str, str, str]]:
    """(time, °C, %RH) strings from every climate CSV record among *members*."""
    rows = []
    for name, data in members.items():
        if name.startswith("hive_climate/"):
            lines = data.decode().splitlines()
            assert lines[0] == "time,temperature_c,humidity_rh"
            rows += [tuple(line.split(",")) for line in lines[1:]]
    return rows


def urban_rows(tag: str = "3629") -> list[tuple[str, str]]:
    """The UrBAN rows the demo config replays, formatted as the driver writes them (2 decimals)."""
    from beemond.sensors.replay import load_rows

    rows = load_rows(DATA, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", tag)
    return [(f"{r.temperature_c:.2f}", f"{r.humidity_rh:.2f}") for r in rows]
