"""Record writers (JsonArchiver, default_metadata, BackgroundWriter) and the periodic primitives."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from beemond import config, records
from beemond.core import names
from beemond.sensors.periodic import JsonDataAggregator, PeriodicValuePoller, TarRecordAggregator, TimeWindow
from beemond.spool import Spool, sidecar_of, write_record
from conftest import make_config, wait_for

T0 = datetime(2021, 6, 19, 0, 4, 58, tzinfo=timezone.utc)


class Clock:
    """A hand-driven monotonic clock (the primitives take the clock as a parameter)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_member_name_is_the_default_template():
    end = T0 + timedelta(minutes=10)
    name = names.member_name("hive_climate", T0, end, ".csv")
    assert name == "hive_climate_20210619T000458Z_20210619T001458Z.csv"
    assert name == names.render_name(config.DEFAULT_TEMPLATE, sensor="hive_climate", start=names.utc_stamp(T0),
                                     end=names.utc_stamp(end), ext="csv")
    with pytest.raises(ValueError):
        names.member_name("s", T0, end, "csv")


def test_json_archiver_merges_metadata_under_its_key():
    meta = {"sensor": "gps", "start": "2021-06-19T00:04:58.000Z"}
    merged = json.loads(records.JsonArchiver().render({"lat": 45.5, "lon": -73.6}, meta))
    assert merged == {"lat": 45.5, "lon": -73.6, "metadata": meta}
    assert json.loads(records.JsonArchiver().render([1, 2], meta)) == {"data": [1, 2], "metadata": meta}
    assert json.loads(records.JsonArchiver(merge_metadata=False).render({"lat": 1}, meta)) == {"lat": 1}
    with pytest.raises(ValueError):
        records.JsonArchiver().render({"metadata": 1}, meta)


def test_default_metadata_from_config_sits_under_each_records_own(tmp_path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
        "archive.default_metadata": {"apiary": "urban", "hive": 3629, "site": {"lat": 45.5, "name": "roof"}}}))
    assert cfg.archive.default_metadata["hive"] == 3629
    got = records.with_default_metadata(cfg.archive.default_metadata,
                                        {"hive": "3629-b", "site": {"name": "garden"}, "rows": 3})
    assert got == {"apiary": "urban", "hive": "3629-b", "site": {"lat": 45.5, "name": "garden"}, "rows": 3}
    with pytest.raises(config.ConfigError, match=r"archive\.default_metadata\.bad: must be a string, number"):
        config.load(make_config(tmp_path, keys, password_file, 21, **{"archive.default_metadata": {"bad": [1, 2]}}))


def _stager(staging: Path):
    return lambda relname, metadata, data_writer: write_record(staging, relname, metadata, data_writer)


def test_background_writer_retries_then_writes_when_the_disk_returns(tmp_path):
    staging = tmp_path / "staging"
    staging.write_bytes(b"")  # a file where the directory should be: every write fails (ENOTDIR)
    w = records.BackgroundWriter(_stager(staging), tmp_path / "failed", max_retries=50, retry_delay_s=0.02,
                                 max_retry_delay_s=0.05)
    w.submit("r1.json", {"n": 1}, lambda f: f.write(b'{"n":1}'))
    wait_for(lambda: False if w.written else (w._jobs and w._jobs[0]["attempts"] >= 2), 5, "two failed attempts")
    staging.unlink()
    staging.mkdir()  # the disk is back
    wait_for(lambda: w.written, 5, "the retried write")
    assert w.close() == 0
    assert (staging / "r1.json").read_bytes() == b'{"n":1}'
    assert json.loads(sidecar_of(staging / "r1.json").read_text()) == {"n": 1}
    assert not (tmp_path / "failed").exists()


def test_background_writer_moves_to_failed_after_the_last_retry(tmp_path, caplog):
    staging = tmp_path / "staging"
    staging.write_bytes(b"")
    w = records.BackgroundWriter(_stager(staging), tmp_path / "failed" / "gps", max_retries=2, retry_delay_s=0.01)
    with caplog.at_level(logging.WARNING, logger="beemond.records"):
        for i in range(3):
            w.submit(f"r{i}.json", {"n": i}, lambda f, i=i: f.write(b"%d" % i))
        assert w.close(10) == 0
    assert sorted(p.name for p in w.failed) == ["r0.json", "r1.json", "r2.json"]
    for i in range(3):
        path = tmp_path / "failed" / "gps" / f"r{i}.json"
        assert path.read_bytes() == b"%d" % i
        meta = json.loads(sidecar_of(path).read_text())
        assert meta["n"] == i and "File exists" in meta["write_error"]  # mkdir over a file
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 6  # 2 retries x 3 records
    assert len([r for r in caplog.records if r.levelno == logging.ERROR and "moved to" in r.getMessage()]) == 3


def test_background_writer_never_drops_when_failed_is_unwritable_too(tmp_path, caplog):
    staging, failed = tmp_path / "staging", tmp_path / "failed"
    staging.write_bytes(b"")
    failed.write_bytes(b"")
    w = records.BackgroundWriter(_stager(staging), failed, max_retries=1, retry_delay_s=0.01, max_retry_delay_s=0.05)
    w.submit("r.json", {}, lambda f: f.write(b"x"))
    wait_for(lambda: "kept in memory" in caplog.text, 5, "the kept-in-memory log line")
    assert w.pending() == 1 and not w.written and not w.failed
    failed.unlink()
    wait_for(lambda: w.failed or w.written, 5, "the record to land somewhere")
    assert w.close() == 0
    assert (failed / "r.json").read_bytes() == b"x"


def test_background_writer_close_names_what_it_loses(tmp_path, caplog):
    staging = tmp_path / "staging"
    staging.write_bytes(b"")
    w = records.BackgroundWriter(_stager(staging), staging / "failed", max_retries=100, retry_delay_s=5)
    w.submit("late.json", {}, lambda f: f.write(b"x"))
    with caplog.at_level(logging.ERROR, logger="beemond.records"):
        assert w.close(timeout=0.3) == 1
    assert "late.json could not be written before shutdown" in caplog.text


def test_periodic_value_poller_keeps_its_grid_and_skips_a_stall():
    clock, got = Clock(), []
    values = iter(range(100))
    p = PeriodicValuePoller(10.0, lambda: next(values), got.append, clock=clock)
    t0 = clock.t
    assert p.poll() == t0 + 10 and got == [0]
    clock.t = t0 + 13.7  # a late call (slow task, busy loop) does not shift the grid
    assert p.poll() == t0 + 20 and got == [0, 1]
    clock.t = t0 + 19.9
    assert p.poll() == t0 + 20 and got == [0, 1]  # not yet due
    clock.t = t0 + 65.0  # a stall over four slots: one call, then back on the grid
    assert p.poll() == t0 + 70 and got == [0, 1, 2] and p.skipped == 4


def test_json_data_aggregator_flushes_per_window(tmp_path):
    clock = Clock()
    wall = [T0]
    written = []
    agg = JsonDataAggregator("gps", 60.0, lambda rel, meta, dw: written.append((rel, meta, _render(dw))),
                             default_metadata={"hive": "3629"}, clock=clock, now=lambda: wall[0])
    agg.add_data({"lat": 1})
    clock.t += 30
    wall[0] = T0 + timedelta(seconds=30)
    agg.add_data({"lat": 2})
    assert not written and not agg.flush_if_due()
    clock.t += 30
    wall[0] = T0 + timedelta(seconds=60)
    assert agg.flush_if_due()
    agg.add_data({"lat": 3})
    agg.flush()
    agg.flush()  # nothing left: no empty record
    assert [r for r, _m, _b in written] == ["gps_20210619T000458Z_20210619T000558Z.json",
                                             "gps_20210619T000558Z_20210619T000558Z.json"]
    rel, meta, body = written[0]
    assert meta == {"hive": "3629", "sensor": "gps", "start": "2021-06-19T00:04:58.000Z",
                    "end": "2021-06-19T00:05:58.000Z", "count": 2}
    assert json.loads(body) == {"data": [{"lat": 1}, {"lat": 2}], "metadata": meta}


def _render(data_writer) -> bytes:
    buf = io.BytesIO()
    data_writer(buf)
    return buf.getvalue()


def test_tar_record_aggregator_names_members_and_limits_time():
    clock, out = Clock(), []
    agg = TarRecordAggregator(100.0, lambda data, members, start, end: out.append((data, members)), clock=clock,
                              now=lambda: T0)
    agg.add_record("mic", T0, T0 + timedelta(seconds=10), ".wav", b"RIFF1")
    clock.t += 50
    agg.add_record("cam", T0, T0 + timedelta(seconds=1), ".jpg", b"\xff\xd8")
    clock.t += 50  # due: the next record opens a new tar
    agg.add_record("mic", T0 + timedelta(seconds=10), T0 + timedelta(seconds=20), ".wav", b"RIFF2")
    agg.flush()
    assert [m for _d, m in out] == [["mic_20210619T000458Z_20210619T000508Z.wav",
                                     "cam_20210619T000458Z_20210619T000459Z.jpg"],
                                    ["mic_20210619T000508Z_20210619T000518Z.wav"]]
    with tarfile.open(fileobj=io.BytesIO(out[0][0])) as t:
        assert t.extractfile("cam_20210619T000458Z_20210619T000459Z.jpg").read() == b"\xff\xd8"
    with pytest.raises(ValueError):
        agg.add_record("mic", T0, T0 - timedelta(seconds=1), ".wav", b"")


def test_time_window_opens_at_first_item():
    clock = Clock()
    w = TimeWindow(5, clock=clock)
    assert w.due() is None and not w.expired()
    w.touch()
    clock.t += 4
    w.touch()  # a later item does not move the deadline
    assert not w.expired()
    clock.t += 1
    assert w.expired()


def test_staged_records_carry_default_metadata(tmp_path, keys, password_file):
    import multiprocessing
    import queue
    from types import SimpleNamespace

    from beemond import ipc
    from beemond.records import write_staged

    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
        "archive.default_metadata": {"apiary": "urban", "hive": "3629", "rows": -1}}))
    sensor = cfg.sensors[0]
    reader, writer = multiprocessing.Pipe(duplex=False)
    worker = SimpleNamespace(cfg=cfg, name=sensor.name, template=cfg.template_for(sensor), ext="csv",
                             staging=Spool(cfg.spool).staging_dir(sensor.name),
                             channel=ipc.Channel(sensor.name, queue.Queue(), writer, 1.0))
    path = write_staged(worker, T0, T0 + timedelta(minutes=1), {"sensor": sensor.name, "rows": 2},
                        data_writer=lambda f: f.write(b"time\n"))
    meta = json.loads(sidecar_of(path).read_text())
    meta.pop("clock_synchronized", None)  # added by write_staged for every record
    assert meta == {"apiary": "urban", "hive": "3629", "sensor": sensor.name, "rows": 2}
    assert reader.recv().kind == ipc.READY_EVENT
