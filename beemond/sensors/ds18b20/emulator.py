"""A directory tree in the format of the kernel's 1-Wire sysfs (``/sys/bus/w1/devices``) with
emulated DS18B20 probes behind it.

Each probe is ``BASE/28-xxxxxxxxxxxx/w1_slave`` holding what ``w1_therm``'s ``w1_slave_show``
prints (drivers/w1/slaves/w1_therm.c): the nine scratchpad bytes as ``"%02x "``, then
``": crc=%02x YES|NO"``; on the second line the last scratchpad that passed the CRC and ``t=`` in
m°C computed from the bytes just read (``raw * 1000 / 16``, truncated as C does). Scratchpad layout
per the DS18B20 datasheet (memory map): temperature LSB/MSB (1/16 °C, two's complement), TH 0x4B,
TL 0x46, configuration 0x7F (12-bit), 0xFF, a reserved byte, 0x10, and the Dallas CRC-8.

:meth:`W1Tree.convert` plays the part of the kernel's conversion-on-read: it writes the probe's next
value (from a replay source) or the next queued fault. Faults (``W1Tree.faults[rom]``, consumed in
order): ``"no"`` (a bit flipped on the wire: the kernel's CRC fails, verdict NO), ``"zeros"`` (data
line stuck low: nine zero bytes, whose CRC is 0, so YES and t=0), ``"power_on"`` (the 85 °C reset
value ``50 05 ... t=85000``), ``"empty"`` (a newer kernel's empty answer when the read failed),
``"corrupt_yes"`` (bytes that do not match a YES verdict), ``"beyond_range"`` (a good CRC around
126 °C, which the register holds but no DS18B20 measures), ``"missing"`` (the device directory is
gone until the next good conversion).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from beemond.sensors.ds18b20.chip import crc8

POWER_ON_SCRATCHPAD = bytes.fromhex("50054b467fff0c101c")


def scratchpad(temperature_c: float, beyond_range: bool = False) -> bytes:
    """The nine scratchpad bytes of a 12-bit conversion of *temperature_c*; *beyond_range*: any
    value the 16-bit register holds (a faulty probe), not only what the chip can measure."""
    raw = round(temperature_c * 16)
    if not beyond_range and not -55 * 16 <= raw <= 125 * 16:
        raise ValueError(f"{temperature_c} °C is outside the DS18B20's -55..125 °C")
    body = raw.to_bytes(2, "little", signed=True) + bytes([0x4B, 0x46, 0x7F, 0xFF, 0x10 - (raw & 0x0F), 0x10])
    return body + bytes([crc8(body)])


def kernel_millidegrees(scratch: bytes) -> int:
    """``t=`` as the kernel computes it for a 12-bit DS18B20: ``raw * 1000 / 16`` in C arithmetic."""
    raw = int.from_bytes(scratch[0:2], "little", signed=True)
    q = abs(raw) * 1000 // 16
    return q if raw >= 0 else -q


def w1_slave_text(read: bytes, last_good: bytes | None = None) -> str:
    """The two lines of ``w1_slave`` after reading the scratchpad *read* (the kernel's own verdict)."""
    crc = crc8(read[:8])
    ok = crc == read[8]
    shown = read if ok else (last_good or bytes(9))
    hexes = "".join(f"{b:02x} " for b in read)
    return (f"{hexes}: crc={crc:02x} {'YES' if ok else 'NO'}\n"
            f"{''.join(f'{b:02x} ' for b in shown)}t={kernel_millidegrees(read)}\n")


class W1Tree:
    def __init__(self, base: Path, sources: dict | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.sources = dict(sources or {})            # rom id -> () -> (°C, tag)
        self.faults: dict[str, list[str]] = {}         # rom id -> queued faults
        self.last_good: dict[str, bytes] = {}
        self.conversions = 0
        self.conversion_s = 0.0      # how long a conversion blocks the reader (the kernel's ~750 ms at 12 bit)

    @classmethod
    def from_replay(cls, base: Path, sensor) -> "W1Tree":
        """Probes of a simulated ``DS18B20Config``, each driven by the replay rows selected by its
        ``replay_filter_values`` entry (default: the replay's own filter)."""
        from beemond.sensors.replay import CsvReplay

        sources, replays = {}, {}
        for position, rom in sensor.probes.items():
            rc = sensor.replay
            if position in sensor.replay_filter_values:
                rc = dataclasses.replace(rc, filter_value=sensor.replay_filter_values[position])
            replay = replays[position] = CsvReplay.from_config(rc, sensor.replay_columns())

            def source(replay=replay):
                row = replay.next_row()
                return row.temperature_c, row.index
            sources[rom] = source
        tree = cls(base, sources)
        tree.replays = replays   # position -> CsvReplay (the worker keeps their positions)
        return tree

    def _write(self, rom: str, text: str) -> None:
        d = self.base / rom
        d.mkdir(exist_ok=True)
        tmp = d / ".w1_slave.tmp"
        tmp.write_text(text, encoding="ascii")
        os.replace(tmp, d / "w1_slave")     # a reader sees the old or the new answer, never half

    def write(self, rom: str, temperature_c: float) -> None:
        """A good conversion of *temperature_c* on probe *rom*."""
        read = scratchpad(temperature_c)
        self.last_good[rom] = read
        self._write(rom, w1_slave_text(read))

    def write_fault(self, rom: str, kind: str) -> None:
        last = self.last_good.get(rom)
        if kind == "no":
            read = bytearray(last or scratchpad(20.0))
            read[0] ^= 0x04
            self._write(rom, w1_slave_text(bytes(read), last))
        elif kind == "zeros":
            self._write(rom, w1_slave_text(bytes(9), last))
        elif kind == "power_on":
            self._write(rom, w1_slave_text(POWER_ON_SCRATCHPAD, last))
        elif kind == "beyond_range":   # a good CRC around a value no DS18B20 measures
            self._write(rom, w1_slave_text(scratchpad(126.0, beyond_range=True), last))
        elif kind == "empty":
            self._write(rom, "")
        elif kind == "corrupt_yes":
            good = bytearray(last or scratchpad(20.0))
            good[0] ^= 0x04
            hexes = "".join(f"{b:02x} " for b in good)
            self._write(rom, f"{hexes}: crc={good[8]:02x} YES\n{hexes}t={kernel_millidegrees(good)}\n")
        elif kind == "missing":
            self.remove(rom)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def remove(self, rom: str) -> None:
        """Unplug probe *rom*: its directory disappears, as when the kernel drops a silent slave."""
        shutil.rmtree(self.base / rom, ignore_errors=True)

    def convert(self, rom: str):
        """Emulate the conversion the kernel runs when ``w1_slave`` is read; returns the tag of the
        value written (None for a fault or a probe without a source)."""
        self.conversions += 1
        if self.conversion_s:
            time.sleep(self.conversion_s)
        queued = self.faults.get(rom)
        if queued:
            self.write_fault(rom, queued.pop(0))
            return None
        if rom not in self.sources:
            return None
        temperature_c, tag = self.sources[rom]()
        self.write(rom, temperature_c)
        return tag
