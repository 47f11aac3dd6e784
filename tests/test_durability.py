"""Power cuts and kills: the reading journal, salvaged audio segments, replay resume and fidelity.

A worker is killed for real (SIGKILL of a child process running the worker's own ``run()``), and the
next start, in process, must fold what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import soundfile
import tomli_w

from beemond import config, ipc, reading_journal as rj
from beemond.core import clock
from beemond.spool import Spool, sidecar_of
from beemond.sensors.replay import CsvReplay, load_rows
from conftest import mount_loop_ext4, wait_for
from polled_peers import URBAN, CountingQueue, Harness, expand, write_config

HERE = Path(__file__).resolve().parent

# The worker's own run() in a child process we can SIGKILL (its events are drained so it never blocks).
CHILD = """
import multiprocessing, queue, sys, threading
from beemond import config, ipc
from beemond.sensors import make_sensor_worker
cfg = config.load(sys.argv[1])
sensor = cfg.sensors[0]
r, w = multiprocessing.Pipe(duplex=False)
def drain():
    while True:
        r.recv()
threading.Thread(target=drain, daemon=True).start()
channel = ipc.Channel(sensor.name, commands=queue.Queue(), events=w, heartbeat_interval_s=1)
make_sensor_worker(cfg, sensor, channel).run()
"""


def run_child(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_path)], cwd=HERE.parent)


def kill(proc: subprocess.Popen) -> float:
    """SIGKILL *proc*; return the UTC time of the kill (s)."""
    t = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return t


def climate(**over) -> dict:
    sensor = {"type": "sht3x", "backend": "simulated", "interval_s": 0.05, "record_window_s": 600,
              "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": "3629"}}
    sensor.update(over)
    return sensor


def journal_of(staging: Path) -> Path:
    """The journal of the sensor whose staging directory is *staging* (spool/staging/<sensor>)."""
    return Spool(staging.parent.parent).journal_path(staging.name)


def journal_entries(staging: Path) -> list[dict]:
    return rj.ReadingJournal(journal_of(staging)).recover().entries


def test_a_killed_workers_readings_are_folded_and_the_replay_resumes(tmp_path):
    h = Harness(tmp_path, "hive_climate", climate())
    rows = load_rows(URBAN, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", "3629")
    child = run_child(tmp_path / "beemond.toml")
    try:
        wait_for(lambda: len(journal_entries(h.staging)) >= 8, 30, "eight journaled readings")
    finally:
        kill(child)
    journaled = journal_entries(h.staging)
    assert not h.records(), "the window never closed: nothing but the journal is durable"
    saved = journal_of(h.staging).read_bytes()

    h.run(captures=3)
    folded, fresh = sorted((r for r in h.records()), key=lambda r: r[2]["start"])
    path, table, meta = folded
    assert meta["recovered_from_journal"] is True and meta["rows"] == len(journaled)
    assert [r[0] for r in table[1:]] == [e["t"] for e in journaled], "every journaled reading, in order"
    folded_rows = expand(meta["replay"]["rows"])
    assert folded_rows == list(range(len(journaled)))
    for (_, t, rh), i in zip(table[1:], folded_rows):
        assert (t, rh) == (f"{rows[i].temperature_c:.2f}", f"{rows[i].humidity_rh:.2f}"), "value for value"
    _, table2, meta2 = fresh
    assert expand(meta2["replay"]["rows"])[0] == len(journaled), "the replay continues with the next row"
    assert meta2["after_restart"] is True
    gap = (clock.parse_iso(meta2["start"]) - clock.parse_iso(journaled[-1]["t"])).total_seconds()
    assert meta2["gap_s"] == pytest.approx(gap, abs=0.002) and gap > 0
    assert "after_restart" not in meta

    # A crash after the fold wrote its record, before it reset the journal: folding again writes
    # nothing twice (the record is there under its idempotent name).
    journal_of(h.staging).write_bytes(saved)
    before = [r[0].name for r in h.records()]
    h2 = Harness(tmp_path, "hive_climate")
    h2.run(captures=0)
    assert [r[0].name for r in h2.records()] == before
    assert journal_entries(h.staging) == []


def test_a_torn_journal_line_and_all_after_it_are_skipped(tmp_path):
    h = Harness(tmp_path, "hive_climate", climate(interval_s=1))
    h.run(captures=2)   # a record and a journal header now
    j = rj.ReadingJournal(journal_of(h.staging))
    stamp = datetime(2026, 1, 1, tzinfo=timezone.utc)
    j.append(rj.entry(stamp, (20.5, 40.25), 7, False, 0, 0, None))
    j.close()
    with open(j.path, "ab") as f:   # a power cut: a lost stretch of zeros, and a later line that reached the disk
        f.write(b'{"t":"2026-01-01T00:00:01.000Z","v":[2' + b"\x00" * 300 + b"\n")
        f.write(json.dumps(rj.entry(stamp.replace(second=2), (21.0, 41.0), 9, False, 0, 0, None)).encode() + b"\n")
    h2 = Harness(tmp_path, "hive_climate")
    h2.run(captures=0)
    recovered = [r for r in h2.records() if r[2].get("recovered_from_journal")]
    assert len(recovered) == 1
    assert recovered[0][1][1:] == [["2026-01-01T00:00:00.000Z", "20.50", "40.25"]]


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_an_audio_segment_cut_by_a_kill_is_salvaged(tmp_path, fmt):
    sensor = {"type": "audio", "backend": "simulated", "sample_rate_hz": 8000, "segment_s": 60, "format": fmt,
              "subtype": "PCM_24", "tone_hz": 440, "block_s": 0.05}
    cfg_path = write_config(tmp_path, "hive_audio", sensor)
    cfg = config.load(cfg_path)
    sp = Spool(cfg.spool)
    staging = sp.staging_dir("hive_audio")
    child = run_child(cfg_path)
    try:
        wait_for(lambda: sp.open_segments("hive_audio") and sp.open_segments("hive_audio")[0].stat().st_size > 60_000,
                 30, "two seconds of audio in the open segment")
    finally:
        killed_at = kill(child)
    (segment,) = sp.open_segments("hive_audio")
    with open(segment, "ab") as f:   # the tail a power cut leaves: zeros (WAV) or a torn frame (FLAC)
        f.write(b"\x00" * 3000 if fmt == "wav" else b"\xff\xf8\x69\x08" + os.urandom(500))

    h = Harness(tmp_path, "hive_audio")   # the audio worker of the same config, salvaging at its start
    h.worker.salvage()
    records = sorted(staging.glob(f"*.{fmt}"))
    assert len(records) == 1 and not sp.open_segments("hive_audio")
    assert not sp.open_segment_headers("hive_audio"), "the open segment's header is gone too"
    meta = json.loads(sidecar_of(records[0]).read_text())
    assert meta["truncated"] is True and meta["frames"] > 8000
    data, rate = soundfile.read(records[0], dtype="float64")
    assert rate == 8000 and len(data) == meta["frames"]
    duration = (clock.parse_iso(meta["end"]) - clock.parse_iso(meta["start"])).total_seconds()
    assert duration == pytest.approx(meta["frames"] / 8000, abs=0.002)
    assert killed_at - clock.parse_iso(meta["end"]).timestamp() < 2.0, "at most 2 s lost to the cut"
    spectrum = np.abs(np.fft.rfft(data[-4000:] * np.hanning(4000)))
    assert abs(np.argmax(spectrum) * 2 - 440) <= 2, "the tail is the tone, not the torn bytes"
    event = h.events_r.recv()
    assert event.kind == ipc.READY_EVENT and event.path == str(records[0])
    assert h.worker.restart_gap == {"last": meta["end"]}


def test_replay_keeps_file_order_every_row_of_a_time_and_counts_bad_cells(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("Date,Tag number,temperature,humidity\n"
                 "2021-06-19 00:10:00,1,20.0,50\n"
                 "2021-06-19 00:00:00,1,25.0,40\n"
                 "2021-06-19 00:00:00,1,21.0,41\n"     # same time, lower value: stays after 25.0
                 "2021-06-19 00:00:00,1,21.0,41\n"     # an exact duplicate line: dropped
                 "2021-06-19 00:05:00,1,,42\n"         # empty temperature: skipped and counted
                 "2021-06-19 00:06:00,1,22.0,oops\n"   # no humidity: only a humidity reader skips it
                 "not a time,1,22.0,43\n")
    skipped: dict = {}
    rows = load_rows(f, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", "1", skipped=skipped)
    assert [(r.temperature_c, r.humidity_rh) for r in rows] == [(25.0, 40.0), (21.0, 41.0), (20.0, 50.0)]
    assert skipped == {"temperature": 1, "humidity": 1, "Date": 1}
    temps = load_rows(f, "Date", {"temperature_c": "temperature"}, "Tag number", "1", tz=__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert [r.temperature_c for r in temps] == [25.0, 21.0, 22.0, 20.0]
    assert temps[0].time == datetime(2021, 6, 18, 22, 0, tzinfo=timezone.utc), "naive times in the set zone"
    replay = CsvReplay(rows)
    replay.next_row(), replay.next_row()
    again = CsvReplay(rows)
    again.resume(replay.position())
    assert again.next_row().temperature_c == 20.0


def test_a_ds18b20_replay_needs_no_humidity_column(tmp_path):
    f = tmp_path / "probe.csv"
    f.write_text("time,celsius\n2021-06-19T00:00:00Z,30.5\n2021-06-19T00:01:00Z,\n2021-06-19T00:02:00Z,31\n")
    h = Harness(tmp_path, "frames", {
        "type": "ds18b20", "backend": "simulated", "interval_s": 1, "record_window_s": 60,
        "probes": {"brood": "28-0316a2794eff"},
        "replay": {"file": str(f), "time_column": "time", "temperature_column": "celsius"}})
    h.run(captures=2)
    _, table, _ = h.record()
    assert [row[1] for row in table[1:3]] == ["30.500", "31.000"], "the empty cell is skipped, not the file"


def test_gpio_input_events_are_journaled_and_folded(tmp_path):
    sensor = {"type": "gpio", "backend": "simulated", "record_window_s": 600,
              "inputs": {"entrance": {"pin": 17, "kind": "button"}}}
    h = Harness(tmp_path, "hive_gpio", sensor)
    from beemond.sensors.gpio.driver import InputActivated

    h.commands.put(InputActivated("entrance", 1_700_000_000.25))
    h.run(captures=0)   # the shutdown writes the record and leaves a journal header
    assert len(h.records()) == 1
    # A crash with one event journaled but never recorded:
    j = rj.ReadingJournal(journal_of(h.staging))
    row = ["2023-11-14T22:13:21.000Z", "entrance", "button", "17", "sent"]
    j.append({"t": row[0], "v": row})
    j.close()
    h2 = Harness(tmp_path, "hive_gpio")
    h2.run(captures=0)
    (folded,) = [r for r in h2.records() if r[2].get("recovered_from_journal")]
    assert folded[1][1:] == [row]
    assert journal_entries(h.staging) == []


def test_a_replay_timezone_must_be_an_iana_zone(tmp_path):
    with pytest.raises(config.ConfigError, match=r"replay\.timezone"):
        write_config(tmp_path, "c", climate(replay={"file": str(URBAN), "timezone": "Mars/Olympus"}))
        config.load(tmp_path / "beemond.toml")


def test_a_journal_reset_that_failed_does_not_record_its_readings_twice(tmp_path):
    # A record is written but the journal reset after it fails (a full disk: the header's new file
    # finds no block); readings go on being journaled; then a power cut. The next start must not
    # record the first record's readings again under a new name.
    h = Harness(tmp_path, "hive_climate", climate(interval_s=1))
    w = h.worker
    w.measure_once()
    w.measure_once()
    journal = journal_of(h.staging)
    blocker = journal.with_name(f".{journal.name}.tmp-{os.getpid()}")
    blocker.mkdir()   # the reset's temporary file cannot be created: a real OSError from open()
    w.flush()
    blocker.rmdir()
    assert len(h.records()) == 1 and b'"v":' in journal.read_bytes(), "the reset failed"
    w.measure_once()
    w.measure_once()
    w.journal.close()   # the power cut: no flush
    h2 = Harness(tmp_path, "hive_climate")
    h2.run(captures=0)
    times = [row[0] for _, table, _ in h2.records() for row in table[1:]]
    assert len(times) == 4 and len(set(times)) == 4, times


def test_a_fold_whose_name_another_record_holds_still_records_once(tmp_path):
    # Names have whole seconds: readings journaled in the second of the last record's span fold to
    # that record's name. They are not "already recorded" (lost), and folding twice (a cut before the
    # journal reset) does not record them twice under the unique_name suffix.
    h = Harness(tmp_path, "hive_climate", climate(interval_s=1))
    w = h.worker
    walls = iter(datetime(2026, 1, 1, 0, 0, 0, ms * 1000, tzinfo=timezone.utc).timestamp() for ms in (100, 200, 300, 400))
    # The Clock's time sources (its test seam): four readings inside one second (a sub-second interval).
    w.clock.wall, w.clock.monotonic = lambda: next(walls), lambda: 0.0
    w.measure_once()
    w.measure_once()
    w.flush()
    w.measure_once()
    w.measure_once()
    w.journal.close()   # the power cut: no flush
    saved = journal_of(h.staging).read_bytes()
    Harness(tmp_path, "hive_climate").run(captures=0)
    journal_of(h.staging).write_bytes(saved)   # a cut after the fold's record, before its reset
    h2 = Harness(tmp_path, "hive_climate")
    h2.run(captures=0)
    times = sorted(row[0] for _, table, _ in h2.records() for row in table[1:])
    assert times == [f"2026-01-01T00:00:00.{ms}Z" for ms in (100, 200, 300, 400)], times


@pytest.fixture
def failing_disk(tmp_path):
    """An ext4 image on a loop device, mounted ``errors=remount-ro``; yields (mount point, fail):
    ``fail()`` makes the kernel record a file-system error (sysfs ``trigger_fs_error``), as a dying
    SD card does, and from then on every write and fdatasync fails with EROFS."""
    _img, mnt = mount_loop_ext4(tmp_path, 16, "loop,errors=remount-ro")
    dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True,
                         check=True).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(dev).name / "trigger_fs_error"
    if not trigger.exists():
        subprocess.run(["umount", str(mnt)], check=True)
        pytest.skip("this kernel has no ext4 trigger_fs_error")
    try:
        yield mnt, lambda: trigger.write_text("1")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_journal_that_cannot_be_synced_is_retried_at_its_cadence_not_in_a_busy_loop(failing_disk, caplog):
    """The SD card goes read-only with a reading journaled but not yet synced: the worker retries the
    sync every journal_sync_s (one warning each), instead of waking without pause and logging each time."""
    mnt, fail = failing_disk
    path = write_config(mnt, "hive_climate", {
        "type": "sht3x", "backend": "simulated", "interval_s": 3600.0, "record_window_s": 3600.0,
        "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": "3629"}})
    tree = tomllib.loads(path.read_text())
    tree["daemon"]["journal_sync_s"] = 2.0
    path.write_text(tomli_w.dumps(tree))
    h = Harness(mnt, "hive_climate")
    h.commands = h.channel.commands = CountingQueue()
    t = threading.Thread(target=h.worker.run, daemon=True)
    t.start()
    wait_for(lambda: h.worker.journal.fd is not None, 10, "the first reading")   # synced at once
    h.commands.put(ipc.CaptureNow())       # journaled; its sync is due journal_sync_s after
    wait_for(lambda: h.worker.journal.due() is not None, 10, "a reading waiting for its sync")
    fail()
    wait_for(lambda: any("cannot sync the reading journal" in r.getMessage() for r in caplog.records), 10,
             "the failed sync")
    before, logged = h.commands.waits, len(caplog.records)
    time.sleep(1.0)
    waits, warnings = h.commands.waits - before, len(caplog.records) - logged
    h.commands.put(ipc.Shutdown())
    t.join(20)
    assert not t.is_alive(), "worker did not shut down"
    # heartbeat_interval_s 0.2 s and a retry per 2 s: about 5 waits and at most 1 warning in that second
    assert waits < 50, f"{waits} waits in 1 s"
    assert warnings < 10, f"{warnings} log lines in 1 s"
