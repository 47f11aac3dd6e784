"""The SHT3x driver (beemond.sensors.sht3x.driver) through its real seam: an smbus2-compatible bus with the
register-level chip emulator behind it, driven by real UrBAN hive data; and the polled worker loop
end to end, in process, with a real ipc.Channel."""

from __future__ import annotations


import errno
import itertools
import re
import threading
import time
from pathlib import Path

import pytest
from smbus2 import i2c_msg

import polled_peers
from beemond import ipc
from beemond.core.clock import utc_iso
from beemond.sensors.sht3x import chip as sht3x
from beemond.sensors.emulated_i2c import EmulatedSMBus
from beemond.sensors.replay import CsvReplay, load_rows
from beemond.sensors.sht3x.emulator import SHT3xChip, encode
from beemond.sensors.sht3x.driver import SHT3x, SHT3xWorker
from polled_peers import URBAN, CountingQueue, expand
HIVE = "3629"
ADDR = 0x44


@pytest.fixture(scope="module")
def urban_rows():
    assert URBAN.is_file(), f"test data missing: {URBAN} (clone shared/ beside the project)"
    rows = load_rows(URBAN, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", HIVE)
    assert len(rows) > 1000
    return rows


class Fixed:
    """A chip value source returning whatever was set last, tagged with a counter."""

    def __init__(self, t=25.0, rh=50.0):
        self.value = (t, rh)
        self.n = 0

    def __call__(self):
        self.n += 1
        return (*self.value, self.n)


class FrozenClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ------------------------------------------------------------------------------------------ CRC

def test_crc8_datasheet_example():
    assert sht3x.crc8(b"\xbe\xef") == 0x92          # SHT3x-DIS datasheet, section 4.12
    assert sht3x.crc8(b"\x00\x00") == 0x81
    assert sht3x.crc8(b"") == 0xFF                   # initialisation value


# ------------------------------------------------------------------------------------------ round trip

TEMPS = [-40.0, -20.5, 0.0, 0.01, 25.0, 35.45, 60.0, 85.0, 124.99, 125.0]
HUMS = [0.0, 0.01, 35.45, 50.0, 99.99, 100.0]


def test_round_trip_within_datasheet_resolution():
    source = Fixed()
    chip = SHT3xChip(source)
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    for t in TEMPS:
        for rh in HUMS:
            source.value = (t, rh)
            got_t, got_rh = dev.measure()
            # encode rounds to the nearest tick, so the error is at most half a tick
            assert abs(got_t - t) <= sht3x.RESOLUTION_C / 2 + 1e-9, (t, got_t)
            assert abs(got_rh - rh) <= sht3x.RESOLUTION_RH / 2 + 1e-9, (rh, got_rh)
    assert sht3x.RESOLUTION_C == pytest.approx(175 / 65535)
    assert sht3x.RESOLUTION_RH == pytest.approx(100 / 65535)


def test_conversion_end_points():
    assert sht3x.convert(0, 0) == (-45.0, 0.0)
    assert sht3x.convert(65535, 65535) == (130.0, 100.0)
    assert encode(-45.0, 0.0) == (0, 0) and encode(130.0, 100.0) == (65535, 65535)


@pytest.mark.parametrize("repeatability,stretch", [(r, s) for r in ("high", "medium", "low") for s in (False, True)])
def test_every_single_shot_command(repeatability, stretch):
    chip = SHT3xChip(Fixed(21.3, 44.4))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability=repeatability, clock_stretching=stretch)
    t, rh = dev.measure()
    assert round(t, 2) == 21.3 and round(rh, 2) == 44.4


# ------------------------------------------------------------------------------------------ faults

def test_corrupted_word_raises_crc_error_then_recovers():
    chip = SHT3xChip(Fixed(30.0, 40.0))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    chip.corrupt_next = 1
    with pytest.raises(sht3x.CRCError) as info:
        dev.measure()
    assert isinstance(info.value, OSError)
    assert "temperature" in str(info.value)
    t, rh = dev.measure()          # only the next result was corrupted
    assert round(t, 2) == 30.0 and round(rh, 2) == 40.0


@pytest.mark.parametrize("byte,word", [(0, "temperature"), (1, "temperature"), (2, "temperature"),
                                       (3, "humidity"), (4, "humidity"), (5, "humidity")])
def test_every_corrupted_result_byte_is_rejected(byte, word):
    """A flipped bit in any of the six bytes (data or CRC) is a CRCError naming the word, never a value."""
    chip = SHT3xChip(Fixed(30.0, 40.0))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    chip.corrupt_next, chip.corrupt_byte = 1, byte
    with pytest.raises(sht3x.CRCError, match=word):
        dev.measure()
    assert tuple(round(v, 2) for v in dev.measure()) == (30.0, 40.0)


def test_read_too_early_without_clock_stretching_is_nacked():
    clock = FrozenClock()
    chip = SHT3xChip(Fixed(25.0, 50.0), clock=clock)
    bus = EmulatedSMBus(1, {ADDR: chip})
    # single shot, high repeatability, no clock stretching (0x2400), then read at once
    bus.i2c_rdwr(i2c_msg.write(ADDR, [0x24, 0x00]))
    early = i2c_msg.read(ADDR, 6)
    with pytest.raises(OSError) as info:
        bus.i2c_rdwr(early)
    assert info.value.errno == errno.EREMOTEIO
    # after the datasheet's maximum measurement duration the same read succeeds
    clock.now += sht3x.MEASUREMENT_S["high"]
    msg = i2c_msg.read(ADDR, 6)
    bus.i2c_rdwr(msg)
    data = bytes(msg)
    assert sht3x.crc8(data[0:2]) == data[2] and sht3x.crc8(data[3:5]) == data[5]
    assert (int.from_bytes(data[0:2], "big"), int.from_bytes(data[3:5], "big")) == encode(25.0, 50.0)


def test_driver_surfaces_the_nack_as_eremoteio():
    # a chip whose clock never advances is never ready: the driver's read is NACKed
    chip = SHT3xChip(Fixed(), clock=FrozenClock())
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low", clock_stretching=False)
    with pytest.raises(OSError) as info:
        dev.measure()
    assert info.value.errno == errno.EREMOTEIO


def test_clock_stretching_read_waits_instead_of_nacking():
    clock = FrozenClock()
    chip = SHT3xChip(Fixed(25.0, 50.0), clock=clock)
    bus = EmulatedSMBus(1, {ADDR: chip})
    bus.i2c_rdwr(i2c_msg.write(ADDR, [0x2C, 0x10]))   # low repeatability, clock stretching
    msg = i2c_msg.read(ADDR, 6)
    bus.i2c_rdwr(msg)                                  # held, not NACKed
    assert (int.from_bytes(bytes(msg)[0:2], "big"), int.from_bytes(bytes(msg)[3:5], "big")) == encode(25.0, 50.0)


def test_missing_chip_is_enxio():
    bus = EmulatedSMBus(1, {ADDR: SHT3xChip(Fixed())})
    with pytest.raises(OSError) as info:
        SHT3x(bus, 0x45).measure()
    assert info.value.errno == errno.ENXIO


def test_unknown_command_is_nacked_and_flagged():
    chip = SHT3xChip(Fixed())
    bus = EmulatedSMBus(1, {ADDR: chip})
    with pytest.raises(OSError) as info:
        bus.i2c_rdwr(i2c_msg.write(ADDR, [0x12, 0x34]))
    assert info.value.errno == errno.EREMOTEIO
    bus.i2c_rdwr(i2c_msg.write(ADDR, [0xF3, 0x2D]))    # read status
    msg = i2c_msg.read(ADDR, 3)
    bus.i2c_rdwr(msg)
    status = bytes(msg)
    assert sht3x.crc8(status[:2]) == status[2]
    assert int.from_bytes(status[:2], "big") & 0x0002  # "command not processed"


def test_soft_reset_then_measure():
    chip = SHT3xChip(Fixed(22.0, 33.0))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    dev.soft_reset()
    assert tuple(round(v, 2) for v in dev.measure()) == (22.0, 33.0)


# ------------------------------------------------------------------------------------------ replay

def _replay_source(replay: CsvReplay):
    def source():
        row = replay.next_row()
        return row.temperature_c, row.humidity_rh, row.index
    return source


def test_urban_rows_sequential_replay_value_for_value(urban_rows):
    n = 250
    replay = CsvReplay(urban_rows, speedup=0.0)
    chip = SHT3xChip(_replay_source(replay))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    got = [dev.measure() for _ in range(n)]
    assert chip.served == list(range(n))              # every row once, in order
    for (t, rh), row in zip(got, urban_rows[:n]):
        assert (round(t, 2), round(rh, 2)) == (row.temperature_c, row.humidity_rh), row


def test_urban_replay_from_a_start_time(urban_rows):
    target = urban_rows[3000]
    replay = CsvReplay(urban_rows, start=target.time, speedup=0.0)
    chip = SHT3xChip(_replay_source(replay))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    for row in urban_rows[3000:3020]:
        t, rh = dev.measure()
        assert (round(t, 2), round(rh, 2)) == (row.temperature_c, row.humidity_rh)
    assert chip.served == list(range(3000, 3020))


def test_urban_replay_clock_mode_serves_rows_in_time_order(urban_rows):
    # replay time runs 200000x faster than the monotonic clock: ~1 row per 4.5 ms measurement
    replay = CsvReplay(urban_rows, speedup=200_000.0, loop=True)
    chip = SHT3xChip(_replay_source(replay))
    dev = SHT3x(EmulatedSMBus(1, {ADDR: chip}), ADDR, repeatability="low")
    got = [dev.measure() for _ in range(60)]
    idx = chip.served
    assert all(a <= b for a, b in zip(idx, idx[1:])), idx
    assert idx[-1] > idx[0], "replay time did not advance"
    assert idx[-1] < len(urban_rows) - 1, "wrapped around: the test assumes one pass"
    for (t, rh), i in zip(got, idx):
        row = urban_rows[i]
        assert (round(t, 2), round(rh, 2)) == (row.temperature_c, row.humidity_rh)


def test_load_rows_filters_dedups_and_loops(tmp_path: Path):
    f = tmp_path / "mini.csv"
    f.write_text("Date,Tag number,temperature,humidity\n"
                 "2021-06-19 00:15:00+00:00,1,20.5,40.0\n"
                 "2021-06-19 00:00:00+00:00,1,20.0,41.0\n"
                 "2021-06-19 00:00:00+00:00,2,99.0,99.0\n"
                 "2021-06-19 00:15:00+00:00,1,20.5,40.0\n"      # exact duplicate
                 "2021-06-19 00:30:00Z,1,21.0,39.5\n")
    rows = load_rows(f, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", "1")
    assert [(r.index, r.temperature_c, r.humidity_rh) for r in rows] == [(0, 20.0, 41.0), (1, 20.5, 40.0),
                                                                       (2, 21.0, 39.5)]
    replay = CsvReplay(rows, speedup=0.0, loop=True)
    assert [replay.next_row().index for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="no rows"):
        CsvReplay(load_rows(f, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", "3"))
    with pytest.raises(ValueError, match="column"):
        load_rows(f, "Date", {"temperature_c": "temp", "humidity_rh": "humidity"})


def test_load_rows_table_sorts_and_indexes_like_a_list(tmp_path: Path):
    f = tmp_path / "unsorted.csv"
    f.write_text("Date,temperature\n"
                 "2021-06-19 00:30:00.000001+00:00,3.0\n"
                 "2021-06-19 00:00:00+02:00,1.0\n"       # the earliest (22:00 UTC the day before)
                 "2021-06-19 00:30:00.000001+00:00,2.0\n"  # same time as the first line: stays after it
                 "2021-06-19 00:15:00,4.5\n")             # naive: in the replay's zone (UTC)
    rows = load_rows(f, "Date", {"temperature_c": "temperature"})
    got = [(r.index, r.time.isoformat(), r.temperature_c) for r in rows]
    assert got == [(0, "2021-06-18T22:00:00+00:00", 1.0), (1, "2021-06-19T00:15:00+00:00", 4.5),
                   (2, "2021-06-19T00:30:00.000001+00:00", 3.0), (3, "2021-06-19T00:30:00.000001+00:00", 2.0)]
    assert rows[-1] == rows[3] and rows[1:3] == [rows[1], rows[2]]
    with pytest.raises(IndexError):
        rows[4]
    assert list(rows.timestamps()) == [r.time.timestamp() for r in rows]
    replay = CsvReplay(rows, start=rows[2].time, speedup=0.0)
    assert replay.next_row() == rows[2]


# ------------------------------------------------------------------------------------------ worker

def sht3x_table(**climate) -> dict:
    sensor = {"type": "sht3x", "backend": "simulated", "address": ADDR, "repeatability": "low",
              "interval_s": 3600.0, "record_window_s": 3600.0, "max_retries": 3,
              "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": HIVE,
                         "start": "2021-06-19T00:00:00Z", "speedup": 0.0}}
    sensor.update(climate)
    return sensor


class Harness(polled_peers.Harness):
    """The SHT3x worker with a real command queue and a real event pipe, run in a thread."""

    def __init__(self, tmp_path: Path, **climate):
        assert URBAN.is_file(), f"test data missing: {URBAN}"
        super().__init__(tmp_path, "hive_climate", sht3x_table(**climate))

    def run(self, captures: int, timeout: float = 20.0) -> list[ipc.Event]:
        events = super().run(captures, timeout)
        if self.failure:
            raise self.failure
        return events


def test_worker_capture_now_writes_the_urban_rows(tmp_path: Path, urban_rows):
    h = Harness(tmp_path)
    events = h.run(captures=3)
    path, table, meta = h.record()
    assert path.suffix == ".csv"
    assert sorted(p.name for p in h.staging.iterdir()) == [path.name, path.name + ".meta.json"]
    assert table[0] == ["time", "temperature_c", "humidity_rh"]
    body = table[1:]
    assert len(body) >= 3 and meta["rows"] == len(body)
    assert meta["sensor"] == "hive_climate" and meta["type"] == "sht3x" and meta["backend"] == "simulated"
    assert meta["errors"] == 0 and meta["missed"] == 0
    assert meta["address"] == "0x44" and meta["repeatability"] == "low"
    assert meta["replay"]["file"] == URBAN.name
    indices = expand(meta["replay"]["rows"])
    assert indices == list(range(len(body))), meta["replay"]   # sequential from the configured start
    for (stamp, t, rh), i in zip(body, indices):
        assert (float(t), float(rh)) == (urban_rows[i].temperature_c, urban_rows[i].humidity_rh)
        assert stamp.endswith("Z")
    assert meta["start"] == body[0][0] and meta["end"] == body[-1][0]
    ready = [e for e in events if e.kind == ipc.READY_EVENT]
    assert len(ready) == 1, events
    assert ready[0].worker == "hive_climate"
    assert ready[0] == ipc.RecordWritten(worker="hive_climate", time=ready[0].time, sensor="hive_climate", path=str(path))
    assert any(e.kind == ipc.HEARTBEAT for e in events)
    assert h.worker.bus.closed   # close() ran at shutdown


def test_worker_retries_corrupted_reads_and_counts_errors(tmp_path: Path, urban_rows):
    h = Harness(tmp_path)
    h.worker.chip.corrupt_next = 2           # the first two results fail their CRC
    h.run(captures=3)
    _path, table, meta = h.record()
    body = table[1:]
    assert meta["errors"] == 2 and meta["missed"] == 0
    assert meta["rows"] == len(body) >= 3
    indices = expand(meta["replay"]["rows"])
    # rows 0 and 1 reached the driver corrupted and were discarded; the retries measured rows 2, 3, ...
    assert indices == list(range(2, 2 + len(body))), meta["replay"]
    for (_stamp, t, rh), i in zip(body, indices):
        assert (float(t), float(rh)) == (urban_rows[i].temperature_c, urban_rows[i].humidity_rh)
    # the values the corrupted words would have decoded to are nowhere in the record
    good = {(float(t), float(rh)) for _s, t, rh in body}
    for row in urban_rows[:2]:
        st, srh = encode(row.temperature_c, row.humidity_rh)
        bad_t, bad_rh = sht3x.convert(st ^ 0x0100, srh)
        assert (round(bad_t, 2), round(bad_rh, 2)) not in good


def test_worker_measurement_lost_after_retries_is_missing_not_invented(tmp_path: Path, urban_rows):
    h = Harness(tmp_path, max_retries=1)
    h.worker.chip.corrupt_next = 2           # both attempts of the first measurement fail
    events = h.run(captures=2)
    _path, table, meta = h.record()
    body = table[1:]
    assert meta["missed"] == 1 and meta["errors"] == 2
    assert meta["rows"] == len(body) >= 2
    indices = expand(meta["replay"]["rows"])
    assert indices == list(range(2, 2 + len(body)))
    for (_stamp, t, rh), i in zip(body, indices):
        assert (float(t), float(rh)) == (urban_rows[i].temperature_c, urban_rows[i].humidity_rh)
    errors = [e for e in events if e.kind == ipc.ERROR]
    assert len(errors) == 1 and "measurement failed" in errors[0].message


def test_worker_holds_readings_when_a_record_cannot_be_written(tmp_path: Path, urban_rows):
    """A failed record write (disk full, read-only remount) keeps the readings; the record written
    later still carries them all, with replay row ranges that match its values."""
    h = Harness(tmp_path)
    staging = h.staging
    staging.rmdir()
    staging.write_bytes(b"")          # a file where the directory should be: every write fails (ENOTDIR)
    for _ in range(2):
        h.commands.put(ipc.CaptureNow())
    h.commands.put(ipc.Stop())       # pause: flush the window now (and fail)
    done = threading.Event()
    t = threading.Thread(target=lambda: (h.worker.run(), done.set()), daemon=True)
    t.start()
    events, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.kind == ipc.ERROR for e in events):
        if h.events_r.poll(0.05):
            events.append(h.events_r.recv())
    assert any(e.kind == ipc.ERROR for e in events), "no error event for the failed write"
    assert not any(e.kind == ipc.READY_EVENT for e in events)
    staging.unlink()
    staging.mkdir()                   # the disk is back
    h.commands.put(ipc.Start())
    h.commands.put(ipc.CaptureNow())
    h.commands.put(ipc.Shutdown())
    t.join(20)
    assert done.is_set(), "worker did not shut down"
    _path, table, meta = h.record()
    body = table[1:]
    assert meta["rows"] == len(body) >= 3
    indices = expand(meta["replay"]["rows"])
    assert len(indices) == len(body), (meta["replay"], len(body))
    for (_stamp, t_c, rh), i in zip(body, indices):
        assert (float(t_c), float(rh)) == (urban_rows[i].temperature_c, urban_rows[i].humidity_rh)


class HoldsTwo(SHT3xWorker):
    max_held_readings = 2   # the in-memory hold of MAX_HELD_READINGS, made small enough to overflow


def test_readings_dropped_from_a_full_hold_are_logged_and_reported(tmp_path: Path, caplog):
    h = Harness(tmp_path)
    h.worker.close()
    h.worker = HoldsTwo(h.cfg, h.sensor, h.channel)
    h.staging.rmdir()
    h.staging.write_bytes(b"")        # every record write fails (ENOTDIR), so readings pile up in memory
    with caplog.at_level("ERROR"):
        events = h.run(captures=4)    # the flush at shutdown fails: 4 readings, room for 2
    readings = sum(e.kind == ipc.SAMPLE for e in events)   # one per good reading (the start one too)
    held = h.worker.readings          # the newest two, still held for the next write
    assert readings >= 4 and len(held) == 2
    dropped = [re.match(r"dropped (\d+) held reading\(s\) from (\S+Z) to (\S+Z): record writes keep failing",
                        e.message) for e in events if e.kind == ipc.ERROR and e.message.startswith("dropped ")]
    assert dropped and all(dropped), events
    assert sum(int(m[1]) for m in dropped) == readings - 2, "every dropped reading is counted, once"
    assert all(m[2] <= m[3] < utc_iso(held[0][0]) for m in dropped), "the oldest are the ones dropped"
    assert caplog.text.count("oldest held reading(s)") == len(dropped)


def test_worker_rejects_and_counts_a_reading_outside_the_datasheet_range(tmp_path: Path):
    # A chip whose words pass the CRC but decode beyond the specified range (section 2: -40...125 °C,
    # 0...100 %RH): 127 °C is representable (the conversion spans -45...130 °C) but not measurable.
    h = Harness(tmp_path)
    served = itertools.chain([(21.5, 55.0), (127.0, 50.0), (-44.0, 50.0)], itertools.repeat((22.0, 56.0)))
    h.worker.chip.source = lambda: (*next(served), 0)
    events = h.run(captures=4)                                    # (and the first poll at the start)
    _path, table, meta = h.record()
    rows = [(round(float(t), 1), round(float(rh), 1)) for _s, t, rh in table[1:]]
    assert rows == [(21.5, 55.0), (22.0, 56.0), (22.0, 56.0)]
    assert meta["rejected"] == 2 and meta["missed"] == 0 and meta["rows"] == 3
    temps = [e.values["temperature_celsius"] for e in events if e.kind == ipc.SAMPLE]
    assert [round(t, 1) for t in temps] == [21.5, 22.0, 22.0]    # processors and metrics never saw them
    errors = [e.message for e in events if e.kind == ipc.ERROR]
    assert len(errors) == 2 and re.search(r"temperature_c=127\.0\d* outside -40\.\.125", errors[0]), errors
    ready = [e for e in events if e.kind == ipc.READY_EVENT]
    assert ready[0].rejected == 2                         # -> beemond_readings_rejected_total


def test_a_paused_worker_waits_for_commands_instead_of_spinning(tmp_path: Path):
    """`beemond pause` (a hive inspection) must leave a polled sensor's process idle: it wakes for its
    heartbeat, not in a busy loop because a measurement it skips is overdue."""
    h = Harness(tmp_path, interval_s=0.1)
    h.commands = h.channel.commands = CountingQueue()
    h.commands.put(ipc.Stop())
    t = threading.Thread(target=h.worker.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not h.worker.paused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.worker.paused
    time.sleep(0.3)                   # a measurement is overdue from here on
    before = h.commands.waits
    time.sleep(1.0)
    waits = h.commands.waits - before
    h.commands.put(ipc.Shutdown())
    t.join(20)
    assert not t.is_alive(), "worker did not shut down"
    # heartbeat_interval_s is 0.2 s: about 5 waits in that second; a busy loop makes thousands
    assert waits < 50, f"{waits} waits in 1 s while paused"
