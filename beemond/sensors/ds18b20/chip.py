"""Maxim DS18B20 1-Wire temperature probes: the ``w1_slave`` format, the CRC and the checks on an answer.

The kernel (``drivers/w1/slaves/w1_therm.c``, ``w1_slave_show``) runs a conversion on every read of
``/sys/bus/w1/devices/28-*/w1_slave`` (~750 ms at 12-bit resolution) and answers with two lines::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

Line 1: the nine scratchpad bytes just read, the CRC the kernel computed over the first eight, and
its verdict. Line 2: the last scratchpad that passed, and ``t=`` in m°C. On a failed CRC (``NO``)
line 2 still carries a ``t=``, computed from the bytes that failed or from an older read, so it is
never used: the read is an error (retried by the worker, then counted), never a value.

The driver checks more than the kernel's verdict, because a stuck bus can pass it:

- the Dallas/Maxim CRC-8 (x^8 + x^5 + x^4 + 1, reflected, init 0; DS18B20 datasheet "CRC
  generation", Maxim application note 27) of the bytes, recomputed here;
- the configuration register (byte 4) has its fixed bits (``0 R1 R0 1 1 1 1 1``, datasheet figure
  10): a line held low reads nine zero bytes whose CRC is also zero, i.e. "YES" and ``t=0``;
- the power-on reset value, +85 °C with scratchpad bytes ``50 05`` (datasheet table 1 note): the
  probe lost power or reset (a parasite-powered probe that browned out during the conversion) and
  reported its reset register instead of a measurement. In a hive 85 °C is not a temperature, and
  it is indistinguishable from a real one only in theory, so it is an error.

Shared by the driver (:mod:`.driver`) and the emulator (:mod:`.emulator`).
"""

from __future__ import annotations

import errno
import re

from beemond.errors import TransientSensorError

POWER_ON_RAW = 0x0550          # +85 °C, the temperature register's reset value
_LINE1 = re.compile(r"^((?:[0-9a-f]{2} ){9}): crc=([0-9a-f]{2}) (YES|NO)$")
_LINE2 = re.compile(r"^((?:[0-9a-f]{2} ){9})t=(-?\d+)$")


class ProbeError(TransientSensorError):
    """A w1_slave answer that is not a valid measurement (failed CRC, garbage, reset value)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return self.strerror


def crc8(data: bytes) -> int:
    """Dallas/Maxim 1-Wire CRC-8 of *data* (AN27). The CRC of a valid scratchpad including its CRC
    byte is 0; ``crc8(bytes.fromhex("72014b467fff0e10")) == 0x57``."""
    crc = 0
    for byte in data:
        for _ in range(8):
            mix = (crc ^ byte) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            byte >>= 1
    return crc


def parse_w1_slave(text: str) -> float:
    """Temperature in °C from the text of a ``w1_slave`` file. Raises :class:`ProbeError`."""
    lines = text.splitlines()
    if len(lines) < 2:
        # A newer kernel answers nothing when the conversion could not be read.
        raise ProbeError(f"short answer from w1_slave: {text!r}")
    m1, m2 = _LINE1.match(lines[0]), _LINE2.match(lines[1])
    if not m1 or not m2:
        raise ProbeError(f"unexpected w1_slave format: {text!r}")
    if m1.group(3) != "YES":
        raise ProbeError(f"CRC check failed (crc={m1.group(2)} NO): {lines[0]}")
    scratch = bytes.fromhex(m1.group(1))
    if crc8(scratch) != 0:
        raise ProbeError(f"scratchpad CRC mismatch despite YES: {lines[0]}")
    if scratch[4] & 0x9F != 0x1F:
        raise ProbeError(f"configuration byte 0x{scratch[4]:02x} is not a DS18B20's: {lines[0]}")
    if m2.group(1) != m1.group(1):
        raise ProbeError(f"w1_slave lines disagree: {text!r}")
    raw = int.from_bytes(scratch[0:2], "little", signed=True)
    milli = int(m2.group(2))
    if raw == POWER_ON_RAW:
        raise ProbeError("85 °C power-on reset value: the probe reset instead of converting")
    if abs(milli / 1000.0 - raw / 16.0) > 0.5:   # 0.5 °C: the coarsest (9-bit) resolution
        raise ProbeError(f"t={milli} disagrees with the scratchpad ({raw / 16.0} °C)")
    return milli / 1000.0
