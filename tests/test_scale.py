"""The serial hive scale (beemond.sensors.scale.driver) through its real seam: serial.Serial on a pty with the
scale emulator on the other side (beemond.sensors.scale.emulator), the worker driven in process with a
real ipc.Channel; config errors through the CLI."""

from __future__ import annotations

import csv
import json
import multiprocessing
import queue
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tomli_w

from beemond import config, ipc
from beemond.bundle import crypto
from beemond.sensors.scale.section import DEFAULT_SCALE_REGEX, ScaleSimulationConfig
from beemond.sensors.scale.emulator import ScaleEmulator, SyntheticHiveWeight
from beemond.sensors.scale.driver import ScaleWorker, calibrate, compensate, parse_line
from beemond.spool import Spool

from conftest import AGE, DATA, ROOT, climate_rows, decrypt_with_age, make_config, wait_for

REGEX = re.compile(DEFAULT_SCALE_REGEX)
FRAME_PROBES = {"brood": "28-0316a2794eff", "top": "28-0416b1a2c3d4"}


# ------------------------------------------------------------------------------------------ lines

@pytest.mark.parametrize("line,kg", [
    (b"W: 42.315 kg\r\n", 42.315),
    (b"42.315\r\n", 42.315),
    (b"-0.5 kg\n", -0.5),
    (b"42315 g\r\n", 42.315),
    (b"NET=92.6 LB\r\n", 92.6 * 0.45359237),
    (b"  +7 KG \r\n", 7.0),
])
def test_default_regex_and_units(line, kg):
    assert parse_line(REGEX, line) == pytest.approx(kg, abs=1e-12)


def test_default_unit_applies_to_a_bare_number_only():
    assert parse_line(REGEX, b"42315\r\n", "g") == pytest.approx(42.315)
    assert parse_line(REGEX, b"100\r\n", "lb") == pytest.approx(45.359237)
    assert parse_line(REGEX, b"2 kg\r\n", "g") == 2.0     # the line's own unit wins


def test_custom_regex():
    # an indicator's "ST,GS,+0042.315kg" frame (stable, gross)
    rx = re.compile(r"^ST,GS,(?P<value>[-+]\d+\.\d+)(?P<unit>kg|lb)$")
    assert parse_line(rx, b"ST,GS,+0042.315kg\r\n") == pytest.approx(42.315)
    with pytest.raises(ValueError):
        parse_line(rx, b"US,GS,+0042.315kg\r\n")             # unstable: not matched, not used


@pytest.mark.parametrize("line", [
    b"W: 42.3", b"", b"W: kg\r\n", b"hello\r\n", b"1.2.3 kg\r\n", b"42 oz\r\n", b"\xff\xfe42\r\n",
], ids=["partial", "empty", "no-number", "text", "two-dots", "unknown-unit", "not-ascii"])
def test_garbage_lines_raise_value_error(line):
    with pytest.raises(ValueError):
        parse_line(REGEX, line)
    with pytest.raises(ValueError):
        parse_line(re.compile(r"(?P<value>\S+)(?P<unit>[a-z]*)"), b"nan\r\n")   # never a NaN weight


def test_tare_calibration_and_compensation_formulas():
    assert calibrate(52.5, 10.5, 1.0) == 42.0
    assert calibrate(52.5, 10.5, 1.02) == pytest.approx(42.84)
    assert calibrate(10.5, 10.5, 1.02) == 0.0                   # the empty platform reads zero
    assert compensate(42.0, 30.0, 0.01, 20.0) == pytest.approx(41.9)
    assert compensate(42.0, 10.0, 0.01, 20.0) == pytest.approx(42.1)
    assert compensate(42.0, 20.0, 0.01, 20.0) == 42.0


def test_synthetic_weight_is_deterministic_with_a_daily_swing():
    sim = ScaleSimulationConfig(start="2021-06-19T00:00:00Z", speedup=0.0, seed=7)
    a, b = SyntheticHiveWeight(sim), SyntheticHiveWeight(sim)
    assert [a()[0] for _ in range(20)] == [b()[0] for _ in range(20)]
    night = a.mean_at(datetime(2021, 6, 19, 3, tzinfo=timezone.utc))
    noon = a.mean_at(datetime(2021, 6, 19, 13, tzinfo=timezone.utc))
    assert night == pytest.approx(42.0 + 0.3 * 3 / 24)
    assert noon == pytest.approx(42.0 + 0.3 * 13 / 24 - 0.8)  # all foragers out at 13:00: the full swing
    assert a.mean_at(datetime(2021, 6, 19, 21, tzinfo=timezone.utc)) == pytest.approx(42.0 + 0.3 * 21 / 24)
    assert abs(a()[0] - 42.0) < 0.05                             # 5 g noise around the curve


# ------------------------------------------------------------------------------------------ worker

class Series:
    """An emulator source: the given weights in order, then the last one again."""

    def __init__(self, *weights):
        self.weights = list(weights)
        self.n = 0

    def __call__(self):
        kg = self.weights[min(self.n, len(self.weights) - 1)]
        self.n += 1
        return kg, self.n


def write_config(tmp_path: Path, **scale) -> Path:
    crypto.keygen(tmp_path / "keys")
    sensor = {"type": "scale", "backend": "hardware", "port": str(tmp_path / "beemond-scale"),
              "request": "W\r\n", "samples": 3, "read_timeout_s": 0.3, "interval_s": 3600.0,
              "record_window_s": 3600.0, "max_retries": 1}
    sensor.update(scale)
    tree = {"daemon": {"host": "test-hive", "spool_dir": "spool", "heartbeat_interval_s": 0.2,
                       "heartbeat_timeout_s": 5.0},
            "sensors": {"hive_scale": sensor,
                        "hive_climate": {"type": "sht3x", "backend": "simulated", "interval_s": 60,
                                         "replay": {"file": str(DATA), "filter_column": "Tag number",
                                                    "filter_value": "3629"}},
                        "hive_frames": {"type": "ds18b20", "backend": "simulated", "interval_s": 60,
                                        "probes": FRAME_PROBES,
                                        "replay": {"file": str(DATA), "filter_column": "Tag number",
                                                   "filter_value": "3629"}},
                        "hive_audio": {"type": "audio", "backend": "simulated"}},
            "bundle": {"recipients": ["keys/recipient.txt"]},
            "upload": {"protocol": "none"}}
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(tree))
    return path


class Harness:
    """A ScaleWorker with a real command queue and event pipe, run in a thread, and an emulated
    scale on a pty behind the configured port's link."""

    def __init__(self, tmp_path: Path, source, *, mode_request: bytes = b"W\r\n", **scale):
        assert DATA.is_file(), f"test data missing: {DATA}"
        self.cfg = config.load(write_config(tmp_path, **scale))
        self.sensor = next(s for s in self.cfg.sensors if s.name == "hive_scale")
        self.scale = ScaleEmulator(source, link=Path(self.sensor.port), request=mode_request, period_s=0.02)
        self.scale.start()
        self.commands = queue.Queue()
        self.events_r, self.events_w = multiprocessing.Pipe(duplex=False)
        self.channel = ipc.Channel(self.sensor.name, commands=self.commands, events=self.events_w,
                                   heartbeat_interval_s=self.cfg.daemon.heartbeat_interval_s)
        self.worker = ScaleWorker(self.cfg, self.sensor, self.channel)
        self.staging = Spool(self.cfg.spool).staging_dir(self.sensor.name)
        self.events: list[ipc.Event] = []
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.worker.run()
        except BaseException as e:   # surfaced by stop()
            self.failure.append(e)

    def start(self) -> "Harness":
        self.thread.start()
        return self

    def _pump(self):
        while self.events_r.poll(0):
            self.events.append(self.events_r.recv())

    def wait_events(self, kind: str, count: int, timeout: float = 10.0) -> list[ipc.Event]:
        def enough():
            self._pump()
            got = [e for e in self.events if e.kind == kind]
            return got if len(got) >= count else None
        return wait_for(enough, timeout, f"{count} {kind} event(s)")

    def stop(self, timeout: float = 10.0) -> None:
        self.commands.put(ipc.Shutdown(reason="test"))
        self.thread.join(timeout)
        self.scale.stop()
        assert not self.thread.is_alive(), "worker did not shut down"
        self._pump()
        if self.failure:
            raise self.failure[0]

    def bad_lines_then_42(self, lines: list[bytes], captures: int) -> tuple[list[list[str]], dict]:
        """After a first 42 kg reading: *lines* in place of the next weights, *captures* readings
        asked for; the record once a second 42 kg reading is in (nothing else may be in it)."""
        self.scale.inject(*lines)
        for _ in range(captures):
            self.commands.put(ipc.CaptureNow())
        self.wait_events(ipc.SAMPLE, 2)
        self.stop()
        body, meta = self.record()
        assert [row[1] for row in body] == ["42.000", "42.000"]
        assert weights(self.events) == [42.0, 42.0]
        return body, meta

    def record(self) -> tuple[list[list[str]], dict]:
        data = sorted(p for p in self.staging.iterdir() if not p.name.endswith(".meta.json"))
        assert len(data) == 1, data
        with open(data[0], newline="") as f:
            table = list(csv.reader(f))
        meta = json.loads((data[0].parent / (data[0].name + ".meta.json")).read_text())
        assert table[0] == ["time", "weight_kg", "raw_kg", "temperature_c", "samples"]
        return table[1:], meta


def weights(events: list[ipc.Event]) -> list[float]:
    return [e.values["weight_kilograms"] for e in events if e.kind == ipc.SAMPLE]


def test_median_of_n_rejects_an_outlier_and_applies_tare_and_calibration(tmp_path: Path):
    # a bee lands on the platform for one line: 99 kg between 52.50 and 52.52
    h = Harness(tmp_path, Series(52.50, 99.0, 52.52, 52.51, 52.51, 52.51), samples=3,
                tare_offset_kg=10.5, calibration_factor=1.02,
                request=r"W\r\n").start()           # escapes written out, as an INI file must
    h.wait_events(ipc.SAMPLE, 1)
    h.commands.put(ipc.CaptureNow())
    h.wait_events(ipc.SAMPLE, 2)
    h.stop()
    body, meta = h.record()
    assert [row[1:] for row in body] == [["42.860", "52.520", "", "3"], ["42.850", "52.510", "", "3"]]
    assert weights(h.events) == pytest.approx([(52.52 - 10.5) * 1.02, (52.51 - 10.5) * 1.02])
    assert h.scale.requests == 6                      # one poll per line
    assert meta["tare_offset_kg"] == 10.5 and meta["calibration_factor"] == 1.02
    assert meta["garbage_lines"] == 0 and meta["errors"] == 0 and meta["missed"] == 0
    assert "compensation" not in meta


def test_streamed_scale_with_grams_and_no_unit(tmp_path: Path):
    src = Series(42.315)
    h = Harness(tmp_path, src, mode_request=b"", request="", unit="g", samples=3)
    h.scale.line_format = "{g:.0f}\r\n"               # a bare number in grams
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    h.stop()
    body, _meta = h.record()
    assert body[0][1:] == ["42.315", "42.315", "", "3"]
    assert h.scale.requests == 0


def test_temperature_compensation_from_a_forwarded_sample(tmp_path: Path):
    h = Harness(tmp_path, Series(42.0), temperature_sensor="hive_climate", compensation_kg_per_c=0.01,
                reference_temperature_c=20.0, max_temperature_age_s=60)
    assert h.sensor.subscribes_to() == ("hive_climate",)
    # as the orchestrator forwards hive_climate's SAMPLE event; queued before the first reading
    h.commands.put(ipc.Sample(sensor="hive_climate", values={"temperature_celsius": 35.0, "relative_humidity_percent": 60.0}))
    h.commands.put(ipc.Sample(sensor="other", values={"temperature_celsius": -5.0}))
    h.start()
    h.commands.put(ipc.CaptureNow())
    h.wait_events(ipc.SAMPLE, 2)
    h.stop()
    body, meta = h.record()
    assert [row[1:] for row in body] == [["41.850", "42.000", "35.00", "3"]] * 2   # 42 - 0.01 * (35 - 20)
    assert weights(h.events) == pytest.approx([41.85, 41.85])
    assert meta["compensation"] == {"temperature_sensor": "hive_climate", "kg_per_c": 0.01, "reference_c": 20.0,
                                    "max_temperature_age_s": 60.0, "uncompensated_rows": [], "reasons": []}


def test_temperature_of_the_chosen_ds18b20_probe_only(tmp_path: Path):
    h = Harness(tmp_path, Series(42.0), temperature_sensor="hive_frames", temperature_position="top",
                compensation_kg_per_c=0.01, reference_temperature_c=20.0)
    # hive_frames sends one SAMPLE per probe, told apart by the position label (DS18B20Worker.samples)
    for position, celsius in (("top", 25.0), ("brood", 35.0)):
        h.commands.put(ipc.Sample(sensor="hive_frames", values={"temperature_celsius": celsius}, labels={"position": position}))
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    h.commands.put(ipc.CaptureNow())       # after both probes' samples were taken in
    h.wait_events(ipc.SAMPLE, 2)
    h.stop()
    body, meta = h.record()
    assert [row[1:] for row in body] == [["41.950", "42.000", "25.00", "3"]] * 2   # top's 25 °C, never brood's 35
    assert meta["compensation"]["uncompensated_rows"] == []


@pytest.mark.parametrize("change,key,message", [
    ({"temperature_sensor": "hive_audio"}, "temperature_sensor", "measures no temperature"),
    ({"temperature_sensor": "hive_frames"}, "temperature_position", "required: hive_frames has 2 probes, name the one to use (brood, top)"),
    ({"temperature_sensor": "hive_frames", "temperature_position": "middle"}, "temperature_position",
     "one of brood, top"),
    ({"temperature_sensor": "hive_climate", "temperature_position": "top"}, "temperature_position",
     "only for a sensor with probes"),
    ({"temperature_position": "top"}, "temperature_position", "needs temperature_sensor"),
], ids=["not-a-thermometer", "which-probe", "no-such-probe", "sht3x-has-no-probes", "position-alone"])
def test_temperature_source_must_give_one_temperature(tmp_path: Path, change, key, message):
    with pytest.raises(config.ConfigError) as err:
        config.load(write_config(tmp_path, **change))
    assert err.value.key == f"sensors.hive_scale.{key}" and message in err.value.message, str(err.value)


def test_stale_or_missing_temperature_is_not_used_and_is_flagged(tmp_path: Path):
    h = Harness(tmp_path, Series(42.0), temperature_sensor="hive_climate", compensation_kg_per_c=0.01,
                max_temperature_age_s=0.3).start()
    h.wait_events(ipc.SAMPLE, 1)                       # row 0: no temperature yet
    h.commands.put(ipc.Sample(sensor="hive_climate", values={"temperature_celsius": 30.0}))
    h.commands.put(ipc.CaptureNow())       # row 1: fresh, compensated
    h.wait_events(ipc.SAMPLE, 2)
    received = time.monotonic()
    wait_for(lambda: time.monotonic() - received > 0.4, 2, "the temperature to age")
    h.commands.put(ipc.CaptureNow())       # row 2: 0.4 s > 0.3 s old, not used
    h.wait_events(ipc.SAMPLE, 3)
    h.stop()
    body, meta = h.record()
    assert [row[1:] for row in body] == [["42.000", "42.000", "", "3"], ["41.900", "42.000", "30.00", "3"],
                                         ["42.000", "42.000", "", "3"]]
    comp = meta["compensation"]
    assert comp["uncompensated_rows"] == [[0, 0], [2, 2]]
    assert comp["reasons"][0] == "no temperature from hive_climate yet"
    assert re.fullmatch(r"temperature from hive_climate is \d+ s old", comp["reasons"][1])


def test_garbage_lines_are_counted_and_never_recorded(tmp_path: Path):
    h = Harness(tmp_path, Series(42.0), samples=3)
    h.scale.inject(b"W: 4?.0 kg\r\n", b"W: 77.0", b"\xff\xff\r\n")   # mismatch, cut short (no newline), not ASCII
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    body, meta = h.bad_lines_then_42([b"E\r\n"] * 6, captures=1)   # nothing usable in a whole attempt: it fails
    assert meta["garbage_lines"] == 3 + 6
    assert meta["errors"] == 1 and meta["missed"] == 0   # the garbage-only attempt, retried
    assert {row[2] for row in body} == {"42.000"}        # no 77 (cut short) or 4? in any median


@pytest.mark.parametrize("line_regex,line", [
    (r"^W:\s*(?P<value>\S+)\s*(?P<unit>kg)$", b"W: 1e38 kg\r\n"),    # an indicator that prints exponents
    (DEFAULT_SCALE_REGEX, b"W: " + b"1" + b"0" * 38 + b".000 kg\r\n"),   # the same weight, spelled out
    (DEFAULT_SCALE_REGEX, b"W: -6.000 kg\r\n"),                          # below min_kg
], ids=["1e38", "1e38-digits", "below-min"])
def test_implausible_weight_is_rejected_counted_and_never_sent(tmp_path: Path, line_regex, line):
    """The field's `W: 1e38 kg` (a median of two lines averaged it into a 5e37 kg swarm alert): out of
    min_kg..max_kg, so it is neither recorded nor sent as a SAMPLE (the swarm detector's input)."""
    h = Harness(tmp_path, Series(42.0), samples=2, line_regex=line_regex)
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    _body, meta = h.bad_lines_then_42([line, line], captures=2)   # both lines of the next reading, then 42
    errors = [e.message for e in h.events if e.kind == ipc.ERROR]
    assert len(errors) == 1 and "implausible reading rejected: weight_kg=" in errors[0], errors
    assert "outside -5..300" in errors[0]
    assert meta["rejected"] == 1 and meta["missed"] == 0 and meta["garbage_lines"] == 0


def test_weight_range_is_configurable_and_checked(tmp_path: Path):
    h = Harness(tmp_path, Series(420.0), samples=1, max_kg=500)   # a heavy two-storey hive on a big platform
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    h.stop()
    assert weights(h.events) == [420.0]
    path = write_config(tmp_path / "bad", min_kg=10, max_kg=10)
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 78 and "sensors.hive_scale.max_kg: must be > min_kg" in r.stderr, r.stderr


def test_unplug_and_replug_within_one_worker(tmp_path: Path):
    h = Harness(tmp_path, Series(42.0), max_retries=1).start()
    h.wait_events(ipc.SAMPLE, 1)                       # plugged: a reading
    h.scale.unplug()                                   # USB unplug: link gone, pty closed
    h.commands.put(ipc.CaptureNow())
    h.commands.put(ipc.CaptureNow())
    errors = h.wait_events(ipc.ERROR, 2)               # both readings lost, reported, worker alive
    assert all("measurement failed" in e.message for e in errors)
    assert h.thread.is_alive() and h.worker.port is None
    h.scale.source = Series(43.5)
    h.scale.plug()                                     # replug: a new pty behind the same name
    h.commands.put(ipc.CaptureNow())
    h.wait_events(ipc.SAMPLE, 2)
    h.stop()
    body, meta = h.record()
    assert [row[1] for row in body] == ["42.000", "43.500"]     # nothing invented for the gap
    assert weights(h.events) == [42.0, 43.5]
    assert meta["missed"] == 2 and meta["errors"] == 4          # 2 readings x (1 try + 1 retry)
    assert meta["reconnects"] == 1
    assert h.worker.consecutive_failures == 0


def test_persistent_failure_exits_the_worker(tmp_path: Path):
    from beemond.sensors.base import MAX_CONSECUTIVE_FAILURES, SensorFailure

    h = Harness(tmp_path, Series(42.0), max_retries=0)
    h.scale.unplug()
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        h.commands.put(ipc.CaptureNow())
    h.start()
    h.thread.join(10)
    h.scale.stop()
    assert not h.thread.is_alive()
    assert len(h.failure) == 1 and isinstance(h.failure[0], SensorFailure)
    assert not h.staging.exists() or not any(h.staging.iterdir())   # no reading invented


def test_simulated_backend_reads_the_emulator_through_serial(tmp_path: Path):
    h = Harness(tmp_path, Series(0.0), backend="simulated", request="", port="/dev/null-not-used",
                simulation={"start": "2021-06-19T03:00:00Z", "speedup": 0.0, "seed": 3, "line_period_s": 0.02})
    h.scale.stop()                                      # the worker brings its own emulator
    assert h.worker.emulator is not None and h.worker.emulator.path.startswith("/dev/pts/")
    h.start()
    h.wait_events(ipc.SAMPLE, 1)
    h.commands.put(ipc.CaptureNow())
    h.wait_events(ipc.SAMPLE, 2)
    h.stop()
    body, meta = h.record()
    for row in body:
        assert abs(float(row[1]) - 42.0) < 0.02, row   # the night weight at the start, 5 g noise
    assert meta["simulation"]["synthetic"] is True and meta["simulation"]["seed"] == 3
    assert meta["port"] == "emulated"
    assert not h.worker.emulator.plugged                # close() stopped it


def test_simulated_backend_replays_a_weight_csv(tmp_path: Path):
    csv_path = tmp_path / "swarm.csv"
    csv_path.write_text("time,weight_kg\n2021-06-19T11:00:00Z,45.0\n2021-06-19T11:05:00Z,44.9\n"
                        "2021-06-19T11:10:00Z,42.6\n")   # a swarm leaves
    h = Harness(tmp_path, Series(0.0), backend="simulated", samples=1, request="W\r\n",
                replay={"file": str(csv_path), "loop": False})
    h.scale.stop()
    h.start()
    for n in (2, 3):
        h.wait_events(ipc.SAMPLE, n - 1)
        h.commands.put(ipc.CaptureNow())
    h.wait_events(ipc.SAMPLE, 3)
    h.stop()
    body, meta = h.record()
    assert [row[1] for row in body] == ["45.000", "44.900", "42.600"]
    assert meta["replay"] == {"file": "swarm.csv", "rows_sent": [[0, 0], [1, 1], [2, 2]]}


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("change,key,message", [
    ({"line_regex": "(?P<value>[0-9"}, "line_regex", "not a regular expression"),
    ({"line_regex": r"(?P<weight>\d+)"}, "line_regex", "(?P<value>"),
    ({"temperature_sensor": "hive_climat"}, "temperature_sensor", "'hive_climat'"),
    ({"compensation_kg_per_c": 0.01}, "compensation_kg_per_c", "needs temperature_sensor"),
    ({"stopbits": 1.2}, "stopbits", "1, 1.5, 2"),
    ({"unit": "oz"}, "unit", "kg, g, lb"),
    ({"request": "W\\x0"}, "request", "escapes"),
    ({"temperature_sensor": "hive_scale"}, "temperature_sensor", "another sensor"),
], ids=["bad-regex", "no-value-group", "unknown-temperature-sensor", "compensation-without-sensor",
        "stopbits", "unit", "bad-escape", "self-reference"])
def test_config_errors_exit_78_naming_the_key(tmp_path: Path, change, key, message):
    path = write_config(tmp_path, **change)
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 78, r
    assert f"{path}: sensors.hive_scale.{key}: " in r.stderr, r.stderr
    assert message in r.stderr


def test_valid_config_describes_the_scale(tmp_path: Path):
    path = write_config(tmp_path, temperature_sensor="hive_climate", compensation_kg_per_c=0.01)
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "sensor hive_scale: scale (hardware), " in r.stdout
    assert "median of 3 every 3600 s" in r.stdout and "0.01 kg/°C from hive_climate" in r.stdout


# ------------------------------------------------------------------------------------------ daemon

@pytest.mark.slow
@pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")
def test_daemon_compensates_with_the_climate_sensors_forwarded_temperature(tmp_path, keys, password_file, ftp,
                                                                         daemons):
    """config/simulated.toml end to end: the orchestrator forwards hive_climate's SAMPLE events to the
    simulated scale, whose records reach the server compensated with those very temperatures."""
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{
        "sensors.hive_scale.interval_s": 0.25, "sensors.hive_scale.record_window_s": 2})
    d = daemons(cfg, tmp_path / "daemon.log", duration=6)
    assert d.wait() == 0, d.log()
    members = {}
    for bundle in ftp.bundles():
        members.update(decrypt_with_age(bundle, keys["identity"])["members"])
    climate = climate_rows(members)
    climate_temps = {t for _ts, t, _rh in climate}
    rows = []
    for name, data in members.items():
        if name.startswith("hive_scale/"):
            lines = data.decode().splitlines()
            assert lines[0] == "time,weight_kg,raw_kg,temperature_c,samples"
            rows += [line.split(",") for line in lines[1:]]
    assert len(rows) >= 10, rows                       # ~6 s at 0.25 s, less start-up
    assert climate, "the climate sensor recorded nothing"
    # Only readings taken before the first climate sample reached the scale lack a temperature. Which
    # readings those are depends on how fast each worker started (a loaded machine starts the climate
    # worker late), so the bound is in time: a second after the first climate reading, not a row count.
    first_climate = min(datetime.fromisoformat(ts) for ts, _t, _rh in climate)
    late = [r for r in rows if not r[3] and datetime.fromisoformat(r[0]) > first_climate + timedelta(seconds=1)]
    assert not late, (first_climate, late)
    assert any(r[3] for r in rows), rows
    for _ts, weight, raw, temp, n in rows:
        assert 41.0 < float(raw) < 43.5 and n == "5"
        if temp:
            assert temp in climate_temps, temp          # a temperature the climate sensor really measured
            assert float(weight) == pytest.approx(float(raw) - 0.005 * (float(temp) - 20.0), abs=0.0011)
        else:
            assert weight == raw
