"""The run loop shared by sensors that are polled at an interval (I2C, 1-Wire, serial).

A polled sensor measures every ``interval_s`` on the monotonic clock (no drift, and immune to the
wall-clock jumps of a Pi without an RTC), stamps each reading with UTC wall time (:class:`beemond.core.clock.Clock`: never backwards, even when
the clock of a Pi without an RTC steps back), and batches the
readings of a ``record_window_s`` into one CSV record in ``spool/staging/<sensor>/``.

Transient errors (``OSError``: bus errors, CRC mismatches) are retried a few times with a short
backoff and counted; a measurement that still fails is logged and recorded as missing (never
invented or carried forward). After ``MAX_CONSECUTIVE_FAILURES`` failed measurements in a row the
worker exits non-zero and the orchestrator restarts it with backoff.

Physical plausibility: a value that is NaN, infinite, or outside its column's range in ``limits``
(each driver's datasheet range) is rejected: logged, reported as an ERROR event, counted in the
record's ``rejected`` metadata and ``beemond_readings_rejected_total``, and never recorded or sent
as a SAMPLE (so never seen by processors or metrics). The whole reading goes, except for drivers
whose values come from independent devices (``reject_per_value``: DS18B20 probes), where only the
implausible value's cell is left empty.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time

from beemond import ipc, reading_journal as rj
from beemond.core.clock import Backoff, Clock, parse_iso, utc_iso
from beemond.records import stage, staged_metadata, staged_name, staged_twin, write_staged
from beemond.sensors import seams
from beemond.sensors.periodic import PeriodicValuePoller
from beemond.errors import PersistentSensorError, SensorError
from beemond.sensors.power import power_switch
from beemond.spool import Spool
from beemond.worker import Worker

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 5
READ_RETRY = Backoff(0.02, 0.5)   # between read attempts of one measurement (s): 20, 40, 80 ms ... 0.5 s
MAX_HELD_READINGS = 100_000   # readings kept in memory while records cannot be written (~10 MB)


class MeasurementInterrupted(SensorError):
    """A measurement given up during a long wait because a command is waiting (a stop, pause or
    shutdown must not wait for a sensor's 5 s conversion). Not a failure: nothing is counted."""


class SensorFailure(PersistentSensorError):
    """The device failed persistently; the worker exits so the orchestrator restarts it."""


class PolledSensorWorker(Worker):
    """Subclasses set ``columns`` and implement :meth:`read` (one reading as a tuple of floats)."""

    columns: tuple[str, ...] = ()
    # Each column's quantity with its base unit, as sent in SAMPLE events and exported as metrics
    # (e.g. "temperature_celsius"); "" for a column that is not a quantity.
    quantities: tuple[str, ...] = ()
    # Each column's physical range (low, high) in its unit, from the datasheet; None (or a column
    # past the end): any finite number. Checked by :meth:`plausible`.
    limits: tuple[tuple[float, float] | None, ...] = ()
    reject_per_value = False   # True: an implausible value empties only its own cell
    ext = "csv"
    max_held_readings = MAX_HELD_READINGS   # per worker class (a test subclass may hold fewer)

    def __init__(self, cfg, sensor, channel: ipc.Channel, clock: Clock | None = None):
        self.cfg = cfg
        # The wall-clock source of every stamp; a test passes a Clock with its own time functions.
        self.clock = clock or Clock()
        self.unsynchronized = 0   # readings of the open window stamped before the clock was synchronised
        self.clamped_at_open = 0
        self.sensor = sensor
        self.name = sensor.name   # the owner of its records (beemond.records)
        self.channel = channel
        self.staging = Spool(cfg.spool).staging_dir(sensor.name)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.template = cfg.template_for(sensor)
        self.readings: list[tuple] = []
        self.window_opened: float | None = None   # monotonic
        self.errors = 0
        self.missed = 0
        self.rejected = 0          # implausible values since the last record
        self.consecutive_failures = 0
        self.paused = False
        # power_pin: the sensor's supply is switched on power_lead_s before each measurement, off after
        self.power = power_switch(sensor, channel.beat)
        # Every reading is also appended to this journal, durable within journal_sync_s (power cuts).
        self.journal = rj.ReadingJournal(Spool(cfg.spool).journal_path(sensor.name), cfg.daemon.journal_sync_s)
        self.restart_gap: dict | None = None   # {"last": ISO|None} until the run's first record is written

    # -- for subclasses
    def read(self) -> tuple:
        raise NotImplementedError

    def format_row(self, reading: tuple) -> list[str]:
        return [f"{v:.2f}" for v in reading]

    def tag(self):
        """Per-reading provenance kept beside the reading (the simulated backend's replayed row)."""
        return None

    def extra_metadata(self, readings: list[tuple]) -> dict:
        """Metadata of a record made of *readings* ((UTC time, values, tag) each)."""
        return {}

    def samples(self, reading: tuple) -> list[dict]:
        """The data of the SAMPLE events of a good reading (``ipc.SAMPLE``: ``sensor``, ``values``, and
        optional ``labels``). One event by default; a sensor with several probes of one quantity sends
        one per probe, told apart by a label."""
        values = {q: v for q, v in zip(self.quantities, reading) if q and v is not None}
        return [{"sensor": self.sensor.name, "values": values}] if values else []

    def plausible(self, reading: tuple) -> tuple[tuple | None, list[str]]:
        """(*reading* with its implausible values removed, or None to reject it whole; a description
        of each value removed). Floats only: a count or a missing value (None) is not checked."""
        kept, why = list(reading), []
        for i, (column, value) in enumerate(zip(self.columns, reading)):
            if not isinstance(value, float):
                continue
            lim = self.limits[i] if i < len(self.limits) else None
            if math.isfinite(value) and (lim is None or lim[0] <= value <= lim[1]):
                continue
            why.append(f"{column}={value:g} " + (f"outside {lim[0]:g}..{lim[1]:g}" if lim else "not finite"))
            kept[i] = None
        if not why:
            return reading, why
        if self.reject_per_value and any(v is not None for v in kept):
            return tuple(kept), why
        return None, why

    def on_sample(self, sample: ipc.Sample) -> None:
        """Another sensor's reading, forwarded because ``subscribes_to`` names it."""

    def replay_position(self) -> dict | None:
        """Simulated backend: where the replay stands (JSON), kept in the journal; None otherwise."""
        return None

    def resume_replay(self, position: dict) -> None:
        """Simulated backend: continue the replay from *position* (from :meth:`replay_position`)."""

    def close(self) -> None:
        pass

    # -- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        interval = self.sensor.interval_s
        self.poller = PeriodicValuePoller(interval, self.measure_once)
        log.info("recording every %g s, a record per %g s", interval, self.sensor.record_window_s)
        try:
            self.fold_journal()
        except OSError as e:   # disk full or read-only: the journal stays for the next start
            log.error("cannot fold the reading journal: %s", e)

    def timeout(self) -> float:
        # Paused, the overdue measurement is not taken: waiting for it would be a busy loop.
        deadlines = [] if self.paused else [self.poller.due()]
        if self.window_opened is not None:
            deadlines.append(self.window_opened + self.sensor.record_window_s)
        if self.journal.due() is not None:
            deadlines.append(self.journal.due())
        if not deadlines:
            return super().timeout()   # the channel still wakes us for each heartbeat
        return max(0.0, min(deadlines) - time.monotonic())

    def on_stop(self, cmd: ipc.Stop) -> None:
        self.paused = True
        self.flush()

    def on_start(self, cmd: ipc.Start) -> None:
        self.paused = False
        self.poller.restart()

    def on_capture_now(self, cmd: ipc.CaptureNow) -> None:
        self.measure_once()

    def tick(self) -> None:
        now = time.monotonic()
        if not self.paused and now >= self.poller.due():
            skipped = self.poller.skipped
            self.poller.poll(now)  # measures; the grid stays fixed and a long stall is skipped, not burst
            if self.poller.skipped > skipped:
                log.warning("fell behind by %d interval(s); skipping them", self.poller.skipped - skipped)
        self._journal_sync(now)
        if self.window_opened is not None and now - self.window_opened >= self.sensor.record_window_s:
            self.flush()

    def cleanup(self) -> None:
        try:
            self.flush()
        finally:
            self.journal.close()
            self.close()
            self.power.close()

    def measure_once(self) -> None:
        reading = last_error = None
        with self.power:
            stamp = self.clock.now()  # after the lead: the time the sensor was read
            synced = self.clock.synchronized()
            for attempt in range(self.sensor.max_retries + 1):
                try:
                    reading = self.read()
                    break
                except MeasurementInterrupted:
                    return
                except OSError as e:
                    self.errors += 1
                    last_error = e
                    log.debug("measurement attempt %d failed: %s", attempt + 1, e)
                    if attempt < self.sensor.max_retries:
                        time.sleep(READ_RETRY.delay(attempt + 1))
        if reading is None:
            self.missed += 1
            self.consecutive_failures += 1
            log.warning("measurement failed after %d attempts (%d in a row): %s",
                        self.sensor.max_retries + 1, self.consecutive_failures, last_error)
            self.channel.send(ipc.ERROR, message=f"measurement failed: {last_error}")
            if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise SensorFailure(f"{self.consecutive_failures} measurements in a row failed: {last_error}")
            return
        self.consecutive_failures = 0
        reading, implausible = self.plausible(reading)
        if implausible:  # the device answered, so not a failure; but nothing impossible is recorded
            self.rejected += len(implausible)
            message = f"implausible reading {'rejected' if reading is None else 'values dropped'}: {', '.join(implausible)}"
            log.error("%s", message)
            self.channel.send(ipc.ERROR, message=message)
            if reading is None:
                return
        if self.window_opened is None:
            self.window_opened = time.monotonic()
        if not synced:
            self.unsynchronized += 1
        tag = self.tag()
        self.readings.append((stamp, reading, tag))
        try:
            self.journal.append(rj.entry(stamp, reading, tag, not synced, self.errors, self.missed,
                                         self.replay_position()))
        except OSError as e:   # disk full: the reading is still held in memory and recorded later
            log.warning("cannot journal a reading: %s", e)
        for data in self.samples(reading):
            self.channel.send(ipc.SAMPLE, time=stamp.timestamp(), **data)   # the reading's own time

    def flush(self) -> None:
        """Write the readings of the open window as one record (nothing if there are none)."""
        if not self.readings:
            self.window_opened = None
            return
        readings, self.readings, self.window_opened = self.readings, [], None
        unsynced, self.unsynchronized = self.unsynchronized, 0
        clamped, self.clamped_at_open = self.clock.clamped - self.clamped_at_open, self.clock.clamped
        start, end = readings[0][0], readings[-1][0]
        body, metadata = self._record(readings, self.errors, self.missed, unsynced == 0, self.rejected)
        if clamped:
            metadata["clock_clamped"] = clamped
        if self.restart_gap is not None:
            metadata.update(rj.gap_metadata(self.restart_gap["last"], start))
        try:
            path = write_staged(self, start, end, metadata, data_writer=lambda f: f.write(body))
        except OSError as e:  # disk full, read-only remount: keep the readings and try again later
            kept = readings[-self.max_held_readings:]
            if len(kept) < len(readings):
                # Memory is bounded: the oldest readings go, and that loss is reported, never silent.
                lost = readings[:len(readings) - len(kept)]
                first, last = utc_iso(lost[0][0]), utc_iso(lost[-1][0])
                log.error("record writes keep failing; dropped the %d oldest held reading(s), %s to %s",
                          len(lost), first, last)
                self.channel.send(ipc.ERROR, message=f"dropped {len(lost)} held reading(s) from {first} to {last}: "
                                                     f"record writes keep failing ({e})")
            self.readings = kept + self.readings
            self.window_opened = time.monotonic()
            self.unsynchronized += unsynced
            self.clamped_at_open -= clamped
            log.error("cannot write a record (%s); holding %d reading(s) in memory to retry", e, len(kept))
            self.channel.send(ipc.ERROR, message=f"record write failed: {e}")
            return
        self.errors = self.missed = self.rejected = 0
        self.restart_gap = None
        log.debug("record %s: %d readings", path.name, len(readings))
        self._journal_reset(utc_iso(end))

    def _record(self, readings: list[tuple], errors: int, missed: int, synchronized: bool,
                rejected: int = 0) -> tuple[bytes, dict]:
        """The CSV body and metadata of a record made of *readings* ((UTC time, values, tag) each)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["time", *self.columns])
        for stamp, reading, _tag in readings:
            w.writerow([utc_iso(stamp), *self.format_row(reading)])
        metadata = {
            "sensor": self.sensor.name, "type": self.sensor.type, "backend": self.sensor.backend,
            "start": utc_iso(readings[0][0]), "end": utc_iso(readings[-1][0]),
            "rows": len(readings), "columns": ["time", *self.columns], "errors": errors, "missed": missed,
            "rejected": rejected, "clock_synchronized": synchronized, **self.extra_metadata(readings),
        }
        return buf.getvalue().encode(), metadata

    # -- the reading journal (beemond.reading_journal)
    def fold_journal(self) -> None:
        """At start: write the readings a previous run journaled but never recorded as a record (marked
        ``recovered_from_journal``), resume the replay where the journal says it stood, and note the gap
        for this run's first record. Idempotent: a record already staged under the same name (or its
        ``-N`` twin) with the same start and end (a crash after writing it, before the journal was
        reset) is not written twice."""
        rec = self.journal.recover()
        if rec.skipped_lines:
            log.warning("journal: skipped %d torn line(s) left by a crash", rec.skipped_lines)
        last, replay = rec.last_reading, rec.replay
        if rec.entries:
            readings = [(parse_iso(e["t"]), tuple(e["v"]), e.get("g")) for e in rec.entries]
            tail = rec.entries[-1]
            body, metadata = self._record(readings, tail.get("e", 0), tail.get("m", 0),
                                          not any(e.get("u") for e in rec.entries))
            metadata["recovered_from_journal"] = True
            start, end = readings[0][0], readings[-1][0]
            metadata = staged_metadata(self, metadata)
            rel = staged_name(self, start, end, metadata)
            done = staged_twin(self.staging, rel, metadata)
            if done is not None:
                log.info("journal: its %d reading(s) are already in %s", len(readings), done)
            else:
                stage(self, rel, metadata, data_writer=lambda f: f.write(body))
                log.warning("journal: recorded %d reading(s) a crash left unrecorded, %s to %s", len(readings),
                            tail["t"] if len(readings) == 1 else rec.entries[0]["t"], tail["t"])
            last, replay = tail["t"], tail.get("r", replay)
        if replay is not None and getattr(self.sensor, "replay", None) is not None and self.sensor.replay.resume:
            self.resume_replay(replay)
        if rec.existed:
            self.restart_gap = {"last": last}
        if rec.entries or rec.skipped_lines:
            self._journal_reset(last, replay)
        # else the journal is a header alone (or absent): readings append to it as it is, and a start
        # costs no write (a Pi that reboots often, and a worker that restarts, start measuring at once)

    def _journal_reset(self, last: str | None, replay: dict | None = None) -> None:
        replay = replay if replay is not None else self.replay_position()
        try:
            self.journal.reset(last, replay)
        except OSError as e:
            # The readings are in a record; readings journaled after them would make a later fold
            # record them again under a wider name. A header appended in place says they are done.
            log.warning("cannot reset the reading journal (%s); marking its readings recorded in place", e)
            try:
                self.journal.mark_recorded(last, replay)
            except OSError as e2:
                log.error("cannot mark the reading journal either: %s", e2)

    def _journal_sync(self, now: float) -> None:
        try:
            self.journal.sync_if_due(now)
        except OSError as e:
            log.warning("cannot sync the reading journal: %s", e)


class I2CWorker(PolledSensorWorker):
    """A polled chip on an I2C bus, which :func:`beemond.sensors.seams.i2c_bus` gives: ``/dev/i2c-N``
    through ``smbus2.SMBus``, or simulated the package's chip emulator behind an ``EmulatedSMBus``,
    driven by the sensor's CSV replay (``chip``, ``replay``; None on hardware). The sensor config has
    ``bus``, ``address``, ``replay``."""

    def __init__(self, cfg, sensor, channel, **kw):
        super().__init__(cfg, sensor, channel, **kw)
        self.bus, self.chip, self.replay = seams.i2c_bus(sensor)

    def replay_position(self) -> dict | None:
        return self.replay.position() if self.chip is not None else None

    def resume_replay(self, position: dict) -> None:
        if self.chip is not None:
            self.replay.resume(position)

    def tag(self):
        if self.chip is None:
            return None
        row = self.chip.served[-1]  # the row behind the measurement that just succeeded
        del self.chip.served[:-1]
        return row

    def extra_metadata(self, readings: list[tuple]) -> dict:
        meta = {"address": f"0x{self.sensor.address:02x}"}
        if self.chip is not None:
            meta["replay"] = {"file": self.sensor.replay.file.name, "rows": ranges([t for _, _, t in readings])}
        return meta

    def close(self) -> None:
        self.bus.close()


def ranges(indices: list[int]) -> list[list[int]]:
    """Compress sorted-ish row indices into inclusive ``[first, last]`` runs."""
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out
