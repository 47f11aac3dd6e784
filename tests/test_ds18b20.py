"""The DS18B20 driver (beemond.sensors.ds18b20.driver) through its real seam: a temporary directory tree in the
kernel's w1 sysfs format (beemond.sensors.ds18b20.emulator), and the polled worker with several probes
driven by three UrBAN hives (shared/data/urban-2021/README.md)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from beemond import config, ipc
from beemond.bundle import crypto
from beemond.sensors.base import SensorFailure
from beemond.sensors.ds18b20.chip import ProbeError, crc8, parse_w1_slave
from beemond.sensors.ds18b20.driver import W1Therm
from beemond.sensors.replay import load_rows
from beemond.sensors.ds18b20.emulator import W1Tree, scratchpad
from polled_peers import URBAN, Harness, expand, write_config

ROM = "28-0316a2794eff"
PROBES = {"brood": "28-0316a2794eff", "middle": "28-0416b1a2c3d4", "top": "28-00000a1b2c3d"}
TAGS = {"brood": "3629", "middle": "3631", "top": "3693"}


# ------------------------------------------------------------------------------------------ format

def test_dallas_crc8_reference_values():
    assert crc8(bytes.fromhex("72014b467fff0e10")) == 0x57
    assert crc8(bytes.fromhex("50054b467fff0c10")) == 0x1C       # the power-on scratchpad
    assert crc8(bytes.fromhex("72014b467fff0e1057")) == 0         # a CRC over data + CRC is 0
    # AN27's example: ROM 02 1C B8 01 00 00 00 with CRC A2
    assert crc8(bytes([0x02, 0x1C, 0xB8, 0x01, 0, 0, 0])) == 0xA2


def test_tree_writes_the_kernel_format_exactly(tmp_path):
    tree = W1Tree(tmp_path)
    tree.write(ROM, 23.125)
    assert (tmp_path / ROM / "w1_slave").read_text() == (
        "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n")
    assert W1Therm(tmp_path).read(ROM) == 23.125
    assert W1Therm(tmp_path).present() == [ROM]


# DS18B20 datasheet table 1 (temperature/data relationship), 12-bit
@pytest.mark.parametrize("celsius,register", [(125.0, 0x07D0), (25.0625, 0x0191), (10.125, 0x00A2),
                                              (0.5, 0x0008), (0.0, 0x0000), (-0.5, 0xFFF8),
                                              (-10.125, 0xFF5E), (-25.0625, 0xFE6F), (-55.0, 0xFC90)])
def test_datasheet_temperature_table(tmp_path, celsius, register):
    assert int.from_bytes(scratchpad(celsius)[:2], "little") == register
    tree = W1Tree(tmp_path)
    tree.write(ROM, celsius)
    # the kernel's m°C is truncated toward zero (-25.0625 -> -25062)
    assert abs(W1Therm(tmp_path).read(ROM) - celsius) < 0.001


# ------------------------------------------------------------------------------------------ faults

@pytest.mark.parametrize("kind,message", [("no", "CRC check failed"), ("zeros", "configuration byte"),
                                          ("power_on", "85 °C"), ("empty", "short answer"),
                                          ("corrupt_yes", "CRC mismatch")])
def test_bad_answers_are_errors_never_values(tmp_path, kind, message):
    tree = W1Tree(tmp_path)
    tree.write(ROM, 31.5)
    tree.write_fault(ROM, kind)
    text = (tmp_path / ROM / "w1_slave").read_text()
    with pytest.raises(ProbeError, match=message) as info:
        parse_w1_slave(text)
    assert isinstance(info.value, OSError)       # transient: retried by the worker


def test_a_no_line_still_carries_a_t_value_that_must_not_be_used(tmp_path):
    tree = W1Tree(tmp_path)
    tree.write(ROM, 31.5)
    tree.write_fault(ROM, "no")
    line1, line2 = (tmp_path / ROM / "w1_slave").read_text().splitlines()
    assert line1.endswith(" NO") and "t=" in line2
    assert line2.startswith(" ".join(f"{b:02x}" for b in scratchpad(31.5)))   # the last good bytes


def test_missing_device_is_file_not_found(tmp_path):
    tree = W1Tree(tmp_path)
    tree.write(ROM, 20.0)
    tree.write_fault(ROM, "missing")
    with pytest.raises(FileNotFoundError):
        W1Therm(tmp_path).read(ROM)
    with pytest.raises(FileNotFoundError, match="no 1-Wire bus"):
        W1Therm(tmp_path / "nope").read(ROM)


# ------------------------------------------------------------------------------------------ worker

def sensor_table(**over) -> dict:
    table = {"type": "ds18b20", "backend": "simulated", "interval_s": 3600.0, "record_window_s": 3600.0,
             "max_retries": 2, "probes": dict(PROBES), "replay_filter_values": dict(TAGS),
             "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": "3629",
                        "start": "2021-06-19T00:00:00Z", "speedup": 0.0}}
    table.update(over)
    return table


@pytest.fixture(scope="module")
def hives():
    assert URBAN.is_file(), f"test data missing: {URBAN}"
    return {pos: load_rows(URBAN, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", tag) for pos, tag in TAGS.items()}


def check_body(table, meta, hives):
    """Every non-empty cell is the 12-bit reading of the replayed row the metadata names."""
    assert table[0] == ["time", "brood_c", "middle_c", "top_c"]
    for n, pos in enumerate(PROBES, start=1):
        cells = [row[n] for row in table[1:] if row[n] != ""]
        rows = expand(meta["replay"]["rows"][pos])
        assert len(cells) == len(rows)
        for cell, i in zip(cells, rows):
            assert abs(float(cell) - hives[pos][i].temperature_c) <= 1 / 32, (pos, cell, i)


def test_worker_three_probes_one_record(tmp_path, hives):
    h = Harness(tmp_path, "hive_temps", sensor_table())
    events = h.run(captures=3)
    assert h.failure is None
    _path, table, meta = h.record()
    body = table[1:]
    assert len(body) >= 3 and all(c != "" for row in body for c in row)
    assert meta["errors"] == 0 and meta["probes"] == PROBES
    assert meta["probe_errors"] == {"brood": 0, "middle": 0, "top": 0}
    check_body(table, meta, hives)
    # the three hives really are different probes
    assert len({tuple(row[1:]) for row in body}) == len(body) and body[0][1] != body[0][2]
    samples = [e for e in events if e.kind == ipc.SAMPLE]
    assert {s.sensor for s in samples} == {"hive_temps"}
    assert [s.labels["position"] for s in samples[:3]] == ["brood", "middle", "top"]
    assert float(body[0][1]) == samples[0].values["temperature_celsius"]
    # the emulated sysfs tree is a scratch directory, outside the spool, gone after close()
    assert not (tmp_path / "spool" / "w1-simulated").exists()
    assert not h.worker.w1.base.exists()


def test_probe_samples_become_one_series_per_position(tmp_path):
    """The worker's real SAMPLE events, fed to the real metrics observer, scrape as one
    beemond_temperature_celsius series per position."""
    from prometheus_client import CollectorRegistry, generate_latest

    from beemond.supervisor import metrics
    from beemond.supervisor.state import WorkerProcess

    h = Harness(tmp_path, "hive_temps", sensor_table())
    events = h.run(captures=1)
    _path, table, _meta = h.record()
    worker = WorkerProcess("sensor", "hive_temps")
    health = metrics.Health(h.cfg, {"hive_temps": worker})
    # another sensor's temperature without a position label comes first in the family
    health(WorkerProcess("sensor", "hive_air"), ipc.Sample(worker='hive_air', sensor="hive_air", values={"temperature_celsius": 33.5}))
    for ev in events:
        health(worker, ev)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(health)
    text = generate_latest(registry).decode()
    last = dict(zip(table[0][1:], table[-1][1:]))
    for position in PROBES:
        line = f'beemond_temperature_celsius{{host="test-hive",position="{position}",sensor="hive_temps"}}'
        assert f"{line} {float(last[position + '_c'])}" in text, text
    assert 'beemond_temperature_celsius{host="test-hive",position="",sensor="hive_air"} 33.5' in text


def test_worker_retries_a_no_crc_line_then_uses_the_good_read(tmp_path, hives):
    h = Harness(tmp_path, "hive_temps", sensor_table())
    h.worker.tree.faults[PROBES["middle"]] = ["no", "power_on"]
    h.run(captures=2)
    _path, table, meta = h.record()
    assert meta["errors"] == 2 and meta["probe_errors"] == {"brood": 0, "middle": 2, "top": 0}
    assert all(c != "" for row in table[1:] for c in row)
    assert not any(c.startswith("85.") for row in table[1:] for c in row[1:])
    check_body(table, meta, hives)


def test_worker_probe_that_keeps_failing_leaves_its_cell_empty(tmp_path, hives):
    h = Harness(tmp_path, "hive_temps", sensor_table(max_retries=2))
    h.worker.tree.faults[PROBES["top"]] = ["no", "zeros", "missing"]        # all three attempts
    events = h.run(captures=2)
    assert h.failure is None
    errors = [e.message for e in events if e.kind == ipc.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"probe top ({PROBES['top']}) failed after 3 attempts")
    _path, table, meta = h.record()
    first, second = table[1], table[2]
    assert first[3] == "" and first[1] != "" and first[2] != ""            # empty, not carried forward
    assert second[3] != ""                                                 # the probe came back
    assert meta["probe_errors"]["top"] == 3 and meta["missed"] == 0
    # a failed conversion consumed no replay row: the top probe's first value is its first row
    n = len(table) - 1
    assert expand(meta["replay"]["rows"]["top"]) == list(range(n - 1))
    assert expand(meta["replay"]["rows"]["brood"]) == list(range(n))
    check_body(table, meta, hives)


def test_worker_all_probes_failing_is_a_missed_measurement(tmp_path):
    h = Harness(tmp_path, "hive_temps", sensor_table(max_retries=1))
    for rom in PROBES.values():
        h.worker.tree.faults[rom] = ["missing"] * 2
    events = h.run(captures=2)
    assert h.failure is None
    _path, table, meta = h.record()
    assert meta["missed"] == 1 and meta["errors"] == 2
    assert len(table) - 1 == meta["rows"] >= 1
    assert all(c != "" for row in table[1:] for c in row)
    assert sum(e.kind == ipc.ERROR for e in events) == 1


def test_slow_conversions_keep_the_heartbeat_going(tmp_path):
    # 3 probes x 0.3 s (the kernel blocks ~750 ms per read on a Pi): 0.9 s per measurement, 4.5
    # heartbeat intervals (0.2 s, polled_peers.write_config) that must not pass in silence.
    h = Harness(tmp_path, "hive_temps", sensor_table())
    h.worker.tree.conversion_s = 0.3
    events = h.run(captures=1)
    assert h.failure is None and h.worker.tree.conversions >= 3
    beats = [e.time for e in events if e.kind == ipc.HEARTBEAT]
    assert len(beats) >= 3, beats
    assert max(b - a for a, b in zip(beats, beats[1:])) < 1.0, beats


def test_worker_exits_when_every_probe_stays_gone(tmp_path):
    h = Harness(tmp_path, "hive_temps", sensor_table(max_retries=0))
    for rom in PROBES.values():
        h.worker.tree.faults[rom] = ["missing"] * 100
    h.run(captures=5)
    assert isinstance(h.failure, SensorFailure)
    assert h.records() == []


def test_hardware_backend_reads_a_configured_tree(tmp_path):
    sysfs = tmp_path / "sys" / "bus" / "w1" / "devices"
    tree = W1Tree(sysfs)
    tree.write(PROBES["brood"], 34.875)
    tree.write(PROBES["top"], -1.5)
    table = sensor_table(backend="hardware", base_path=str(sysfs),
                         probes={"brood": PROBES["brood"], "top": PROBES["top"]})
    del table["replay"], table["replay_filter_values"]
    h = Harness(tmp_path, "hive_temps", table)
    h.run(captures=1)
    _path, rows, meta = h.record()
    assert rows[0] == ["time", "brood_c", "top_c"] and rows[1][1:] == ["34.875", "-1.500"]
    assert meta["base_path"] == str(sysfs)


# ------------------------------------------------------------------------------------------ config

BAD = [
    ("probe-id-uppercase", lambda s: s["probes"].update(brood="28-0316A2794EFF"), "probes.brood"),
    ("probe-id-family-10", lambda s: s["probes"].update(brood="10-0316a2794eff"), "probes.brood"),
    ("probe-id-short", lambda s: s["probes"].update(top="28-0316a2794e"), "probes.top"),
    ("probe-duplicate", lambda s: s["probes"].update(top=PROBES["brood"]), "probes.top"),
    ("probes-empty", lambda s: s.update(probes={}, replay_filter_values={}), "probes"),
    ("probes-not-strings", lambda s: s["probes"].update(top=28), "probes"),
    ("filter-unknown-position", lambda s: s["replay_filter_values"].update(roof="3629"), "replay_filter_values.roof"),
    ("filter-value-no-rows", lambda s: s["replay_filter_values"].update(top="9999"), "replay_filter_values.top"),
]


@pytest.mark.parametrize("mutate,key", [pytest.param(m, k, id=i) for i, m, k in BAD])
def test_bad_probe_config_names_the_key(tmp_path, mutate, key):
    table = copy.deepcopy(sensor_table())
    mutate(table)
    path = write_config(tmp_path, "hive_temps", table)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.key == f"sensors.hive_temps.{key}", info.value


def test_check_config_exits_78_naming_the_key(tmp_path):
    table = sensor_table()
    table["probes"]["brood"] = "28-nothex000000"
    path = write_config(tmp_path, "hive_temps", table)
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == config.EX_CONFIG, r.stderr
    assert "sensors.hive_temps.probes.brood" in r.stderr and str(path) in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_ini_probes_section_loads(tmp_path):
    crypto.keygen(tmp_path / "keys")
    ini = tmp_path / "beemond.ini"
    ini.write_text(
        "[daemon]\nhost = test-hive\nspool_dir = spool\n[bundle]\nrecipients = keys/recipient.txt\n"
        "[upload]\nprotocol = none\n"
        "[sensor.hive_temps]\ntype = ds18b20\nbackend = hardware\nbase_path = sysfs\n"
        f"[sensor.hive_temps.probes]\nbrood = {PROBES['brood']}\ntop = {PROBES['top']}\n")
    cfg = config.load(ini)
    s = cfg.sensors[0]
    assert s.probes == {"brood": PROBES["brood"], "top": PROBES["top"]}
    assert s.base_path == tmp_path / "sysfs"
    assert "2 probe(s) (brood, top)" in config.summary(cfg)


def test_worker_rejects_a_probe_value_outside_the_datasheet_range(tmp_path):
    # 126 °C fits the 12-bit register (it goes to 127.9375) but not the DS18B20's -55...125 °C: that
    # probe's cell stays empty and the value is counted; the other probes' values are kept.
    h = Harness(tmp_path, "hive_temps", sensor_table())
    h.worker.tree.faults[PROBES["top"]] = ["beyond_range"] * 3
    events = h.run(captures=2)
    assert h.failure is None
    _path, table, meta = h.record()
    assert all(row[3] == "" and row[1] != "" and row[2] != "" for row in table[1:]), table
    assert meta["rows"] == 3 and meta["rejected"] == 3 and meta["probe_errors"]["top"] == 0
    samples = [e for e in events if e.kind == ipc.SAMPLE]
    assert samples and all(s.labels["position"] != "top" for s in samples)
    errors = [e.message for e in events if e.kind == ipc.ERROR]
    assert errors and all("implausible reading values dropped: top_c=126 outside -55..125" in m for m in errors)
