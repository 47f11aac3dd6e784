"""Per-reading cost of the BME280 and DS18B20 drivers (pure Python on a Pi's CPU budget).

Prints the time of one BME280 forced measurement through the emulated bus (dominated by the
datasheet's maximum measurement time, 9.3 ms at x1, which the driver sleeps), the CPU time of the
integer compensation, of the emulator's inverse (simulated backend only), and of one DS18B20 read
from a w1_slave file in a temporary tree. Ends with one line of key=value pairs.

    .venv/bin/python bench/sensors.py [--n 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from beemond.sensors.bme280 import driver as drv
from beemond.sensors.ds18b20.driver import W1Therm, parse_w1_slave
from beemond.sensors.bme280.emulator import TYPICAL, BME280Chip, raw_from_values
from beemond.sensors.emulated_i2c import EmulatedSMBus
from beemond.sensors.ds18b20.emulator import W1Tree


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    n = ap.parse_args().n

    chip = BME280Chip(lambda: (34.5, 100800.0, 55.0, None))
    dev = drv.BME280(EmulatedSMBus(1, {0x76: chip}), 0x76)
    dev.begin()
    measure_ms = per_call_us(dev.measure, 50) / 1000
    adc = raw_from_values(TYPICAL, 34.5, 100800.0, 55.0)

    def compensate():
        t, t_fine = drv.compensate_temperature(TYPICAL, adc[0])
        drv.compensate_pressure(TYPICAL, adc[1], t_fine)
        drv.compensate_humidity(TYPICAL, adc[2], t_fine)

    compensate_us = per_call_us(compensate, n)
    invert_us = per_call_us(lambda: raw_from_values(TYPICAL, 34.5, 100800.0, 55.0), max(1, n // 10))

    with tempfile.TemporaryDirectory() as d:
        tree = W1Tree(Path(d))
        tree.write("28-0316a2794eff", 23.125)
        text = (Path(d) / "28-0316a2794eff" / "w1_slave").read_text()
        parse_us = per_call_us(lambda: parse_w1_slave(text), n)
        w1 = W1Therm(Path(d))
        read_us = per_call_us(lambda: w1.read("28-0316a2794eff"), n)

    print(f"BME280 forced measurement through the emulated bus, x1: {measure_ms:.2f} ms "
          f"(datasheet 9.1 maximum {drv.measurement_time_s(1, 1, 1) * 1000:.2f} ms)")
    print(f"BME280 integer compensation T+P+H: {compensate_us:.1f} us per reading")
    print(f"BME280 emulator inverse (simulated backend): {invert_us:.0f} us per reading")
    print(f"DS18B20 w1_slave parse: {parse_us:.1f} us; file read + parse: {read_us:.1f} us "
          "(the kernel's conversion adds ~750 ms on a Pi)")
    print(f"bme280_measure_ms={measure_ms:.2f} bme280_compensate_us={compensate_us:.1f} "
          f"bme280_invert_us={invert_us:.0f} ds18b20_parse_us={parse_us:.1f} ds18b20_read_us={read_us:.1f}")


if __name__ == "__main__":
    main()
