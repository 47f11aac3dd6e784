"""Register-level emulation of a Bosch BME280 behind :class:`EmulatedSMBus`.

Follows the BME280 datasheet (BST-BME280-DS002) register map (5.4): chip id 0x60 at 0xD0, soft
reset (0xB6 to 0xE0; ``im_update`` in status for the 2 ms NVM copy, table 1), ``ctrl_hum`` 0xF2
(latched by the next ``ctrl_meas`` write, 5.4.3), status 0xF3 (bit 3 ``measuring``), ``ctrl_meas``
0xF4, ``config`` 0xF5, data 0xF7..0xFE (reset value 0x80000 / 0x8000, also the value of a skipped
measurement) and the calibration words at 0x88..0xA1 and 0xE1..0xE7 packed as in table 16. I2C
protocol (6.2): a write is a register address followed by (value, next address, value, ...) pairs;
a read returns bytes from the last address written, auto-incrementing.

A forced measurement (3.3.3) samples *source* (``() -> (°C, Pa, %RH, tag)``) and turns the wanted
values into raw ADC words by inverting the datasheet's integer compensation (bisection on the
monotonic formulas of :mod:`beemond.sensors.bme280.driver`), at the resolution the oversampling gives
(16 bit + one bit per doubling, 3.4.2/3.4.3, IIR filter off). The data registers change only
when the measurement time (9.1) is over; until then status bit 3 is set and reads return the
previous values, as the chip's data shadowing does.

Tests: ``fixed_raw`` makes measurements report given ADC words. Fault injection: ``nack_next``
(EREMOTEIO on the next N transfers), ``stuck_measuring`` (a conversion that never ends),
``reset_during_next`` (a brown-out between trigger and read: the data registers are back at their
reset values).
"""

from __future__ import annotations

import errno
import os
import time

from beemond.sensors.bme280 import chip as spec
from beemond.sensors.bme280.chip import Calibration

# Trimming parameters of a real part, from the register dump in the bme280-rs crate's tests
# (github.com/claudiomattera/bme280-rs, src/calibration.rs, TEST_CALIBRATION_DATA).
TYPICAL = Calibration(dig_T1=28593, dig_T2=27182, dig_T3=50, dig_P1=36834, dig_P2=-10486, dig_P3=3024,
                      dig_P4=8053, dig_P5=-59, dig_P6=-7, dig_P7=9900, dig_P8=-10230, dig_P9=4285,
                      dig_H1=75, dig_H2=375, dig_H3=0, dig_H4=288, dig_H5=50, dig_H6=30)
_CODE_TO_OSRS = {code: factor for factor, code in spec.OSRS.items()}
_CODE_TO_OSRS.update({0b110: 16, 0b111: 16})   # 5.4.3/5.4.5: codes above 101 also mean x16


def _search(f, lo: int, hi: int, target: float) -> int:
    """The integer x in [lo, hi] whose monotonic f(x) is closest to *target*."""
    rising = f(hi) >= f(lo)
    a, b = lo, hi
    while b - a > 1:
        mid = (a + b) // 2
        if (f(mid) < target) == rising:
            a = mid
        else:
            b = mid
    return min((a, b), key=lambda x: abs(f(x) - target))


def raw_from_values(cal: Calibration, temperature_c: float, pressure_pa: float | None,
                    humidity_rh: float | None, bits_t: int = 20, bits_p: int = 20) -> tuple[int, int, int]:
    """The ADC words ``(adc_T, adc_P, adc_H)`` whose compensation gives the wanted values; ``bits_*``
    is the ADC resolution (16..20), the low bits of a 20-bit word being zero below 20."""
    st, sp = 20 - bits_t, 20 - bits_p
    kt = _search(lambda k: spec.compensate_temperature(cal, k << st)[0], 0, (1 << bits_t) - 1,
                 temperature_c * 100.0)
    adc_t = kt << st
    t_fine = spec.compensate_temperature(cal, adc_t)[1]
    adc_p = spec.SKIPPED_20BIT
    if pressure_pa is not None:
        kp = _search(lambda k: spec.compensate_pressure(cal, k << sp, t_fine), 0, (1 << bits_p) - 1,
                     pressure_pa * 256.0)
        adc_p = kp << sp
    adc_h = spec.SKIPPED_16BIT
    if humidity_rh is not None:
        adc_h = _search(lambda k: spec.compensate_humidity(cal, k, t_fine), 0, 0xFFFF, humidity_rh * 1024.0)
    return adc_t, adc_p, adc_h


def _osrs_bits(factor: int) -> int:
    return 16 + factor.bit_length() - 1      # x1: 16 bit ... x16: 20 bit


class BME280Chip:
    def __init__(self, source, calibration: Calibration = TYPICAL, chip_id: int = spec.CHIP_ID,
                 raw_calibration: tuple[bytes, bytes] | None = None, clock=time.monotonic):
        self.source = source
        self.clock = clock
        self.chip_id = chip_id
        lo, hi = raw_calibration or calibration.to_registers()
        self.calibration = Calibration.from_registers(lo, hi)
        self.nvm = {spec.REG_CALIB00 + i: b for i, b in enumerate(lo)}
        self.nvm.update({spec.REG_CALIB26 + i: b for i, b in enumerate(hi)})
        self.regs = bytearray(256)
        self.pointer = 0
        self._pending: tuple[float, bytes] | None = None   # (ready at, data registers)
        self._nvm_until = 0.0
        self.nack_next = 0
        self.stuck_measuring = False
        self.reset_during_next = False
        self.fixed_raw: tuple[int, int, int] | None = None   # tests: measure these ADC words as they are
        self.served: list = []          # tags of the values measured, in order
        self.measurements = 0
        self._reset()

    def _reset(self) -> None:
        self.regs[:] = bytes(256)
        self.regs[spec.REG_ID] = self.chip_id
        for addr, b in self.nvm.items():
            self.regs[addr] = b
        self.regs[spec.REG_DATA:spec.REG_DATA + 8] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])
        self._pending = None
        self._hum_latched = 0

    # ---- bus side
    def _nack(self) -> None:
        if self.nack_next > 0:
            self.nack_next -= 1
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))

    def write(self, data: bytes) -> None:
        self._nack()
        if not data:
            return
        self.pointer = data[0]
        for i in range(1, len(data), 2):   # 6.2.1: (register, value) pairs
            self._write_register(data[i - 1], data[i])

    def _write_register(self, reg: int, value: int) -> None:
        if reg == spec.REG_RESET:
            if value == spec.RESET_WORD:
                self._reset()
                self._nvm_until = self.clock() + spec.STARTUP_S
        elif reg == spec.REG_CTRL_HUM:
            self.regs[reg] = value & 0x07
        elif reg == spec.REG_CTRL_MEAS:
            self.regs[reg] = value
            self._hum_latched = self.regs[spec.REG_CTRL_HUM]
            if value & 0b11 in (0b01, 0b10):
                self._start_forced(value)
        elif reg == spec.REG_CONFIG:
            self.regs[reg] = value
        # other registers are read-only: writes are ignored, as on the chip

    def _start_forced(self, ctrl_meas: int) -> None:
        osrs_t = _CODE_TO_OSRS.get(ctrl_meas >> 5, 0)
        osrs_p = _CODE_TO_OSRS.get((ctrl_meas >> 2) & 0b111, 0)
        osrs_h = _CODE_TO_OSRS.get(self._hum_latched, 0)
        t, p, rh, tag = self.source()
        self.served.append(tag)
        self.measurements += 1
        if osrs_t == 0:
            adc = (spec.SKIPPED_20BIT, spec.SKIPPED_20BIT, spec.SKIPPED_16BIT)
        elif self.fixed_raw is not None:
            adc = self.fixed_raw
        else:
            adc_t, adc_p, adc_h = raw_from_values(self.calibration, t, p if osrs_p else None,
                                                  rh if osrs_h else None, _osrs_bits(osrs_t),
                                                  _osrs_bits(osrs_p or 1))
            adc = (adc_t, adc_p, adc_h)
        if self.reset_during_next:
            self.reset_during_next = False
            self._reset()
            return
        ready = self.clock() + spec.measurement_time_s(osrs_t, osrs_p, osrs_h)
        self._pending = (ready, _pack(*adc))

    def _update(self) -> None:
        if self._pending and not self.stuck_measuring and self.clock() >= self._pending[0]:
            self.regs[spec.REG_DATA:spec.REG_DATA + 8] = self._pending[1]
            self._pending = None
            self.regs[spec.REG_CTRL_MEAS] &= ~0b11   # back to sleep mode after a forced measurement

    def read(self, length: int) -> bytes:
        self._nack()
        self._update()
        out = bytearray()
        for i in range(length):
            addr = (self.pointer + i) & 0xFF
            if addr == spec.REG_STATUS:
                status = spec.STATUS_MEASURING if self._pending else 0
                status |= spec.STATUS_IM_UPDATE if self.clock() < self._nvm_until else 0
                out.append(status)
            elif addr in self.nvm and self.clock() < self._nvm_until:
                out.append(0)       # NVM still being copied to the image registers
            else:
                out.append(self.regs[addr])
        self.pointer = (self.pointer + length) & 0xFF
        return bytes(out)


def _pack(adc_t: int, adc_p: int, adc_h: int) -> bytes:
    return bytes([adc_p >> 12 & 0xFF, adc_p >> 4 & 0xFF, (adc_p & 0x0F) << 4,
                  adc_t >> 12 & 0xFF, adc_t >> 4 & 0xFF, (adc_t & 0x0F) << 4,
                  adc_h >> 8 & 0xFF, adc_h & 0xFF])


def emulated_chip(sensor, replay) -> BME280Chip:
    """The chip a simulated BME280 sensor reads (:func:`beemond.sensors.seams.i2c_bus`): each forced
    measurement takes the replay's next row; without a pressure column, the sensor's ``pressure_pa``."""
    fixed = sensor.pressure_pa

    def source():
        row = replay.next_row()
        return row.temperature_c, row.get("pressure_pa", fixed), row.humidity_rh, row.index

    return BME280Chip(source)
