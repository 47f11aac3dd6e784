"""The SCD4x package (beemond.sensors.scd4x) through its real seam: the driver builds real
``smbus2.i2c_msg`` transfers and sends them through ``EmulatedSMBus`` to the command-level chip
emulator. Waits run on a virtual clock shared by driver and chip, so the datasheet's 5 s measurements
take no wall time. Reference values: the CRC examples of the SCD4x datasheet v1.3 (3.11, table 32:
CRC(0xBEEF) = 0x92; 3.7.1 and 3.7.2 examples) and its read_measurement example (3.5.2)."""

from __future__ import annotations

import errno
import math
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from smbus2 import i2c_msg

from beemond import config, ipc
from beemond.sensors.base import SensorFailure
from beemond.sensors.emulated_i2c import EmulatedSMBus
from beemond.sensors.replay import load_rows
from beemond.sensors.scd4x import chip
from beemond.sensors.scd4x.driver import SCD4x, SCD4xReader
from beemond.sensors.scd4x.emulator import STATUS_NOT_READY, STATUS_READY, SCD4xChip
from beemond.sensors.scd4x.source import RespirationCurve
from conftest import AGE, decrypt_with_age, free_port, make_config, wait_for
from polled_peers import URBAN, Harness, expand, write_config
from test_health import promtool_check, samples


class VirtualTime:
    """A monotonic clock that only moves when someone sleeps on it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Fixed:
    """A chip value source: whatever was set last, tagged with a counter."""

    def __init__(self, co2=1200.0, t=34.5, rh=60.0):
        self.value = (co2, t, rh)
        self.n = 0

    def __call__(self):
        self.n += 1
        return (*self.value, self.n)


def rig(model="scd41", source=None):
    vt = VirtualTime()
    c = SCD4xChip(source or Fixed(), model=model, clock=vt.monotonic)
    dev = SCD4x(EmulatedSMBus(1, {chip.ADDRESS: c}), sleep=vt.sleep, monotonic=vt.monotonic)
    return vt, c, dev


# ------------------------------------------------------------------------------------------ chip logic

@pytest.mark.parametrize("word,crc", [
    (0xBEEF, 0x92),   # 3.11, table 32
    (0x01E0, 0xB4),   # 3.7.1 example: perform_forced_recalibration input, 480 ppm
    (0x7FCE, 0x7B),   # 3.7.1 example: its response, -50 ppm
    (0x0001, 0xB0),   # 3.7.2 example: set_automatic_self_calibration_enabled, enabled
])
def test_crc8_datasheet_examples(word, crc):
    assert chip.crc8(word.to_bytes(2, "big")) == crc


def test_read_measurement_example_converts_to_500_ppm_25_c_37_rh():
    data = bytes.fromhex("01f433" "6667a2" "5eb93c")
    co2, t, rh = chip.convert(*chip.unpack_words(data))
    assert co2 == 500.0 and round(t, 2) == 25.0 and round(rh, 2) == 37.0


def test_conversion_end_points_and_round_trip():
    assert chip.convert(0, 0, 0) == (0.0, -45.0, 0.0)
    assert chip.convert(40000, 65535, 65535) == (40000.0, 130.0, 100.0)
    for co2, t, rh in [(415.0, -9.99, 0.0), (7321.0, 34.56, 63.21), (40000.0, 59.99, 100.0)]:
        c, tc, rhc = chip.convert(*chip.encode(co2, t, rh))
        assert c == co2 and abs(tc - t) <= 175 / 65535 / 2 + 1e-9 and abs(rhc - rh) <= 100 / 65535 / 2 + 1e-9
    assert chip.encode(-5.0, -60.0, 120.0) == (0, 0, 65535)      # clamped to what a word can carry


def test_data_ready_reads_only_the_low_11_bits():
    assert not chip.data_ready(0x8000) and not chip.data_ready(0xF800)
    assert chip.data_ready(0x0001) and chip.data_ready(0x8006) and chip.data_ready(0x0400)


@pytest.mark.parametrize("byte", range(9))
def test_every_corrupted_byte_is_a_crc_error(byte):
    good = chip.pack_words(0x01F4, 0x6667, 0x5EB9)
    bad = good[:byte] + bytes([good[byte] ^ 0x10]) + good[byte + 1:]
    with pytest.raises(chip.CRCError) as info:
        chip.unpack_words(bad, "read_measurement")
    assert isinstance(info.value, OSError)
    assert f"word {byte // 3}" in str(info.value)


# ------------------------------------------------------------------------------------------ driver <-> emulator

def test_periodic_measurement_over_the_bus():
    source = Fixed(1234.0, 34.25, 61.5)
    vt, c, dev = rig(source=source)
    reader = SCD4xReader(dev, "periodic")
    t0 = vt.now
    co2, t, rh = reader.measure()
    assert co2 == 1234.0 and abs(t - 34.25) < 0.002 and abs(rh - 61.5) < 0.001
    # stop (500 ms), start, then the first measurement 5 s after the start (3.5.1, 3.5.3)
    assert c.commands[:2] == [chip.STOP_PERIODIC_MEASUREMENT, chip.START_PERIODIC_MEASUREMENT]
    assert 5.5 <= vt.now - t0 <= 5.5 + 0.2
    assert c.mode == "periodic" and c.served == [1]
    source.value = (1500.0, 30.0, 55.0)
    t1 = vt.now
    assert reader.measure()[0] == 1500.0
    assert vt.now - t1 <= chip.SIGNAL_UPDATE_INTERVAL_S + 0.2          # no restart: the next 5 s tick
    assert c.commands.count(chip.START_PERIODIC_MEASUREMENT) == 1


def test_late_reader_gets_the_latest_measurement_once():
    vt, c, dev = rig()
    reader = SCD4xReader(dev, "periodic")
    reader.measure()
    vt.sleep(60)                        # 12 signal updates while nobody read
    reader.measure()
    assert c.served == [1, 2]           # one read-out, not twelve
    assert not dev.data_ready()         # the read emptied the buffer (3.5.2)


def test_read_with_an_empty_buffer_is_nacked():
    vt, c, dev = rig()
    dev.start_periodic_measurement()
    with pytest.raises(OSError) as info:
        dev.read_measurement()
    assert info.value.errno == errno.EREMOTEIO and c.served == []


def test_data_ready_status_has_undefined_high_bits():
    vt, c, dev = rig()
    dev.start_periodic_measurement()
    assert dev.read_words(chip.GET_DATA_READY_STATUS, "status") == [STATUS_NOT_READY]
    vt.sleep(5.0)
    assert dev.read_words(chip.GET_DATA_READY_STATUS, "status") == [STATUS_READY]
    assert STATUS_NOT_READY & 0x8000 and dev.data_ready()


def test_commands_not_allowed_during_periodic_measurement_are_nacked():
    vt, c, dev = rig()
    dev.start_periodic_measurement()
    for command in (chip.GET_SERIAL_NUMBER, chip.MEASURE_SINGLE_SHOT, chip.START_PERIODIC_MEASUREMENT):
        with pytest.raises(OSError) as info:
            dev.send(command)
        assert info.value.errno == errno.EREMOTEIO
    dev.stop_periodic_measurement()
    assert dev.serial_number() == 0x1F7AE8B03B07


def test_command_during_the_stop_execution_time_is_nacked():
    vt, c, dev = rig()
    dev.start_periodic_measurement()
    dev.bus.i2c_rdwr(i2c_msg.write(chip.ADDRESS, [0x3F, 0x86]))   # no 500 ms wait
    with pytest.raises(OSError) as info:
        dev.serial_number()
    assert info.value.errno == errno.EREMOTEIO
    vt.sleep(0.5)
    assert dev.serial_number() == 0x1F7AE8B03B07


def test_single_shot_on_an_scd41():
    vt, c, dev = rig("scd41", Fixed(5321.0, 33.0, 70.0))
    reader = SCD4xReader(dev, "single_shot")
    t0 = vt.now
    co2, t, rh = reader.measure()
    assert co2 == 5321.0 and round(t, 2) == 33.0 and round(rh, 2) == 70.0
    assert 5.5 <= vt.now - t0 <= 5.5 + 0.2      # stop 500 ms, single shot 5000 ms (3.10.1)
    assert c.mode == "idle" and chip.START_PERIODIC_MEASUREMENT not in c.commands
    t1 = vt.now
    reader.measure()
    assert 5.0 <= vt.now - t1 <= 5.0 + 0.2      # no second stop
    assert c.commands.count(chip.MEASURE_SINGLE_SHOT) == 2


def test_single_shot_on_an_scd40_is_nacked():
    vt, c, dev = rig("scd40")
    with pytest.raises(OSError) as info:
        SCD4xReader(dev, "single_shot").measure()
    assert info.value.errno == errno.EREMOTEIO and c.served == []


def test_crc_error_discards_the_reading_and_keeps_the_periodic_mode():
    source = Fixed(900.0, 20.0, 40.0)
    vt, c, dev = rig(source=source)
    reader = SCD4xReader(dev, "periodic")
    c.corrupt_next, c.corrupt_byte = 1, 4          # the temperature word's LSB
    with pytest.raises(chip.CRCError, match="read_measurement word 1"):
        reader.measure()
    assert reader.started
    source.value = (950.0, 21.0, 41.0)
    assert reader.measure()[0] == 950.0               # the next measurement, not the corrupted one
    assert c.commands.count(chip.START_PERIODIC_MEASUREMENT) == 1


def test_nack_restarts_the_periodic_mode_on_the_next_reading():
    vt, c, dev = rig()
    reader = SCD4xReader(dev, "periodic")
    reader.measure()
    c.nack_next = 1
    with pytest.raises(OSError) as info:
        reader.measure()
    assert info.value.errno == errno.EREMOTEIO and not reader.started
    reader.measure()
    assert c.commands.count(chip.START_PERIODIC_MEASUREMENT) == 2


def test_a_sensor_that_reset_times_out_then_recovers():
    vt, c, dev = rig()
    reader = SCD4xReader(dev, "periodic")
    reader.measure()
    c.reset()                                          # a brown-out: idle, empty buffer
    t0 = vt.now
    with pytest.raises(OSError) as info:
        reader.measure()
    assert info.value.errno == errno.ETIMEDOUT
    assert vt.now - t0 >= chip.SIGNAL_UPDATE_INTERVAL_S
    assert reader.measure()[0] == 1200.0
    assert c.mode == "periodic"


def test_missing_chip_is_enxio():
    vt = VirtualTime()
    dev = SCD4x(EmulatedSMBus(1, {}), sleep=vt.sleep, monotonic=vt.monotonic)
    with pytest.raises(OSError) as info:
        SCD4xReader(dev).measure()
    assert info.value.errno == errno.ENXIO


def test_write_with_parameters_or_unknown_command_is_nacked():
    vt, c, dev = rig()
    for payload in ([0xE0, 0x00, 0x03, 0xF5, 0x00], [0x12, 0x34]):
        with pytest.raises(OSError):
            dev.bus.i2c_rdwr(i2c_msg.write(chip.ADDRESS, payload))
    assert c.commands == []


# ------------------------------------------------------------------------------------------ source

def test_respiration_curve_peaks_before_dawn_and_stays_in_range():
    curve = RespirationCurve(utc_offset_h=-4.0)
    day = datetime(2021, 6, 19, tzinfo=timezone.utc)
    values = [curve.co2_ppm(day + timedelta(minutes=15 * i)) for i in range(96)]
    assert min(values) >= 2000.0 - 1e-9 and max(values) <= 8000.0 + 1e-9
    assert curve.co2_ppm(day + timedelta(hours=8)) == pytest.approx(8000.0)     # 04:00 EDT
    assert curve.co2_ppm(day + timedelta(hours=20)) == pytest.approx(2000.0)    # 16:00 EDT
    assert curve.co2_ppm(day + timedelta(days=3, hours=8)) == pytest.approx(8000.0)   # a 24 h period
    assert all(math.isfinite(v) for v in values)
    with pytest.raises(ValueError):
        curve.co2_ppm(datetime(2021, 6, 19))


# ------------------------------------------------------------------------------------------ worker

HIVE = "3693"


def sensor_table(**over) -> dict:
    table = {"type": "scd4x", "backend": "simulated", "interval_s": 3600.0, "record_window_s": 3600.0,
             "max_retries": 3,
             "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": HIVE,
                        "start": "2021-06-19T00:00:00Z", "speedup": 0.0}}
    table.update(over)
    return table


def harness(tmp_path, **over) -> tuple[Harness, VirtualTime]:
    """The worker of a simulated SCD4x whose driver and chip share a virtual clock (no 5 s waits)."""
    h = Harness(tmp_path, "hive_co2", sensor_table(**over))
    vt = VirtualTime()
    h.worker.device.sleep, h.worker.device.monotonic, h.worker.device.pause = vt.sleep, vt.monotonic, vt.sleep
    h.worker.chip.clock = vt.monotonic
    return h, vt


@pytest.fixture(scope="module")
def urban_rows():
    return load_rows(URBAN, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", HIVE)


def test_worker_records_replayed_rows_and_the_respiration_curve(tmp_path, urban_rows):
    h, _vt = harness(tmp_path)
    events = h.run(captures=3)
    assert h.failure is None, h.failure
    _path, table, meta = h.record()
    assert table[0] == ["time", "co2_ppm", "temperature_c", "humidity_rh"]
    body = table[1:]
    assert len(body) >= 3 and meta["rows"] == len(body) and meta["errors"] == 0 and meta["rejected"] == 0
    assert (meta["type"], meta["address"], meta["model"], meta["mode"]) == ("scd4x", "0x62", "scd41", "periodic")
    indices = expand(meta["replay"]["rows"])
    assert indices == list(range(len(body)))
    curve = RespirationCurve()
    for (_stamp, co2, t, rh), i in zip(body, indices):
        row = urban_rows[i]
        assert int(co2) == round(curve.co2_ppm(row.time))
        assert (float(t), float(rh)) == (row.temperature_c, row.humidity_rh)   # 2-decimal data survives the words
    samples = [e for e in events if e.kind == ipc.SAMPLE]
    assert len(samples) == len(body) and samples[0].sensor == "hive_co2"
    assert set(samples[0].values) == {"co2_ppm", "temperature_celsius", "relative_humidity_percent"}
    assert h.worker.chip.mode == "idle", "a stopped worker leaves the sensor idle"


def test_worker_takes_co2_from_a_replay_column_when_there_is_one(tmp_path):
    csv_file = tmp_path / "hive_co2.csv"
    csv_file.write_text("time,t,rh,co2\n"
                        "2022-07-01T01:00:00Z,34.50,61.20,9120\n"
                        "2022-07-01T01:05:00Z,34.62,60.90,9385\n"
                        "2022-07-01T01:10:00Z,34.71,60.35,8811\n")
    h, _vt = harness(tmp_path, replay={"file": str(csv_file), "time_column": "time", "speedup": 0.0,
                                       "columns": {"temperature_c": "t", "humidity_rh": "rh", "co2_ppm": "co2"}})
    h.run(captures=2)
    assert h.failure is None, h.failure
    _path, table, _meta = h.record()
    assert [r[1:] for r in table[1:4]] == [["9120", "34.50", "61.20"], ["9385", "34.62", "60.90"],
                                           ["8811", "34.71", "60.35"]]


def test_worker_single_shot_on_an_scd41(tmp_path):
    h, _vt = harness(tmp_path, mode="single_shot")
    h.run(captures=2)
    assert h.failure is None, h.failure
    _path, table, meta = h.record()
    assert meta["mode"] == "single_shot" and len(table) - 1 >= 2
    commands = h.worker.chip.commands
    assert commands.count(chip.MEASURE_SINGLE_SHOT) == len(table) - 1
    assert chip.START_PERIODIC_MEASUREMENT not in commands


def test_worker_rejects_and_counts_implausible_readings(tmp_path):
    h, _vt = harness(tmp_path)
    # CRC-correct words that decode outside the datasheet ranges: CO2 0 (no measurement), 61 °C, and
    # a value a 16-bit word cannot carry is clamped to 130 °C, also outside -10...60.
    served = iter([(800.0, 30.0, 50.0), (0.0, 30.0, 50.0), (800.0, 61.0, 50.0), (800.0, 200.0, 50.0)])
    h.worker.chip.source = lambda: (*next(served, (900.0, 31.0, 51.0)), 0)
    events = h.run(captures=4)
    _path, table, meta = h.record()
    assert [int(r[1]) for r in table[1:]] == [800, 900]
    assert meta["rejected"] == 3 and meta["missed"] == 0
    assert [e.values["co2_ppm"] for e in events if e.kind == ipc.SAMPLE] == [800.0, 900.0]
    errors = [e.message for e in events if e.kind == ipc.ERROR]
    assert len(errors) == 3 and "co2_ppm=0 outside 1..40000" in errors[0], errors
    assert "temperature_c=60.99" in errors[1] and "outside -10..60" in errors[1]
    assert "temperature_c=130 outside" in errors[2]
    ready = [e for e in events if e.kind == ipc.READY_EVENT]
    assert ready[0].rejected == 3                 # -> beemond_readings_rejected_total


def test_worker_retries_crc_errors_and_counts_them(tmp_path, urban_rows):
    h, _vt = harness(tmp_path)
    h.worker.chip.corrupt_next = 2
    h.run(captures=2)
    assert h.failure is None
    _path, table, meta = h.record()
    assert meta["errors"] == 2 and meta["missed"] == 0
    # the corrupted read-outs consumed their rows; what is recorded is what the chip sent intact
    assert h.worker.chip.measurements == len(table) - 1 + 2
    for (_s, _co2, t, _rh), i in zip(table[1:], expand(meta["replay"]["rows"])):
        assert float(t) == urban_rows[i].temperature_c


def test_worker_persistent_nack_exits_without_inventing_readings(tmp_path):
    h, _vt = harness(tmp_path, max_retries=0)
    h.worker.chip.nack_next = 10_000
    events = h.run(captures=5)
    assert isinstance(h.failure, SensorFailure), h.failure
    assert h.records() == []
    assert not any(e.kind == ipc.SAMPLE for e in events)


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("over,key", [
    ({"interval_s": 2.0}, "interval_s"),
    ({"model": "scd40", "mode": "single_shot"}, "mode"),
    ({"mode": "burst"}, "mode"),
    ({"address": 0x61}, "address"),
    ({"power_pin": 17, "power_lead_s": 2.0}, "power_pin"),
    ({"power_pin": 17, "mode": "single_shot", "power_lead_s": 0.5}, "power_lead_s"),
    ({"co2_low_ppm": 9000.0}, "co2_low_ppm"),
    ({"replay": None, "backend": "simulated"}, "replay"),
    ({"replay": {"file": str(URBAN), "columns": {"co2_ppm": "co2"}}}, "replay.columns.co2_ppm"),
], ids=["fast", "scd40-single-shot", "mode", "address", "periodic-switched", "lead", "co2-range", "no-replay",
        "no-co2-column"])
def test_bad_scd4x_config_names_the_key(tmp_path, over, key):
    table = sensor_table(**over)
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(config.ConfigError) as info:
        config.load(write_config(tmp_path, "hive_co2", table))
    assert info.value.key == f"sensors.hive_co2.{key}", info.value


def test_check_config_exits_78_naming_the_key(tmp_path):
    path = write_config(tmp_path, "hive_co2", sensor_table(model="scd40", mode="single_shot"))
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == config.EX_CONFIG, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "sensors.hive_co2.mode" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ the daemon

@pytest.mark.slow
@pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")
def test_daemon_records_exports_and_uploads_co2(tmp_path, keys, password_file, ftp, daemons, urban_rows):
    """config/simulated.toml's SCD4x in the real daemon: its CO2 is scraped from /metrics (promtool-clean)
    while it runs, and its records reach the FTP server in bundles the stock age CLI decrypts, holding
    hive 3693's UrBAN rows and the respiration curve at their times, in order."""
    port = free_port()
    others = {f"sensors.{name}": None for name in ("hive_climate", "hive_air", "hive_frames", "hive_audio",
                                                   "hive_cam", "hive_gpio", "hive_scale")}
    cfg = make_config(tmp_path, keys, password_file, ftp.port, processors=None, **others, **{
        "metrics.port": port, "sensors.hive_co2.interval_s": 5, "sensors.hive_co2.record_window_s": 5})
    d = daemons(cfg, tmp_path / "daemon.log", duration=14)

    def scraped():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return text if 'beemond_co2_ppm{host="demo-hive",sensor="hive_co2"}' in text else None

    text = wait_for(scraped, 20, "a CO2 reading in a /metrics scrape")
    promtool_check(text)
    got = samples(text)
    curve = RespirationCurve()
    first = {round(curve.co2_ppm(r.time)) for r in urban_rows[:5]}
    assert [v for labels, v in got["beemond_co2_ppm"] if labels["sensor"] == "hive_co2"][0] in first
    assert {s[0]["sensor"]: s[1] for s in got["beemond_readings_rejected_total"]}["hive_co2"] == 0
    assert d.wait() == 0, d.log()

    rows = []
    for bundle in ftp.bundles():
        for name, data in decrypt_with_age(bundle, keys["identity"])["members"].items():
            if name.startswith("hive_co2/"):
                lines = data.decode().splitlines()
                assert lines[0] == "time,co2_ppm,temperature_c,humidity_rh"
                rows += [line.split(",") for line in lines[1:]]
    rows.sort()
    assert len(rows) >= 2, d.log()
    for (_t, co2, t, rh), row in zip(rows, urban_rows):
        assert (int(co2), float(t), float(rh)) == (round(curve.co2_ppm(row.time)), row.temperature_c, row.humidity_rh)


def test_a_shutdown_does_not_wait_out_a_periodic_measurement(tmp_path):
    # Real time: the first reading takes 0.5 s (stop) + 5 s (the signal update interval). A shutdown
    # queued during that wait ends the worker within a wait slice, not after the measurement.
    import threading
    import time

    h = Harness(tmp_path, "hive_co2", sensor_table())
    done = threading.Event()

    def target():
        try:
            h.worker.run()
        except BaseException as e:
            h.failure = e
        done.set()

    threading.Thread(target=target, daemon=True).start()
    wait_for(lambda: h.worker.reader.started, 10, "the periodic measurement to start")   # now in the 5 s wait
    asked = time.monotonic()
    h.commands.put(ipc.Shutdown(reason="test"))
    assert done.wait(10)
    assert time.monotonic() - asked < 1.0, f"shutdown took {time.monotonic() - asked:.1f} s"
    assert h.failure is None, h.failure
    assert h.worker.missed == 0 and h.worker.errors == 0, "an interrupted wait is not a failed measurement"
    assert h.worker.chip.mode == "idle"
