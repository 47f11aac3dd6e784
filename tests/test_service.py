"""Running as a Debian service: the systemd unit, sd_notify against a real datagram socket, SIGHUP
reload, the install script, clock steps and the synchronisation flag."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from conftest import ROOT, make_config, wait_for

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SHELLCHECK = shutil.which("shellcheck")
UNIT = ROOT / "systemd" / "beemond.service"
INSTALL = ROOT / "scripts" / "install.sh"


# ------------------------------------------------------------------------------------------ the unit

def unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this venv's beemond (verify needs the binary)."""
    beemond = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "beemond"
    if not beemond.exists():
        beemond = ROOT / ".venv" / "bin" / "beemond"
    assert beemond.exists(), beemond
    text = UNIT.read_text().replace("=/opt/beemond/venv/bin/beemond ", f"={beemond} ")  # ExecStart=, ExecReload=
    assert f"ExecStart={beemond} " in text and f"ExecReload={beemond} reload " in text
    path = tmp_path / "beemond.service"
    path.write_text(text)
    return path


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_declares_the_service_contract():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["78"]
    assert s["User"] == ["beemond"] and set(s["SupplementaryGroups"][0].split()) == {"i2c", "gpio", "audio", "video", "dialout"}
    assert s["StateDirectory"] == ["beemond"] and s["ConfigurationDirectory"] == ["beemond"]
    assert s["DevicePolicy"] == ["closed"] and "PrivateDevices" not in s
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert allowed == {"char-i2c", "char-ttyUSB", "char-ttyACM", "char-alsa", "char-video4linux",
                       "char-gpiochip", "char-dma_heap", "char-media"}
    # The credential named in the example config is the one the unit loads.
    cfg = tomllib.loads((ROOT / "config" / "beemond.toml").read_text())
    assert s["LoadCredential"][0].split(":")[0] == cfg["upload"]["password_credential"]
    # The watchdog outlasts the orchestrator's own hung-worker timeout, and the stop timeout covers the
    # ordered shutdown (each role's share of shutdown_timeout_s, then the uploader's grace + 10 s).
    from beemond.supervisor.orchestrator import SHUTDOWN_SHARES

    assert int(s["WatchdogSec"][0]) > cfg["daemon"]["heartbeat_timeout_s"]
    shares = sum(share for _, share in SHUTDOWN_SHARES)
    stop_needed = shares * cfg["daemon"]["shutdown_timeout_s"] + cfg["upload"]["shutdown_grace_s"] + 10
    assert int(s["TimeoutStopSec"][0]) > stop_needed
    assert s["KillMode"] == ["mixed"]  # SIGTERM to the orchestrator alone, which orders the stop
    # `systemctl reload` waits for the daemon's verdict; the socket lives where group beemond may reach it.
    assert s["ExecReload"] == ["/opt/beemond/venv/bin/beemond reload --config /etc/beemond/beemond.toml"]
    assert s["RuntimeDirectory"] == ["beemond"] and s["RuntimeDirectoryMode"] == ["0750"]
    assert cfg["daemon"]["status_socket"] == "/run/beemond/status.sock"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_verifies_and_scores_at_most_2_0(tmp_path):
    unit = unit_for_this_machine(tmp_path)
    res = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stdout + res.stderr
    # --threshold is on the 0-100 scale: 20 means an exposure of 2.0.
    res = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", str(unit)],
                         capture_output=True, text=True, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    assert res.returncode == 0 and float(m.group(1)) <= 2.0, m.group(0)


STRACE = shutil.which("strace")
SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None or STRACE is None or SETPRIV is None,
                    reason="needs systemd-analyze, strace and setpriv")
def test_unit_lets_the_clock_query_through_but_not_a_clock_change(tmp_path):
    """Under the unit, beemond/core/clock.py must still learn from the kernel whether the clock is
    synchronised (chrony, ntpd: no timesyncd flag file), and must still be unable to set it."""
    s = unit_settings()
    # ProtectClock= adds a seccomp filter of its own that refuses even a read-only adjtimex.
    assert "ProtectClock" not in s
    # systemd's own reading of the SystemCallFilter= lines (their order matters): @clock is allowed back.
    unit = unit_for_this_machine(tmp_path)
    res = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert re.search(r"SystemCallFilter=~@clock .*adjtimex is allowed", res.stdout), res.stdout
    assert re.search(r"✓ CapabilityBoundingSet=~CAP_SYS_TIME ", res.stdout), res.stdout
    allowed_back = set(s["SystemCallFilter"][-1].split())
    # The calls clock.py really makes (glibc turns adjtimex() into clock_adjtime) are all allowed back.
    probe = "from beemond.core import clock; print(clock.kernel_synchronized())"
    res = subprocess.run([STRACE, "-f", "-qq", "-e", "trace=/adjtime", sys.executable, "-c", probe],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    made = set(re.findall(r"^(?:\[pid +\d+\] )?(\w*adjtime\w*)\(", res.stderr, re.M))
    assert made and made <= allowed_back, (made, allowed_back, res.stderr[-2000:])
    # As the unit runs it (a user without capabilities): the query answers, a change is refused.
    change = ("import ctypes; from beemond.core import clock; clock.kernel_synchronized(); tx = clock._Timex(); "
              "tx.modes = 1; print(clock._libc.adjtimex(ctypes.byref(tx)), ctypes.get_errno())")
    # The checkout (and its venv) may sit in a directory that user cannot enter (CI clones into a 0700
    # mktemp dir), so the unprivileged runs import a copy of clock.py (stdlib-only) from a readable one.
    readable = Path(tempfile.mkdtemp(prefix="beemond-clock-"))
    try:
        readable.chmod(0o755)
        shutil.copy(ROOT / "beemond" / "core" / "clock.py", readable / "clock.py")
        (readable / "clock.py").chmod(0o644)
        unprivileged = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all",
                        "--inh-caps=-all", sys.executable, "-I", "-c"]
        local = f"import sys; sys.path.insert(0, {str(readable)!r}); import clock; "
        res = subprocess.run(unprivileged + [local + "print(clock.kernel_synchronized())"], capture_output=True,
                             text=True, cwd=readable, timeout=60)
        assert res.stdout.strip() in ("True", "False"), res.stdout + res.stderr
        res = subprocess.run(unprivileged + [local + change.replace("from beemond.core import clock; ", "")],
                             capture_output=True, text=True, cwd=readable, timeout=60)
        assert res.stdout.split() == ["-1", str(errno.EPERM)], res.stdout + res.stderr  # ADJ_OFFSET needs CAP_SYS_TIME
    finally:
        shutil.rmtree(readable, ignore_errors=True)


# Under a seccomp filter like ProtectClock=yes's (adjtimex, clock_adjtime -> EPERM), in a child process:
# a classic BPF program on the syscall number, installed with prctl(2) (seccomp(2), "SECCOMP_RET_ERRNO").
CLOCK_SYSCALLS = {"x86_64": (159, 305), "aarch64": (171, 266)}  # adjtimex, clock_adjtime
SECCOMP_CHILD = """
import ctypes, logging, os, platform, sys
class F(ctypes.Structure): _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class P(ctypes.Structure): _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]
a, b = %r[platform.machine()]
prog = (F * 5)(F(0x20, 0, 0, 0), F(0x15, 2, 0, a), F(0x15, 1, 0, b), F(0x06, 0, 0, 0x7fff0000), F(0x06, 0, 0, 0x00050001))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(P(5, prog)), 0, 0) == 0, ctypes.get_errno()
logging.basicConfig(stream=sys.stdout, format="%%(levelname)s %%(message)s")
from beemond.core import clock
print(clock.kernel_synchronized(), clock.synchronized(sys.argv[1]), clock.synchronized(sys.argv[2]))
"""


@pytest.mark.skipif(os.uname().machine not in CLOCK_SYSCALLS, reason="syscall numbers known for x86_64, aarch64")
def test_clock_state_unreadable_under_a_seccomp_filter_falls_back_and_says_why(tmp_path):
    flag = tmp_path / "synchronized"
    flag.touch()
    res = subprocess.run([sys.executable, "-c", SECCOMP_CHILD % CLOCK_SYSCALLS, str(flag), str(tmp_path / "absent")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "None True False"  # unknown; timesyncd's flag file still counts; else "not synchronised"
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "Operation not permitted" in warnings[0], lines  # once, with the reason


def test_udev_rules_cover_the_devices():
    rules = (ROOT / "udev" / "99-beemond.rules").read_text()
    active = [line for line in rules.splitlines() if line and not line.startswith("#")]
    for subsystem, group in [("i2c-dev", "i2c"), ("gpio", "gpio"), ("video4linux", "video"), ("media", "video")]:
        assert any(f'SUBSYSTEM=="{subsystem}"' in line and f'GROUP="{group}"' in line and 'MODE="0660"' in line
                   for line in active), subsystem
    assert re.search(r'^#SUBSYSTEM=="tty", ATTRS\{idVendor\}=="[0-9a-f]{4}", ATTRS\{idProduct\}=="[0-9a-f]{4}", '
                     r'SYMLINK\+="beemond-scale"', rules, re.M)


# ------------------------------------------------------------------------------------------ install.sh

@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
def test_install_script_is_shellcheck_clean():
    res = subprocess.run([SHELLCHECK, str(INSTALL)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_install_dry_run_prints_every_action_and_changes_nothing(tmp_path):
    dest = tmp_path / "root"
    res = subprocess.run(["bash", str(INSTALL), "--dry-run", "--destdir", str(dest), "--enable-i2c"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    actions = [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]
    expected = [f"python3 -m venv --system-site-packages {dest}/opt/beemond/venv",
                f"install -m 0640 {ROOT}/config/beemond.toml {dest}/etc/beemond/beemond.toml",
                f"install -m 0600 /dev/null {dest}/etc/beemond/upload-password",
                f"install -d -m 0750 {dest}/var/lib/beemond",
                f"install -D -m 0644 {ROOT}/systemd/beemond.service {dest}/etc/systemd/system/beemond.service",
                f"install -D -m 0644 {ROOT}/udev/99-beemond.rules {dest}/etc/udev/rules.d/99-beemond.rules",
                f"{dest}/opt/beemond/venv/bin/pip install --quiet --no-deps --upgrade {ROOT}"]
    for action in expected:
        assert action in actions, (action, actions)
    assert "skipping udevadm" in res.stdout and "skipping systemctl" in res.stdout
    assert not dest.exists(), "a dry run must not create anything"

    # An existing config is never overwritten; uninstall keeps config and spool unless --purge.
    (dest / "etc" / "beemond").mkdir(parents=True)
    (dest / "etc" / "beemond" / "beemond.toml").write_text("# mine\n")
    (dest / "var" / "lib" / "beemond").mkdir(parents=True)
    res = subprocess.run(["bash", str(INSTALL), "--dry-run", "--destdir", str(dest)], capture_output=True, text=True)
    assert "keeping the existing" in res.stdout and "config/beemond.toml" not in res.stdout
    res = subprocess.run(["bash", str(INSTALL), "--uninstall", "--dry-run", "--destdir", str(dest)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "rm -rf" not in res.stdout and "kept the config" in res.stdout
    res = subprocess.run(["bash", str(INSTALL), "--uninstall", "--purge", "--dry-run", "--destdir", str(dest)],
                         capture_output=True, text=True)
    assert f"+ rm -rf {dest}/etc/beemond" in res.stdout and f"+ rm -rf {dest}/var/lib/beemond" in res.stdout
    assert (dest / "etc" / "beemond" / "beemond.toml").read_text() == "# mine\n"


# ------------------------------------------------------------------------------------------ clock

class SteppingClock:
    """A wall clock that runs one second per reading and steps back an hour at reading *step_at*;
    the monotonic clock runs one second per reading throughout. Unsynchronised until *sync_at*."""

    def __init__(self, step_at: int, sync_at: int):
        self.n_wall = self.n_mono = 0
        self.step_at, self.sync_at = step_at, sync_at
        self.base = 1_624_060_800.0  # 2021-06-19T00:00:00Z

    def wall(self) -> float:
        n, self.n_wall = self.n_wall, self.n_wall + 1
        return self.base + n - (3600 if n >= self.step_at else 0)

    def monotonic(self) -> float:
        n, self.n_mono = self.n_mono, self.n_mono + 1
        return 1000.0 + n

    def synchronized(self) -> bool:
        return self.n_wall > self.sync_at


def test_backwards_clock_step_never_makes_negative_or_overlapping_windows(tmp_path):
    from test_sht3x import Harness

    from beemond import ipc
    from beemond.spool import sidecar_of
    from beemond.core.clock import Clock, parse_iso
    from beemond.sensors.sht3x.driver import SHT3xWorker

    h = Harness(tmp_path)
    src = SteppingClock(step_at=4, sync_at=5)
    h.worker = SHT3xWorker(h.cfg, h.sensor, h.channel,
                           clock=Clock(wall=src.wall, monotonic=src.monotonic, sync_check=src.synchronized))
    # Reading 0 comes at start; STOP flushes a first record of readings 0-2; the clock steps back an
    # hour at reading 4; STOP flushes the second record (readings 3-7); the shutdown flushes the third
    # (readings 8-9, after synchronisation).
    for command in [ipc.CaptureNow(), ipc.CaptureNow(), ipc.Stop()] + [ipc.CaptureNow()] * 5 + [ipc.Stop()] + [ipc.CaptureNow()] * 2:
        h.commands.put(command)
    h.run(captures=0)
    records = []
    for path in sorted(p for p in h.staging.iterdir() if not p.name.endswith(".meta.json")):
        meta = json.loads(sidecar_of(path).read_text())
        times = [parse_iso(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]
        records.append((meta, times))
    assert [m["rows"] for m, _ in records] == [3, 5, 2]
    all_times = [t for _, times in records for t in times]
    assert all(b > a for a, b in zip(all_times, all_times[1:])), all_times  # strictly increasing, across records
    (first, _), (second, times2), (third, _) = records
    assert parse_iso(first["end"]) < parse_iso(second["start"]) <= parse_iso(second["end"])
    assert second["clock_clamped"] >= 1 and "clock_clamped" not in first
    # Intervals stay true while clamped: one second per reading, on the monotonic clock.
    assert [(b - a).total_seconds() for a, b in zip(times2, times2[1:])] == [1.0] * 4
    assert first["clock_synchronized"] is False  # all three before sync
    assert second["clock_synchronized"] is False  # readings 3-5 were before sync
    assert third["clock_synchronized"] is True  # all after sync


def test_synchronisation_sources(tmp_path):
    from beemond.core import clock

    assert clock.kernel_synchronized() in (True, False)  # adjtimex(2) answers on Linux
    flag = tmp_path / "synchronized"
    assert clock.synchronized(str(flag)) == clock.kernel_synchronized()
    flag.touch()  # systemd-timesyncd's flag file wins
    assert clock.synchronized(str(flag)) is True


# ------------------------------------------------------------------------------------------ sd_notify

class NotifySocket:
    """An AF_UNIX datagram socket like systemd's, recording (monotonic time, message) pairs."""

    def __init__(self, abstract_name: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + abstract_name)
        self.sock.settimeout(0.2)
        self.address = "@" + abstract_name
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, key: str) -> list[float]:
        return [t for t, m in list(self.messages) if key in m.split("\n")]

    def values(self, prefix: str) -> list[str]:
        return [line[len(prefix):] for _, m in list(self.messages) for line in m.split("\n") if line.startswith(prefix)]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.mark.slow
def test_sd_notify_ready_status_watchdog_and_a_hung_worker(tmp_path, keys, password_file, ftp, daemons, monkeypatch):
    sock = NotifySocket(f"beemond-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: a ping every 0.5 s
        cfg = make_config(tmp_path, keys, password_file, ftp.port, **{"daemon.heartbeat_timeout_s": 4})
        d = daemons(cfg, tmp_path / "daemon.log")
        wait_for(lambda: sock.times("READY=1"), 30, "READY=1")
        ready_at = sock.times("READY=1")[0]
        d.wait_log("every worker is up", timeout=10)  # logged around READY=1, not necessarily before it
        log = d.log()
        assert "WatchdogSec=1 of the unit is not above daemon.heartbeat_timeout_s=4" in log
        sensors = list(tomllib.loads(cfg.read_text())["sensors"])
        for name in ("aggregator", "uploader", *sensors):
            assert f"started worker {name}" in log
        wait_for(lambda: len(sock.times("WATCHDOG=1")) >= 4, 10, "WATCHDOG=1 pings")
        assert sock.values("STATUS=")[0].startswith(f"{len(sensors)} sensors ok")
        # The uploader's OUTBOX events put the backlog on the line ("..., backlog 2 bundles / 0.1 MB").
        backlog = re.compile(r"^\d+ sensors ok(, .*)?, backlog \d+ bundles? / \d+\.\d MB(, |$)")
        wait_for(lambda: [v for v in sock.values("STATUS=") if backlog.match(v)], 30,
                 "a STATUS= line with the upload backlog")

        pid = int(re.search(r"started worker hive_climate \(sensor, pid (\d+)\)", log).group(1))
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        d.wait_log(r"worker hive_climate silent for \d+ s \(pid %d\): killing it" % pid, timeout=15)
        killed_at = time.monotonic()
        d.wait_log(r"started worker hive_climate \(sensor, pid (\d+)\)", count=2, timeout=15)
        wait_for(lambda: [t for t in sock.times("WATCHDOG=1") if t > killed_at], 10, "WATCHDOG=1 again")
        # Stale after 3 heartbeat intervals (1.5 s) + up to one ping period (0.5 s) + slack: from then
        # until the kill (4 s timeout), no ping at all.
        pings = sock.times("WATCHDOG=1")
        silent_from = stopped_at + 1.5 + 0.5 + 0.5
        assert killed_at - silent_from > 1.0, "the gap to check is too short to mean anything"
        assert not [t for t in pings if silent_from < t < killed_at - 0.2], "WATCHDOG=1 sent for a hung worker"
        assert [t for t in pings if ready_at < t < stopped_at], "pings before the hang"
        # The STATUS line showed the sensor in backoff while it waited to restart.
        assert any("backoff: hive_climate" in v for v in sock.values("STATUS=")), sock.values("STATUS=")
        assert d.terminate() == 0, d.log()
        assert sock.times("STOPPING=1")
    finally:
        sock.close()


def test_notifier_sends_to_a_path_socket_and_respects_watchdog_pid(tmp_path):
    from beemond.core.notify import Notifier

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval_s == 15.0
        assert n.ready("1 sensor ok\nbut two lines")
        assert server.recv(4096) == b"READY=1\nSTATUS=1 sensor ok but two lines"
        n.close()
    assert Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    off = Notifier({})
    assert not off.enabled and off.ready() is False


# ------------------------------------------------------------------------------------------ SIGHUP

@pytest.mark.slow
def test_sighup_reload_invalid_then_valid(tmp_path, keys, password_file, ftp, daemons):
    cfg_path = make_config(tmp_path, keys, password_file, ftp.port)
    d = daemons(cfg_path, tmp_path / "daemon.log")
    d.wait_log(r"started worker hive_audio")
    d.wait_log(r"sealed \S+", timeout=30)
    good = tomllib.loads(cfg_path.read_text())

    # Invalid: the old config keeps running, the log names file and key.
    bad = json.loads(json.dumps(good))
    bad["sensors"]["hive_climate"]["interval_s"] = -1
    cfg_path.write_text(tomli_w.dumps(bad))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"SIGHUP: new config rejected, keeping the running one: %s: sensors\.hive_climate\.interval_s: "
               r"must be >= " % re.escape(str(cfg_path)))
    time.sleep(0.5)  # nothing may restart: give it the chance to go wrong, then check
    assert len(re.findall(r"started worker", d.log())) == 2 + len(good["sensors"]) + len(good.get("processors", {}))

    # Valid: the climate sensor changed, the audio sensor is removed, a second climate sensor added,
    # [upload] changed; [bundle] and the aggregator are untouched; spool_dir needs a full restart.
    new = json.loads(json.dumps(good))
    new["sensors"]["hive_climate"]["interval_s"] = 0.3
    new["sensors"]["hive_climate2"] = json.loads(json.dumps(good["sensors"]["hive_climate"]))
    del new["sensors"]["hive_audio"]
    removed = ["hive_audio"]
    for name, proc in list(new.get("processors", {}).items()):  # processors of the audio go with it
        if proc["sensor"] == "hive_audio":
            del new["processors"][name]
            removed.append(name)
    new["upload"]["backoff_max_s"] = 2
    new["daemon"]["spool_dir"] = str(tmp_path / "elsewhere")
    cfg_path.write_text(tomli_w.dumps(new))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"SIGHUP: config \S+ reloaded: restarting uploader, hive_climate; removed %s" % ", ".join(sorted(removed)))
    d.wait_log(r"worker hive_audio stopped \(status 0\): removed from the config")
    d.wait_log(r"started worker hive_climate2")
    d.wait_log(r"started worker hive_climate \(", count=2)
    d.wait_log(r"started worker uploader", count=2)
    log = d.log()
    assert "daemon.spool_dir changed to" in log and "needs a restart of the service" in log
    assert len(re.findall(r"started worker aggregator", log)) == 1
    assert len(re.findall(r"started worker hive_audio", log)) == 1
    # The removed sensor flushed its open segment: no temporary file left in its staging.
    staging = Path(good["daemon"]["spool_dir"]) / "staging" / "hive_audio"
    assert not [p for p in staging.iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "elsewhere").exists()
    d.wait_log(r"(?s)started worker hive_climate2.*sealed \S+", timeout=30)
    assert d.terminate() == 0, d.log()
    # Every staged record was sealed at SIGTERM, the removed sensor's last segment included.
    spool = Path(good["daemon"]["spool_dir"]) / "staging"
    assert not [p for p in spool.rglob("*") if p.is_file()], list(spool.rglob("*"))


# ------------------------------------------------------------------------------------------ credentials

def test_upload_password_from_the_units_credential(tmp_path, keys, password_file, ftp, monkeypatch, caplog):
    """LoadCredential=upload-password: the uploader logs in with $CREDENTIALS_DIRECTORY/upload-password;
    without the credential (started outside systemd) it retries and says which file, never the secret."""
    from test_upload import Running, bundles_left, load, make_bundles, on_server, outbox_of

    creds = tmp_path / "credentials"
    creds.mkdir()
    cfg = load(tmp_path, keys, None, ftp.port, **{"upload.password_credential": "upload-password"})
    made = make_bundles(outbox_of(cfg), 2, 10_000)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    caplog.set_level("INFO")
    with Running(cfg) as r:  # no credential file yet: a failure naming it, bundles kept
        wait_for(lambda: r.uploader.counts["failures"] >= 1, 20, "a failed login")
        assert len(bundles_left(cfg)) == 2
    assert str(creds / "upload-password") in caplog.text
    (creds / "upload-password").write_text(password_file.read_text())  # as systemd writes it, 0400
    (creds / "upload-password").chmod(0o400)
    with Running(cfg):
        wait_for(lambda: not bundles_left(cfg), 20, "the outbox to empty")
    assert on_server(ftp.root) == made
    assert password_file.read_text().strip() not in caplog.text
