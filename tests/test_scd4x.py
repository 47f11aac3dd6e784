"""The SCD4x package (beemond.sensors.scd4x) through its real seam: the driver builds real
``smbus2.i2c_msg`` transfers and sends them through ``EmulatedSMBus`` to the command-level chip
emulator. Waits run on a virtual clock shared by driver and chip, so the datasheet's 5 s measurements
take no wall time. Reference values: the CRC examples of the SCD4x datasheet v1.3 (3.11, table 32:
CRC(0xBEEF) = 0x92; 3.7.1 and 3.7.2 examples) and its read_measurement example (3.5.2)."""

from __future__ import annotations

import errno
import math
from datetime import datetime, timedelta, timezone

import pytest
from smbus2 import i2c_msg

from beemond.sensors.emulators.i2c import EmulatedSMBus
from beemond.sensors.scd4x import chip
from beemond.sensors.scd4x.driver import SCD4x, SCD4xReader
from beemond.sensors.scd4x.emulator import STATUS_NOT_READY, STATUS_READY, SCD4xChip
from beemond.sensors.scd4x.source import RespirationCurve


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
