"""What systemd sees of the daemon: a stop that leaves nothing behind to SIGKILL, `beemond reload`
waiting for the daemon's verdict, `beemond status` for the group and for outsiders, and an
orchestrator that keeps worker-only libraries out of its own memory. The real daemon runs as a
subprocess each time."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest
import tomli_w

from conftest import ROOT, make_config, wait_for

SETPRIV = shutil.which("setpriv")
NOBODY = 65534

# A child subreaper (prctl PR_SET_CHILD_SUBREAPER) in place of systemd's cgroup: every process of the
# daemon's tree that outlives the orchestrator is re-parented here, where it can be listed.
REAPER = textwrap.dedent("""
    import ctypes, json, os, signal, subprocess, sys, time
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    proc = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], "ab"), stderr=subprocess.STDOUT)
    print(proc.pid, flush=True)
    sys.stdin.readline()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait()
    def left():
        me = os.getpid()
        out = []
        for task in os.listdir(f"/proc/{me}/task"):
            for pid in open(f"/proc/{me}/task/{task}/children").read().split():
                try:
                    out.append(open(f"/proc/{pid}/cmdline").read().replace("\\0", " ")[:120])
                except OSError:
                    pass
        return out
    at_exit = left()   # what systemd (KillMode=mixed) would SIGKILL right after the main process exits
    time.sleep(1)      # and anything started by the orchestrator's interpreter shutdown
    print(json.dumps({"status": status, "at_exit": at_exit, "later": left()}), flush=True)
""")


def small_config(tmp_path, keys, password_file, **over) -> Path:
    """Two replaying climate sensors, no upload: enough workers for a forkserver and a resource tracker."""
    path = make_config(tmp_path, keys, password_file, 21, **{"upload.protocol": "none", **over})
    cfg = tomllib.loads(path.read_text())
    cfg["sensors"] = {k: v for k, v in cfg["sensors"].items() if k in ("hive_climate", "hive_air")}
    cfg.pop("processors", None)
    path.write_text(tomli_w.dumps(cfg))
    return path


def beemond(*args, user: list[str] | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*(user or []), sys.executable, "-m", "beemond", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_sigterm_leaves_no_process_for_systemd_to_kill(tmp_path, keys, password_file):
    cfg = small_config(tmp_path, keys, password_file)
    log = tmp_path / "daemon.log"
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(log), sys.executable, "-m", "beemond", "run",
                               "--config", str(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        int(reaper.stdout.readline())
        wait_for(lambda: len(re.findall(r"started worker", log.read_text())) >= 4, 60, "four workers")
        wait_for(lambda: "hive_air INFO" in log.read_text() or "hive_climate INFO" in log.read_text(), 60,
                 "a sensor at work")
        reaper.stdin.write("term\n")
        reaper.stdin.flush()
        report = json.loads(reaper.stdout.readline())
    finally:
        reaper.kill()
        reaper.wait(10)
    assert report["status"] == 0, log.read_text()[-3000:]
    assert report["at_exit"] == [] and report["later"] == [], report
    assert "beemond stopped (status 0)" in log.read_text()


@pytest.mark.slow
def test_reload_command_waits_for_the_verdict(tmp_path, keys, password_file, daemons):
    cfg_path = small_config(tmp_path, keys, password_file)
    d = daemons(cfg_path, tmp_path / "daemon.log")
    d.wait_log(r"started worker hive_air")
    wait_for(lambda: (tmp_path / "spool" / "status.sock").exists(), 30, "the status socket")
    good = tomllib.loads(cfg_path.read_text())

    bad = json.loads(json.dumps(good))
    bad["sensors"]["hive_air"]["interval_s"] = -1
    cfg_path.write_text(tomli_w.dumps(bad))
    res = beemond("reload", "--config", str(cfg_path))
    assert res.returncode == 78, res.stdout + res.stderr
    assert res.stderr.strip().startswith(f"beemond: reload rejected, the running config is kept: {cfg_path}: "
                                         "sensors.hive_air.interval_s: must be >= "), res.stderr
    # The verdict came after the daemon had read the file: its log says so already.
    assert re.search(r"reload: new config rejected, keeping the running one: \S+: sensors\.hive_air\.interval_s",
                     d.log())

    cfg_path.write_text("[daemon\n")  # not even TOML: refused before asking the daemon
    res = beemond("reload", "--config", str(cfg_path))
    assert res.returncode == 78 and "not valid TOML" in res.stderr, res.stderr

    new = json.loads(json.dumps(good))
    new["sensors"]["hive_air"]["interval_s"] = 0.3
    cfg_path.write_text(tomli_w.dumps(new))
    res = beemond("reload", "--config", str(cfg_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"config {cfg_path} reloaded: restarting hive_air; removed none"
    d.wait_log(r"started worker hive_air \(", count=2)
    log = d.log()
    assert len(re.findall(r"started worker hive_climate \(", log)) == 1
    assert d.proc.poll() is None  # the same main process
    assert d.terminate() == 0
    gone = beemond("reload", "--config", str(cfg_path))
    assert gone.returncode == 3 and "beemond is not running" in gone.stderr


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_status_for_the_group_and_for_outsiders(tmp_path, keys, password_file, daemons):
    """The socket's directory and the config are the group's (as /run/beemond and /etc/beemond are);
    the spool, the recipients and the keys are not readable by the asking user at all."""
    # Everything the unprivileged client touches must be reachable by that user: the checkout may sit
    # in a 0700 directory (CI), so it imports a copy of the package from a readable one.
    shared = Path(tempfile.mkdtemp(prefix="beemond-status-"))
    try:
        shared.chmod(0o755)
        shutil.copytree(ROOT / "beemond", shared / "beemond", ignore=shutil.ignore_patterns("__pycache__"))
        for p in shared.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        group = os.getegid()  # the daemon's group, which owns its socket (beemond under systemd)
        run_dir = shared / "run"
        run_dir.mkdir(mode=0o750)
        os.chown(run_dir, 0, group)
        cfg_path = small_config(tmp_path, keys, password_file, **{"daemon.status_socket": str(run_dir / "status.sock")})
        etc = shared / "etc"
        etc.mkdir(mode=0o750)
        os.chown(etc, 0, group)
        cfg = etc / "beemond.toml"
        shutil.copy(cfg_path, cfg)
        cfg.chmod(0o640)
        os.chown(cfg, 0, group)
        d = daemons(cfg, tmp_path / "daemon.log")
        d.wait_log(r"started worker hive_air")
        wait_for(lambda: (run_dir / "status.sock").exists(), 30, "the status socket")
        assert (run_dir / "status.sock").stat().st_mode & 0o777 == 0o660

        def client(*groups: int) -> subprocess.CompletedProcess:
            ids = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}"]
            ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
            code = f"import sys; sys.path.insert(0, {str(shared)!r}); from beemond.cli import main; sys.exit(main())"
            return subprocess.run([*ids, sys.executable, "-I", "-c", code, "status", "--config", str(cfg)],
                                  capture_output=True, text=True, cwd=shared, timeout=60)

        member = client(group)
        assert member.returncode == 0, member.stderr
        assert re.search(r"^  hive_air\s+sensor\s+running", member.stdout, re.M), member.stdout
        outsider = client()
        assert outsider.returncode == 77, outsider.stdout + outsider.stderr
        name = pwd.getpwuid(NOBODY).pw_name
        assert outsider.stderr.strip() == f"beemond: permission denied on {cfg} (add {name} to group beemond)"
        etc.chmod(0o755)  # the config readable, the socket's directory still not
        cfg.chmod(0o644)
        outsider = client()
        assert outsider.returncode == 77, outsider.stderr
        assert outsider.stderr.strip() == f"beemond: permission denied on {run_dir / 'status.sock'} (add {name} to group beemond)"
        assert d.terminate() == 0
        assert not (run_dir / "status.sock").exists()
        gone = client(group)
        assert gone.returncode == 3 and "beemond is not running" in gone.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_status_socket_location_reads_only_two_keys(tmp_path):
    """The clients find the socket from ``spool_dir`` and ``status_socket`` alone: a config whose other
    parts would not validate (recipients unreadable, unknown keys) still gives the location."""
    from beemond import config

    toml = tmp_path / "beemond.toml"
    toml.write_text('[daemon]\nspool_dir = "spool"\n[bundle]\nrecipients = ["/root/nowhere.txt"]\n[nonsense]\nx = 1\n')
    assert config.status_socket(toml) == tmp_path / "spool" / "status.sock"
    toml.write_text('[daemon]\nstatus_socket = "/run/beemond/status.sock"\n')
    assert config.status_socket(toml) == Path("/run/beemond/status.sock")
    toml.write_text("[daemon]\n")
    assert config.status_socket(toml) == Path("/var/lib/beemond/spool/status.sock")
    ini = tmp_path / "beemond.ini"
    ini.write_text("[daemon]\nspool_dir = /srv/spool\n")
    assert config.status_socket(ini) == Path("/srv/spool/status.sock")
    toml.write_text("[daemon]\nstatus_socket = 5\n")
    with pytest.raises(config.ConfigError, match=r"daemon\.status_socket: must be a non-empty path string"):
        config.status_socket(toml)
    with pytest.raises(config.ConfigError, match="cannot read file") as e:
        config.status_socket(tmp_path / "missing.toml")
    assert isinstance(e.value.__cause__, FileNotFoundError)
