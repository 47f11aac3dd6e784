"""Maxim DS18B20 1-Wire temperature probes, read through the Linux kernel's ``w1_therm`` sysfs files.

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

Plausibility: the DS18B20 measures -55...+125 °C (datasheet, "Benefits and Features" and table 1
"Temperature/Data Relationship", whose rows end at those two values). A value outside is rejected
and counted by the polled worker (``beemond.sensors.base``); probes are independent devices, so
only that probe's cell is left empty.

Missing devices raise ``FileNotFoundError`` (an ``OSError``); every error here is an ``OSError``
so the polled worker's retry, count and restart rules (``beemond.sensors.base``) apply.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from beemond import ipc
from beemond.sensors.base import PolledSensorWorker, ranges
from beemond.errors import TransientSensorError

log = logging.getLogger(__name__)

SYSFS_DEVICES = Path("/sys/bus/w1/devices")
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


class W1Therm:
    """DS18B20 probes under a sysfs devices directory (*base* has one ``28-*`` directory per probe)."""

    def __init__(self, base: Path = SYSFS_DEVICES):
        self.base = Path(base)

    def path(self, rom_id: str) -> Path:
        return self.base / rom_id / "w1_slave"

    def read(self, rom_id: str) -> float:
        """One conversion of probe *rom_id*, in °C. Raises ``OSError`` (:class:`ProbeError`,
        ``FileNotFoundError`` for a missing probe)."""
        try:
            text = self.path(rom_id).read_text(encoding="ascii", errors="replace")
        except FileNotFoundError as e:
            if not self.base.is_dir():   # no bus at all, not one probe gone
                e.strerror = f"no 1-Wire bus at {self.base} (w1-gpio overlay not loaded?)"
            raise
        return parse_w1_slave(text)

    def present(self) -> list[str]:
        """ROM ids of the DS18B20s the kernel lists (family code 28)."""
        return sorted(p.name for p in self.base.glob("28-*"))


class DS18B20Worker(PolledSensorWorker):
    """Several DS18B20 probes (in-hive positions) as one sensor: CSV records with one column per
    position in °C, an empty cell for a probe that failed (never a carried-forward value)."""

    reject_per_value = True   # one probe's impossible value does not cast doubt on the others

    def __init__(self, cfg, sensor, channel):
        super().__init__(cfg, sensor, channel)
        self.positions = tuple(sensor.probes)
        self.columns = tuple(f"{p}_c" for p in self.positions)
        self.quantities = ("temperature_celsius",) * len(self.positions)
        self.limits = ((-55.0, 125.0),) * len(self.positions)   # datasheet table 1
        self.probe_errors = dict.fromkeys(self.positions, 0)   # since the last record
        self.tree = None
        self._tags: dict[str, object] = {}        # simulated: position -> replay row last converted
        self._good_tags: dict[str, object] = {}
        base = sensor.base_path
        self._scratch_dir: str | None = None
        if sensor.backend == "simulated":
            from beemond.sensors.emulators.w1 import W1Tree

            if base is None:
                # Not in the spool: the spool is the durable queue, and a stand-in for sysfs is
                # neither data nor worth SD-card writes. Removed at close().
                self._scratch_dir = tempfile.mkdtemp(prefix=f"beemond-w1-{sensor.name}-")
                base = Path(self._scratch_dir)
            self.tree = W1Tree.from_replay(base, sensor)
        self.w1 = W1Therm(base or SYSFS_DEVICES)

    def _read_probe(self, position: str) -> float:
        rom = self.sensor.probes[position]
        # Each read blocks for a conversion (~750 ms): many probes times their retries can outlast
        # heartbeat_timeout_s, and a worker that is only slow must not be killed as hung.
        self.channel.beat()
        if self.tree is not None:
            # the emulated kernel converts on each read, as the real one does
            self._tags[position] = self.tree.convert(rom)
        return self.w1.read(rom)

    def read(self) -> tuple:
        """One value per position; ``None`` for a probe that failed all its attempts. Raises
        ``OSError`` when every probe failed (the worker retries and counts the whole measurement)."""
        values: dict[str, float | None] = dict.fromkeys(self.positions)
        failures: dict[str, OSError] = {}
        pending = list(self.positions)
        for attempt in range(self.sensor.max_retries + 1):
            for position in pending:
                try:
                    values[position] = self._read_probe(position)
                    failures.pop(position, None)
                except OSError as e:
                    failures[position] = e
            pending = [p for p in self.positions if values[p] is None]
            if not pending or len(pending) == len(self.positions):
                break   # all good, or all failed: the worker's own retry takes over
            for position in pending:
                self.errors += 1
                self.probe_errors[position] += 1
            if attempt < self.sensor.max_retries:
                time.sleep(min(0.5, 0.02 * 2 ** attempt))   # the worker's own backoff schedule
        if len(pending) == len(self.positions):
            for position in pending:
                self.probe_errors[position] += 1
            raise OSError(errno.EIO, "every probe failed: " + "; ".join(f"{p}: {e}" for p, e in failures.items()))
        for position in pending:
            # Reported, not only logged: a dead probe among live ones must show in beemond_errors_total
            # and `beemond status` (its series just goes stale otherwise).
            message = (f"probe {position} ({self.sensor.probes[position]}) failed after "
                       f"{self.sensor.max_retries + 1} attempts: {failures[position]}")
            log.warning("%s", message)
            self.channel.send(ipc.ERROR, message=message)
        self._good_tags = {p: self._tags.get(p) for p in self.positions if values[p] is not None}
        return tuple(values[p] for p in self.positions)

    def format_row(self, reading: tuple) -> list[str]:
        return ["" if v is None else f"{v:.3f}" for v in reading]

    def samples(self, reading: tuple) -> list[dict]:
        # One quantity per probe: one SAMPLE per position with a position label, so the positions
        # are separate series (beemond_temperature_celsius{sensor=..., position=...}).
        return [{"sensor": self.sensor.name, "values": {"temperature_celsius": v}, "labels": {"position": p}}
                for p, v in zip(self.positions, reading) if v is not None]

    def replay_position(self) -> dict | None:
        if self.tree is None:
            return None
        return {p: pos for p, r in self.tree.replays.items() if (pos := r.position()) is not None} or None

    def resume_replay(self, position: dict) -> None:
        if self.tree is not None:
            for p, pos in position.items():
                if p in self.tree.replays:
                    self.tree.replays[p].resume(pos)

    def plausible(self, reading: tuple) -> tuple[tuple | None, list[str]]:
        kept, why = super().plausible(reading)
        if kept is not None:   # a dropped value's replay row is not in the record
            self._good_tags = {p: t for p, t in self._good_tags.items() if kept[self.positions.index(p)] is not None}
        return kept, why

    def tag(self):
        """Simulated: the replay row behind each position's value in the reading just taken."""
        return self._good_tags if self.tree is not None else None

    def extra_metadata(self, readings: list[tuple]) -> dict:
        meta = {"probes": dict(self.sensor.probes), "probe_errors": dict(self.probe_errors),
                "base_path": str(self.w1.base)}
        if self.tree is not None:
            meta["replay"] = {"file": self.sensor.replay.file.name, "rows": {
                p: ranges([t[p] for _, _, t in readings if p in t]) for p in self.positions}}
        return meta

    def flush(self) -> None:
        had = bool(self.readings)
        super().flush()
        if had and not self.readings:   # written: the next record counts its own errors
            self.probe_errors = dict.fromkeys(self.positions, 0)

    def close(self) -> None:
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
