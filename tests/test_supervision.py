"""Supervision and operations of the real daemon: hung workers, crash loops, journald logging, decrypt."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import AGE, decrypt_with_age, make_config, wait_for

pytestmark = pytest.mark.slow


def test_hung_worker_is_killed_and_restarted(tmp_path, keys, password_file, ftp, daemons):
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{"daemon.heartbeat_timeout_s": 3})
    d = daemons(cfg, tmp_path / "daemon.log")
    pid = int(d.wait_log(r"started worker hive_climate \(sensor, pid (\d+)\)")[0].group(1))
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    d.wait_log(r"worker hive_climate silent for \d+ s \(pid %d\): killing it" % pid, timeout=15)
    d.wait_log(r"worker hive_climate exited with signal SIGKILL; restarting")
    new = d.wait_log(r"started worker hive_climate \(sensor, pid (\d+)\)", count=2)[1]
    assert int(new.group(1)) != pid
    assert d.terminate() == 0, d.log()


def test_crash_loop_gives_up_on_one_sensor_and_keeps_the_others(tmp_path, keys, password_file, ftp, daemons):
    # A hardware SHT3x on a bus that does not exist: the worker fails at every start.
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{
        "daemon.crash_loop_limit": 3, "daemon.restart_backoff_initial_s": 0.1, "daemon.restart_backoff_max_s": 0.4,
        "sensors.hive_climate.backend": "hardware", "sensors.hive_climate.bus": 250,
        "sensors.hive_climate.replay": None})
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"worker hive_climate exited with status 1; 3 restarts within 600 s: giving up on it \(crash loop\)", timeout=30)
    log = d.log()
    assert len(re.findall(r"started worker hive_climate", log)) == 4  # the first start and 3 restarts
    assert re.search(r"restarting in 0\.1 s.*\n(.*\n)*.*restarting in 0\.2 s", log), "backoff doubles"
    d.wait_log(r"uploaded \S+", timeout=20)  # the audio sensor, aggregator and uploader carry on
    assert d.proc.poll() is None
    assert d.terminate() == 0, d.log()


def test_failed_scale_is_tried_again_and_records_once_plugged_back(tmp_path, keys, password_file, ftp, daemons):
    """A USB scale unplugged before the daemon starts: crash loop, failed, then one retry every
    failed_retry_s; once plugged back (a new pty behind the udev-style link) it records again."""
    import json
    import tomllib
    import urllib.request

    from beemond.sensors.scale.emulator import ScaleEmulator

    link = tmp_path / "beemond-scale"
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{
        "daemon.crash_loop_limit": 2, "daemon.restart_backoff_initial_s": 0.1, "daemon.restart_backoff_max_s": 0.2,
        "daemon.failed_retry_s": 3,
        "sensors.hive_scale.backend": "hardware", "sensors.hive_scale.simulation": None,
        "sensors.hive_scale.port": str(link), "sensors.hive_scale.interval_s": 0.2,
        "sensors.hive_scale.record_window_s": 1, "sensors.hive_scale.max_retries": 0,
        "sensors.hive_scale.read_timeout_s": 0.5, "sensors.hive_scale.samples": 1,
        "sensors.hive_scale.temperature_sensor": None, "sensors.hive_scale.compensation_kg_per_c": None})
    port = tomllib.loads(cfg.read_text())["metrics"]["port"]
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"worker hive_scale exited with status 1; 2 restarts within 600 s: giving up on it \(crash loop\); "
               r"next try in 3 s", timeout=60)
    # still unplugged: one try per cadence, each straight back to failed (no new crash loop)
    d.wait_log(r"trying failed worker hive_scale again", timeout=30)
    d.wait_log(r"worker hive_scale exited with status 1 again on its retry; next try in 3 s", timeout=30)

    def failed_status():
        st = json.loads(subprocess.run([sys.executable, "-m", "beemond", "status", "--json", "--config", str(cfg)],
                                       capture_output=True, text=True, timeout=30).stdout)
        w = next(w for w in st["workers"] if w["name"] == "hive_scale")
        return w if w["state"] == "failed" else None

    w = wait_for(failed_status, 30, "hive_scale failed in beemond status")
    assert 0 <= w["restart_in_s"] <= 3
    human = subprocess.run([sys.executable, "-m", "beemond", "status", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=30).stdout
    assert re.search(r"^  hive_scale\s+sensor\s+(failed \(next try in \d s\)|running|backoff)", human, re.M), human

    def next_retry():   # exported while it waits (it is retried every 3 s, so poll)
        scraped = time.time()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        line = re.search(r'^beemond_worker_next_retry_timestamp_seconds\{[^}]*worker="hive_scale"[^}]*\} (\S+)$',
                         metrics, re.M)
        return line and (scraped, float(line.group(1)))

    scraped, at = wait_for(next_retry, 30, "the next retry in /metrics")
    assert scraped - 1 <= at <= scraped + 4   # the next try, as a Unix time

    scale = ScaleEmulator(lambda: (42.5, None), link=link, request=b"W\r\n", period_s=0.02).start()  # plugged back
    try:
        def weighed():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return re.search(r'^beemond_weight_grams\{[^}]*sensor="hive_scale"[^}]*\} 42500\.0$', text, re.M)

        wait_for(weighed, 30, "a weight from the scale plugged back in")   # the next retry's reading
        assert d.proc.poll() is None
    finally:
        code = d.terminate()
        scale.stop()
    assert code == 0, d.log()
    if AGE is not None:  # and the readings went into records that reached the server
        rows = [line for b in ftp.bundles()
                for name, data in decrypt_with_age(b, keys["identity"])["members"].items()
                if name.startswith("hive_scale/") for line in data.decode().splitlines()[1:]]
        assert rows and all(r.split(",")[1] == "42.500" for r in rows), rows


def test_journald_format_when_stderr_is_the_journal_stream(tmp_path, keys, password_file, ftp):
    cfg = make_config(tmp_path, keys, password_file, ftp.port)
    log_path = tmp_path / "journal.txt"
    with open(log_path, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        status = subprocess.call([sys.executable, "-m", "beemond", "run", "--config", str(cfg), "--duration", "2"],
                                 stdout=f, stderr=f, env=env, timeout=60)
    assert status == 0
    lines = [line for line in log_path.read_text().splitlines() if line]
    assert lines and all(re.match(r"<[2-7]>[\w-]+: ", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>orchestrator: beemond starting") for line in lines)
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line.split(": ", 1)[0]) for line in lines)


@pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")
def test_decrypt_command_checks_hashes(tmp_path, keys, password_file, ftp):
    cfg = make_config(tmp_path, keys, password_file, ftp.port)
    assert subprocess.call([sys.executable, "-m", "beemond", "run", "--config", str(cfg), "--duration", "4"],
                           stderr=subprocess.DEVNULL, timeout=60) == 0
    bundle = wait_for(ftp.bundles, 5, "a bundle on the server")[0]

    def decrypt(path, out):
        return subprocess.run([sys.executable, "-m", "beemond", "decrypt", str(path), "--identity",
                               str(keys["identity"]), "--out", str(out)], capture_output=True, text=True)

    ok = decrypt(bundle, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert "all hashes match" in ok.stdout
    # (config/simulated.toml may gain sensors: the test needs these, not only these)
    assert {"hive_audio", "hive_climate", "manifest.json"} <= {p.name for p in (tmp_path / "ok").iterdir()}

    # A record altered before sealing: re-encrypt a tampered tar with the stock age CLI.
    plain = subprocess.run([AGE, "-d", "-i", str(keys["identity"]), str(bundle)], check=True,
                           capture_output=True).stdout
    i = plain.index(b"time,temperature_c,humidity_rh\n") + 40
    tampered = plain[:i] + bytes([plain[i] ^ 0x01]) + plain[i + 1:]
    bad = tmp_path / "bad.tar.age"
    subprocess.run([AGE, "-r", keys["public"], "-o", str(bad)], input=tampered, check=True)
    res = decrypt(bad, tmp_path / "bad")
    assert res.returncode == 65
    assert "does not match the manifest" in res.stderr
    assert [p.name for p in (tmp_path / "bad").iterdir()] == [], "nothing unverified is left behind"

    # Truncated ciphertext: age's STREAM construction detects the missing final chunk.
    cut = tmp_path / "cut.tar.age"
    cut.write_bytes(bundle.read_bytes()[:-100])
    res = decrypt(cut, tmp_path / "cut")
    assert res.returncode == 65 and "cannot decrypt" in res.stderr


def test_unwritable_spool_exits_78_naming_the_key(tmp_path, keys, password_file):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool should be")
    cfg = make_config(tmp_path, keys, password_file, 21, **{"daemon.spool_dir": str(blocker / "spool")})
    res = subprocess.run([sys.executable, "-m", "beemond", "run", "--config", str(cfg), "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 78
    assert "daemon.spool_dir: cannot create or write" in res.stderr
