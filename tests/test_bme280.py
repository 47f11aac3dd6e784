"""The BME280 driver (beemond.sensors.bme280.driver) through its real seam: an smbus2-compatible bus with the
register-level chip emulator behind it. Reference values: the BMP280 datasheet's worked example
(BST-BMP280-DS001 3.12; the BME280 shares its T/P code) and, for humidity, the register dump and
vectors of the bme280-rs crate (github.com/claudiomattera/bme280-rs, src/calibration.rs tests)."""

from __future__ import annotations

import errno
import random
import subprocess
import sys

import pytest

from beemond import config, ipc
from beemond.sensors.bme280 import chip as drv
from beemond.sensors.base import SensorFailure
from beemond.sensors.bme280.chip import Calibration
from beemond.sensors.bme280.driver import BME280, WrongChipError
from beemond.sensors.bme280.emulator import TYPICAL, BME280Chip, raw_from_values
from beemond.sensors.emulated_i2c import EmulatedSMBus
from beemond.sensors.replay import load_rows
from polled_peers import URBAN, Harness, expand, write_config

ADDR = 0x76
HIVE = "3629"

# BMP280 datasheet 3.12 worked example
DATASHEET = Calibration(dig_T1=27504, dig_T2=26435, dig_T3=-1000, dig_P1=36477, dig_P2=-10685, dig_P3=3024,
                        dig_P4=2855, dig_P5=140, dig_P6=-7, dig_P7=15500, dig_P8=-14600, dig_P9=6000)
# bme280-rs: registers 0x88..0xA1 and 0xE1..0xE7 of a real part, and its expected results
RS_LO = bytes.fromhex("b16f2e6a3200e28f0ad7d00b751fc5fff9ffac260ad8bd10004b")
RS_HI = bytes.fromhex("770100122003" "1e")
RS_ADC = (0x84510, 0x4F570, 0x5EB4)            # adc_T, adc_P, adc_H
RS_T_FINE, RS_P_Q24_8, RS_H_Q22_10 = 0x22391, 0x018B663F, 0x8399


class Fixed:
    """A chip value source: whatever was set last, tagged with a counter."""

    def __init__(self, t=25.0, p=101325.0, rh=50.0):
        self.value = (t, p, rh)
        self.n = 0

    def __call__(self):
        self.n += 1
        return (*self.value, self.n)


def device(chip: BME280Chip, **osrs) -> BME280:
    return BME280(EmulatedSMBus(1, {ADDR: chip}), ADDR, **osrs)


# ------------------------------------------------------------------------------------------ reference values

def test_bmp280_datasheet_worked_example():
    t, t_fine = drv.compensate_temperature(DATASHEET, 519888)
    assert (t, t_fine) == (2508, 128422)                   # 25.08 °C
    p = drv.compensate_pressure(DATASHEET, 415148, t_fine)
    # the datasheet's double formula gives 100653.27 Pa; the int64 code "may deviate slightly"
    assert abs(p / 256 - 100653.27) < 0.05, p / 256
    assert p == 25767233


def test_bme280_rs_register_dump_through_the_bus():
    chip = BME280Chip(Fixed(), raw_calibration=(RS_LO, RS_HI))
    dev = device(chip)
    cal = dev.begin()
    assert cal == TYPICAL
    assert (cal.dig_H4, cal.dig_H5, cal.dig_H6) == (0x120, 0x32, 0x1E)
    chip.fixed_raw = RS_ADC
    t, rh, p = dev.measure()
    assert drv.compensate_temperature(cal, RS_ADC[0])[1] == RS_T_FINE
    assert drv.compensate_pressure(cal, RS_ADC[1], RS_T_FINE) == RS_P_Q24_8
    assert drv.compensate_humidity(cal, RS_ADC[2], RS_T_FINE) == RS_H_Q22_10
    assert (t, rh, p) == ((RS_T_FINE * 5 + 128 >> 8) / 100, RS_H_Q22_10 / 1024, RS_P_Q24_8 / 256)
    assert round(t, 2) == 27.38 and round(rh, 2) == 32.9 and round(p) == 101222


def test_signed_12_bit_dig_h4_h5_packing():
    cal = Calibration(**{**TYPICAL.__dict__, "dig_H4": -300, "dig_H5": -1000})
    lo, hi = cal.to_registers()
    # table 16: 0xE4 = H4[11:4], 0xE5 = H5[3:0] << 4 | H4[3:0], 0xE6 = H5[11:4]
    assert hi[3:6] == bytes([0xED, 0x84, 0xC1])
    assert Calibration.from_registers(lo, hi) == cal
    assert device(BME280Chip(Fixed(), calibration=cal)).begin() == cal


def test_inverse_compensation_round_trip():
    rnd = random.Random(7)
    for _ in range(200):
        t, p, rh = rnd.uniform(-20, 60), rnd.uniform(80000, 108000), rnd.uniform(1, 99)
        adc_t, adc_p, adc_h = raw_from_values(TYPICAL, t, p, rh)
        ct, t_fine = drv.compensate_temperature(TYPICAL, adc_t)
        assert abs(ct / 100 - t) <= 0.01
        assert abs(drv.compensate_pressure(TYPICAL, adc_p, t_fine) / 256 - p) <= 0.2      # 20-bit step
        assert abs(drv.compensate_humidity(TYPICAL, adc_h, t_fine) / 1024 - rh) <= 0.01


@pytest.mark.parametrize("osrs,tol_p", [(1, 2.62), (16, 0.2)])   # datasheet 3.4.2: P resolution x1 / x16
def test_measure_through_the_bus_within_resolution(osrs, tol_p):
    source = Fixed()
    chip = BME280Chip(source)
    dev = device(chip, osrs_t=osrs, osrs_p=osrs, osrs_h=osrs)
    for value in [(34.5, 100800.0, 55.3), (-7.25, 95000.0, 12.0), (41.0, 104500.5, 93.7)]:
        source.value = value
        t, rh, p = dev.measure()
        assert abs(t - value[0]) <= 0.01 and abs(rh - value[2]) <= 0.01 and abs(p - value[1]) <= tol_p
    code = drv.OSRS[osrs]
    assert chip.regs[drv.REG_CTRL_HUM] == code
    assert chip.regs[drv.REG_CTRL_MEAS] == code << 5 | code << 2   # forced mode done: back to sleep
    assert chip.measurements == 3


def test_skipped_pressure_and_humidity_read_as_none():
    dev = device(BME280Chip(Fixed(22.0)), osrs_p=0, osrs_h=0)
    t, rh, p = dev.measure()
    assert round(t, 2) == 22.0 and rh is None and p is None


# ------------------------------------------------------------------------------------------ faults

def test_wrong_chip_id_is_a_clear_persistent_error():
    dev = device(BME280Chip(Fixed(), chip_id=0x58))
    with pytest.raises(WrongChipError) as info:
        dev.measure()
    assert not isinstance(info.value, OSError)        # not retried as a transient error
    assert isinstance(info.value, SensorFailure)
    assert "0x58" in str(info.value) and "BMP280" in str(info.value) and "0x60" in str(info.value)


def test_missing_chip_is_enxio():
    with pytest.raises(OSError) as info:
        BME280(EmulatedSMBus(1, {0x77: BME280Chip(Fixed())}), ADDR).measure()
    assert info.value.errno == errno.ENXIO


def test_measurement_that_never_finishes_times_out_without_a_value():
    chip = BME280Chip(Fixed())
    dev = device(chip)
    dev.begin()
    chip.stuck_measuring = True
    with pytest.raises(OSError) as info:
        dev.measure()
    assert info.value.errno == errno.ETIMEDOUT


def test_reset_during_the_measurement_is_an_error_not_a_reading():
    chip = BME280Chip(Fixed(30.0, 99000.0, 40.0))
    dev = device(chip)
    chip.reset_during_next = True
    with pytest.raises(OSError, match="reset values"):
        dev.measure()
    t, rh, p = dev.measure()          # the next forced measurement re-writes ctrl_hum/ctrl_meas
    assert round(t, 2) == 30.0 and round(rh, 1) == 40.0 and abs(p - 99000.0) < 3


def test_calibration_read_during_the_nvm_copy_is_rejected():
    # an all-zero calibration (what the image registers hold while im_update is set) never decodes
    chip = BME280Chip(Fixed(), raw_calibration=(bytes(26), bytes(7)))
    with pytest.raises(OSError, match="implausible calibration"):
        device(chip).begin()


# ------------------------------------------------------------------------------------------ worker

def sensor_table(**over) -> dict:
    table = {"type": "bme280", "backend": "simulated", "address": ADDR, "interval_s": 3600.0,
             "record_window_s": 3600.0, "max_retries": 3, "pressure_pa": 100500.0,
             "replay": {"file": str(URBAN), "filter_column": "Tag number", "filter_value": HIVE,
                        "start": "2021-06-19T00:00:00Z", "speedup": 0.0}}
    table.update(over)
    return table


@pytest.fixture(scope="module")
def urban_rows():
    assert URBAN.is_file(), f"test data missing: {URBAN}"
    return load_rows(URBAN, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", HIVE)


def test_worker_writes_replayed_urban_rows(tmp_path, urban_rows):
    h = Harness(tmp_path, "hive_air", sensor_table())
    events = h.run(captures=3)
    assert h.failure is None
    _path, table, meta = h.record()
    assert table[0] == ["time", "temperature_c", "humidity_rh", "pressure_pa"]
    body = table[1:]
    assert len(body) >= 3 and meta["rows"] == len(body) and meta["errors"] == 0
    assert meta["type"] == "bme280" and meta["address"] == "0x76"
    indices = expand(meta["replay"]["rows"])
    assert indices == list(range(len(body)))
    for (_stamp, t, rh, p), i in zip(body, indices):
        row = urban_rows[i]
        assert float(t) == row.temperature_c                   # 0.01 °C output, 2-decimal data
        assert abs(float(rh) - row.humidity_rh) <= 0.01
        assert abs(float(p) - 100500.0) <= 2.62                # x1: 16-bit pressure
    samples = [e for e in events if e.kind == ipc.SAMPLE]
    assert len(samples) == len(body)
    assert set(samples[0].values) == {"temperature_celsius", "relative_humidity_percent", "pressure_pascals"}
    assert samples[0].sensor == "hive_air"


def test_worker_pressure_from_a_replay_column(tmp_path):
    csv_file = tmp_path / "weather.csv"
    csv_file.write_text("Date,temperature,humidity,pressure\n"
                        "2021-06-19T00:00:00Z,20.5,60.0,99850.5\n"
                        "2021-06-19T00:15:00Z,20.25,61.0,99790.0\n")
    table = sensor_table(temperature_oversampling=16, pressure_oversampling=16, humidity_oversampling=16)
    table["replay"] = {"file": str(csv_file), "pressure_column": "pressure", "speedup": 0.0}
    h = Harness(tmp_path, "hive_air", table)
    h.run(captures=2)
    _path, table, meta = h.record()
    got = [(float(t), float(p)) for _s, t, _rh, p in table[1:3]]
    assert got[0][0] == 20.5 and abs(got[0][1] - 99850.5) <= 0.2
    assert got[1][0] == 20.25 and abs(got[1][1] - 99790.0) <= 0.2
    assert meta["oversampling"] == {"temperature": 16, "pressure": 16, "humidity": 16}


def test_worker_retries_bus_errors_and_counts_them(tmp_path, urban_rows):
    h = Harness(tmp_path, "hive_air", sensor_table())
    h.worker.chip.nack_next = 2
    h.run(captures=2)
    assert h.failure is None
    _path, table, meta = h.record()
    assert meta["errors"] == 2 and meta["missed"] == 0
    for (_s, t, _rh, _p), i in zip(table[1:], expand(meta["replay"]["rows"])):
        assert float(t) == urban_rows[i].temperature_c


def test_worker_persistent_failure_exits_without_inventing_readings(tmp_path):
    h = Harness(tmp_path, "hive_air", sensor_table(max_retries=0))
    h.worker.chip.nack_next = 10_000
    events = h.run(captures=5)
    assert isinstance(h.failure, SensorFailure), h.failure
    assert h.records() == []
    assert not any(e.kind == ipc.SAMPLE for e in events)
    assert sum(e.kind == ipc.ERROR for e in events) == 5


def test_worker_on_a_wrong_chip_exits(tmp_path):
    h = Harness(tmp_path, "hive_air", sensor_table())
    h.worker.chip.chip_id = 0x58
    h.worker.chip.regs[drv.REG_ID] = 0x58
    h.run(captures=1)
    assert isinstance(h.failure, WrongChipError)
    assert h.records() == []


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("over,key", [
    ({"pressure_oversampling": 3}, "pressure_oversampling"),
    ({"temperature_oversampling": 0}, "temperature_oversampling"),
    ({"address": 0x44}, "address"),
    ({"record_window_s": 1.0, "interval_s": 5.0}, "record_window_s"),
    ({"pressure_pa": 5.0}, "pressure_pa"),
    ({"replay": {"file": str(URBAN), "pressure_column": "pressure"}}, "replay.pressure_column"),
], ids=["osrs-3", "osrs-t-skip", "address", "window", "pressure-pa", "no-pressure-column"])
def test_bad_bme280_config_names_the_key(tmp_path, over, key):
    path = write_config(tmp_path, "hive_air", sensor_table(**over))
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.key == f"sensors.hive_air.{key}", info.value


def test_check_config_exits_78_naming_the_oversampling_key(tmp_path):
    path = write_config(tmp_path, "hive_air", sensor_table(humidity_oversampling=3))
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == config.EX_CONFIG, r.stderr
    assert len(r.stderr.splitlines()) == 1 and str(path) in r.stderr
    assert "sensors.hive_air.humidity_oversampling" in r.stderr and "allowed: 0, 1, 2, 4, 8, 16" in r.stderr
