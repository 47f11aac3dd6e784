"""The real daemon as a subprocess, against a real FTP server, decrypted with the stock age CLI."""

from __future__ import annotations

import io
import os
import re
import signal
from datetime import datetime, timezone

import pytest
import soundfile

from beemond.core.clock import parse_iso

from beemond.spool import Spool
from conftest import (AGE, FtpServer, climate_rows, decrypt_with_age, free_port, make_config, urban_rows,
                      wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")]


def _server_data(ftp, identity, manifests=None):
    """Every bundle on the server, decrypted and hash-checked: (bundle count, members by name)."""
    members: dict[str, bytes] = {}
    bundles = ftp.bundles()
    for b in bundles:
        got = decrypt_with_age(b, identity)
        if manifests is not None:
            manifests.append(got["manifest"])
        for name, data in got["members"].items():
            assert name not in members, f"record {name} arrived twice"
            members[name] = data
    return len(bundles), members


def _spool_files(tmp_path):
    """Records and bundles left in the spool (not the locks, and not state/: the sensors' journals
    and state stay across restarts by design)."""
    sp = Spool(tmp_path / "spool")
    state = sp.state_dir("x").parent
    return sorted(p.relative_to(sp.root) for p in sp.root.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock") and state not in p.parents)


def test_end_to_end_every_replayed_row_exactly_once(tmp_path, keys, password_file, ftp, daemons):
    cfg = make_config(tmp_path, keys, password_file, ftp.port)
    d = daemons(cfg, tmp_path / "daemon.log", duration=12)
    assert d.wait() == 0, d.log()

    count, members = _server_data(ftp, keys["identity"])
    assert count >= 3, "a 12 s run with 3 s bundles should upload several bundles"
    assert password_file.read_text().strip() not in d.log(), "the FTP password must never be logged"
    assert d.log().count("uploader INFO connected to ftp://") == 1, "one FTP connection reused for every bundle"
    assert not ftp.parts(), "no .part file may remain on the server"
    assert _spool_files(tmp_path) == [], "a clean stop leaves nothing staged and nothing in the outbox"

    readings = sorted(climate_rows(members))
    assert len(readings) >= 40  # 12 s at 0.2 s, less start-up
    expected = urban_rows()[: len(readings)]
    # Value for value, in order, each replayed row once: the sequential replay serves row i to reading i.
    assert [(t, h) for _, t, h in readings] == expected
    assert len({ts for ts, _, _ in readings}) == len(readings)

    audio = {n: data for n, data in members.items() if n.startswith("hive_audio/")}
    assert len(audio) >= 8
    for name, data in audio.items():
        samples, rate = soundfile.read(io.BytesIO(data))
        assert rate == 8000 and name.endswith(".flac")
        assert 0 < len(samples) <= 8000
    full = [n for n, data in audio.items() if len(soundfile.read(io.BytesIO(data))[0]) == 8000]
    assert len(full) >= len(audio) - 1, "only the segment cut by the shutdown may be short"


def test_sigterm_then_restart_loses_nothing(tmp_path, keys, password_file, daemons):
    # Run 1 has no server: sealed bundles pile up in the outbox. SIGTERM mid-run seals what is staged.
    port = free_port()
    cfg = make_config(tmp_path, keys, password_file, port)
    d1 = daemons(cfg, tmp_path / "run1.log")
    d1.wait_log(r"aggregator INFO sealed ", count=2)
    d1.wait_log(r"upload of .* failed")
    assert d1.terminate() == 0, d1.log()
    outbox = sorted(p.name for p in (tmp_path / "spool" / "outbox").iterdir())
    assert len(outbox) >= 3
    staged = [p for p in (tmp_path / "spool" / "staging").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert staged == [], "SIGTERM must seal every staged record"

    # Run 2 on the same spool with the server up: the backlog goes out, and new data too.
    ftp = FtpServer(tmp_path / "ftp-root", password_file, port).start()
    try:
        d2 = daemons(cfg, tmp_path / "run2.log", duration=6)
        assert d2.wait() == 0, d2.log()
        assert "backlog: " in d2.log()
        on_server = {p.name for p in ftp.bundles()}
        assert set(outbox) <= on_server, "every bundle of run 1 reached the server"
        assert len(on_server) > len(outbox), "run 2 added its own bundles"
        _, members = _server_data(ftp, keys["identity"])
    finally:
        ftp.stop()
    readings = climate_rows(members)
    # Run 2's replay continues after run 1's last recorded row: one run of rows, none twice.
    rows = urban_rows()
    values = [(t, h) for _, t, h in sorted(readings)]
    assert values == rows[:len(values)]
    assert len(values) > 20
    assert _spool_files(tmp_path) == []


def test_killed_sensor_worker_is_restarted_while_others_record(tmp_path, keys, password_file, ftp, daemons):
    cfg = make_config(tmp_path, keys, password_file, ftp.port)
    d = daemons(cfg, tmp_path / "daemon.log")
    first = d.wait_log(r"started worker hive_climate \(sensor, pid (\d+)\)")[0]
    pid = int(first.group(1))
    d.wait_log(r"started worker hive_audio")
    wait_for(lambda: list((tmp_path / "spool").rglob("hive_audio_*.flac")) or ftp.bundles(), 20, "audio records")
    killed_at = datetime.now(timezone.utc)
    os.kill(pid, signal.SIGKILL)
    d.wait_log(r"worker hive_climate exited with signal SIGKILL; restarting in \d")
    second = d.wait_log(r"started worker hive_climate \(sensor, pid (\d+)\)", count=2)[1]
    assert int(second.group(1)) != pid
    d.wait_log(r"aggregator INFO sealed ", count=3)
    assert d.terminate() == 0, d.log()
    # The audio worker was never restarted...
    assert len(re.findall(r"started worker hive_audio", d.log())) == 1
    manifests: list = []
    _server_data(ftp, keys["identity"], manifests)
    records = [r for m in manifests for r in m["records"]]
    audio = sorted((r["start"], r["end"]) for r in records if r["sensor"] == "hive_audio")
    climate = sorted((r["start"], r["end"]) for r in records if r["sensor"] == "hive_climate")
    assert len(audio) >= 4 and len(climate) >= 2
    # ...and kept recording across the kill: its 1 s segments follow each other without a gap.
    for (_, end), (start, _) in zip(audio, audio[1:]):
        gap = (parse_iso(start) - parse_iso(end)).total_seconds()
        assert abs(gap) < 0.5, f"audio gap of {gap:.2f} s between segments"
    # The climate worker recorded again after its restart.
    assert any(parse_iso(s) > killed_at for s, _ in climate)


def test_server_absent_at_start_then_everything_uploads(tmp_path, keys, password_file, daemons):
    port = free_port()
    cfg = make_config(tmp_path, keys, password_file, port)
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"upload of .* failed .*retry 2 in")  # it retried, with backoff, and kept recording
    d.wait_log(r"aggregator INFO sealed ", count=2)
    ftp = FtpServer(tmp_path / "ftp-root", password_file, port).start()
    try:
        d.wait_log(r"upload link restored after \d+ failure")
        outbox = tmp_path / "spool" / "outbox"
        wait_for(lambda: ftp.bundles() and not any(outbox.iterdir()), 30, "the outbox to empty")
        assert d.terminate() == 0, d.log()
        count, members = _server_data(ftp, keys["identity"])
    finally:
        ftp.stop()
    assert count >= 3
    readings = sorted(climate_rows(members))
    assert [(t, h) for _, t, h in readings] == urban_rows()[: len(readings)]
    assert _spool_files(tmp_path) == []


def test_orchestrator_killed_workers_finish_and_next_start_recovers(tmp_path, keys, password_file, ftp, daemons):
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{"upload.shutdown_grace_s": 2})
    d1 = daemons(cfg, tmp_path / "run1.log")
    pids = [int(m.group(1)) for m in d1.wait_log(r"started worker \S+ \(\w+, pid (\d+)\)", count=4)]
    d1.wait_log(r"aggregator INFO sealed ")
    os.kill(d1.proc.pid, signal.SIGKILL)  # the orchestrator alone; its workers are not in its session's kill
    d1.proc.wait(10)
    # The workers notice (their heartbeat write fails), close their records and exit by themselves.
    d1.wait_log(r"hive_climate INFO shutting down \(orchestrator gone\)", timeout=15)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids), 30, "the old workers to exit")

    # A second daemon on a spool in use refuses to start; the next one after the crash recovers it all.
    d2 = daemons(cfg, tmp_path / "run2.log", duration=5)
    assert d2.wait() == 0, d2.log()
    assert _spool_files(tmp_path) == []
    _, members = _server_data(ftp, keys["identity"])
    readings = climate_rows(members)
    assert len(readings) >= 10


def test_second_daemon_on_same_spool_refuses(tmp_path, keys, password_file, ftp, daemons):
    cfg = make_config(tmp_path, keys, password_file, ftp.port)
    d1 = daemons(cfg, tmp_path / "run1.log")
    d1.wait_log(r"started worker hive_audio")
    d2 = daemons(cfg, tmp_path / "run2.log")
    assert d2.wait(30) == 1
    assert "another beemond is running on spool" in d2.log()
    assert d1.proc.poll() is None
    assert d1.terminate() == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
