"""DS18B20 probes through the kernel's ``w1_therm`` sysfs files, and their worker.

The answer's format and checks (CRC-8, configuration byte, the 85 °C power-on value) are in
:mod:`.chip`. The devices directory is ``/sys/bus/w1/devices`` on a Pi, or with ``backend =
"simulated"`` the tree :func:`beemond.sensors.seams.w1_devices` writes (:mod:`.emulator`).

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
import time
from pathlib import Path

from beemond import ipc
from beemond.sensors import seams
from beemond.sensors.ds18b20.chip import parse_w1_slave
from beemond.sensors.base import READ_RETRY, PolledSensorWorker, ranges

log = logging.getLogger(__name__)

SYSFS_DEVICES = seams.SYSFS_W1_DEVICES
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
        self._tags: dict[str, object] = {}        # simulated: position -> replay row last converted
        self._good_tags: dict[str, object] = {}
        self.devices = seams.w1_devices(sensor)
        self.tree = self.devices.tree   # simulated: the emulated kernel tree (None on hardware)
        self.w1 = W1Therm(self.devices.base)

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
                time.sleep(READ_RETRY.delay(attempt + 1))   # the worker's own backoff schedule
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
        self.devices.close()
