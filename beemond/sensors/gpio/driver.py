"""GPIO through gpiozero: capture triggers (button, PIR, IR beam), a status LED, sensor power switches.

Inputs: each ``[sensors.NAME.inputs.INPUT]`` is a gpiozero ``Button`` (kind ``button``), ``MotionSensor``
(``motion``: a PIR's output, active high) or ``DigitalInputDevice`` (``beam``: an IR break-beam
receiver's open-collector output, pulled up, active low when the beam is broken). gpiozero calls
``when_activated`` from its own thread; the callback only puts a command into this worker's own
command queue, so the run loop wakes at once and does the rest in one thread: the cooldown, an
``ipc.CAPTURE_REQUEST`` (the orchestrator turns it into ``capture_now`` for each target) and a row in
the CSV record of input events (``time,input,kind,pin,action``; action ``sent``, ``cooldown`` or
``paused``).

Outputs: ``status_led_pin`` blinks 0.1 s on / 1.9 s off while the run loop runs, 0.1 s / 0.1 s after
an error of this worker (a record it could not write) until the next good record. A per-sensor
``power_pin`` (any sensor type, see :class:`PowerSwitch`) switches a sensor's supply around each
measurement or capture.

Pins are BCM numbers. ``backend = "simulated"`` uses gpiozero's ``MockFactory`` (``trigger_every_s``
on an input drives its mock pin like a person pressing a button); ``hardware`` uses gpiozero's default
pin factory (lgpio on Raspberry Pi OS bookworm).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar

from beemond import ipc, reading_journal as rj
from beemond.core import clock
from beemond.records import stage, staged_metadata, staged_name, write_staged
from beemond.sensors import seams
from beemond.sensors.power import power_switch
from beemond.spool import Spool
from beemond.worker import Worker

log = logging.getLogger(__name__)

BLINK_OK = (0.1, 1.9)           # LED (on, off) seconds while running
BLINK_ERROR = (0.1, 0.1)        # after an error of this worker
COLUMNS = ("time", "input", "kind", "pin", "action")
MAX_HELD_EVENTS = 10_000        # input events kept in memory while records cannot be written


@dataclass(frozen=True, slots=True)
class InputActivated(ipc.Command):
    """From gpiozero's callback thread to the run loop: input *input* became active at *time* (UTC s
    since the epoch)."""

    kind: ClassVar[str] = "gpio_input"
    input: str
    time: float


INPUT = InputActivated.kind


class GpioWorker(Worker):
    """Inputs that send capture requests, a status LED; CSV records of input events."""

    ext = "csv"

    def __init__(self, cfg, sensor, channel: ipc.Channel):
        import gpiozero

        self.cfg, self.sensor, self.channel = cfg, sensor, channel
        self.name = sensor.name   # the owner of its records (beemond.records)
        self.staging = Spool(cfg.spool).staging_dir(sensor.name)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.template = cfg.template_for(sensor)
        self.factory = seams.pin_factory(sensor)
        self.power = power_switch(sensor, channel.beat, self.factory)
        self.devices: dict[str, gpiozero.InputDevice] = {}
        classes = {"button": gpiozero.Button, "motion": gpiozero.MotionSensor, "beam": gpiozero.DigitalInputDevice}
        for name, inp in sensor.inputs.items():
            pull_up = inp.pull_up if inp.pull_up is not None else inp.kind != "motion"
            kwargs = {"pull_up": pull_up, "pin_factory": self.factory}
            if inp.kind == "motion":
                # MotionSensor samples into a queue; a queue of 1 reacts to the first active sample.
                kwargs.update(queue_len=1)
            else:
                kwargs.update(bounce_time=inp.bounce_s or None)
            dev = classes[inp.kind](inp.pin, **kwargs)
            dev.when_activated = self._callback(name)
            self.devices[name] = dev
        self.led = None
        if sensor.status_led_pin is not None:
            self.led = gpiozero.LED(sensor.status_led_pin, pin_factory=self.factory)
        self.pattern: tuple[float, float] | None = None
        self.last_sent: dict[str, float] = {}
        self.rows: list[list[str]] = []
        self.window_opened: float | None = None
        self.paused = False
        self.errors = 0
        self.pulsers = []
        # Each input event is journaled (durable within journal_sync_s) until its record is written.
        self.journal = rj.ReadingJournal(Spool(cfg.spool).journal_path(sensor.name), cfg.daemon.journal_sync_s)
        self.restart_gap: dict | None = None

    def _callback(self, name: str):
        def activated(device=None) -> None:  # gpiozero's thread: hand over, nothing else
            self.channel.commands.put(InputActivated(name, time.time()))
        return activated

    def _blink(self, pattern: tuple[float, float]) -> None:
        if self.led is not None and pattern != self.pattern:
            self.led.blink(on_time=pattern[0], off_time=pattern[1], background=True)
            self.pattern = pattern

    def fold_journal(self) -> None:
        """At start: write the input events a crash left in the journal as a record (idempotent, as
        :meth:`beemond.sensors.base.PolledSensorWorker.fold_journal`) and note the gap."""
        rec = self.journal.recover()
        last = rec.last_reading
        rows = [e["v"] for e in rec.entries if isinstance(e.get("v"), list) and len(e["v"]) == len(COLUMNS)]
        if rows:
            body, metadata = self._record(rows)
            metadata["recovered_from_journal"] = True
            start, end = clock.parse_iso(rows[0][0]), clock.parse_iso(rows[-1][0])
            metadata = staged_metadata(self, metadata)
            rel = staged_name(self, start, end, metadata)
            if not (self.staging / rel).exists():
                stage(self, rel, metadata, data_writer=lambda f: f.write(body))
                log.warning("journal: recorded %d input event(s) a crash left unrecorded", len(rows))
            last = rows[-1][0]
        if rec.existed:
            self.restart_gap = {"last": last}
        if rec.entries or rec.skipped_lines:
            self.journal.reset(last, None)

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        log.info("gpio: %s", self.sensor.describe())
        try:
            self.fold_journal()
        except OSError as e:
            log.error("cannot fold the journal: %s", e)
        self._blink(BLINK_OK)
        self.pulsers += seams.input_pulsers(self.sensor, self.devices)

    def timeout(self) -> float:
        timeout = self.cfg.daemon.heartbeat_interval_s
        if self.window_opened is not None:
            timeout = max(0.0, self.window_opened + self.sensor.record_window_s - time.monotonic())
        if self.journal.due() is not None:
            timeout = max(0.0, min(timeout, self.journal.due() - time.monotonic()))
        return timeout

    def on_gpio_input(self, cmd: InputActivated) -> None:
        self._on_input(cmd.input, cmd.time)

    # capture_now: a GPIO sensor has nothing to capture

    def tick(self) -> None:
        try:
            self.journal.sync_if_due()
        except OSError as e:
            log.warning("cannot sync the journal: %s", e)
        if self.window_opened is not None and time.monotonic() - self.window_opened >= self.sensor.record_window_s:
            self.flush()

    def cleanup(self) -> None:
        for p in self.pulsers:
            p.stop()
        self.flush()
        self.journal.close()
        for dev in self.devices.values():
            dev.close()
        if self.led is not None:
            self.led.off()  # stops the blink thread; a closed pin may otherwise stay lit
            self.led.close()
        self.power.close()

    def _on_input(self, name: str, stamp: float) -> None:
        inp = self.sensor.inputs[name]
        now = time.monotonic()
        if self.paused:
            action = "paused"
        elif name in self.last_sent and now - self.last_sent[name] < inp.cooldown_s:
            action = "cooldown"
        else:
            action = "sent"
            self.last_sent[name] = now
            if inp.targets:
                self.channel.send(ipc.CAPTURE_REQUEST, targets=list(inp.targets),
                                  reason=f"{self.sensor.name}.{name} ({inp.kind})")
        log.info("input %s (%s, GPIO%d) activated: %s", name, inp.kind, inp.pin, action)
        if self.window_opened is None:
            self.window_opened = now
        row = [clock.utc_iso(datetime.fromtimestamp(stamp, timezone.utc)), name, inp.kind, str(inp.pin), action]
        self.rows.append(row)
        try:
            self.journal.append({"t": row[0], "v": row})
        except OSError as e:   # disk full: still held in memory
            log.warning("cannot journal an input event: %s", e)

    def flush(self) -> None:
        """Write the input events of the open window as one CSV record (nothing if there are none)."""
        if not self.rows:
            self.window_opened = None
            return
        rows = self.rows
        start, end = clock.parse_iso(rows[0][0]), clock.parse_iso(rows[-1][0])
        body, metadata = self._record(rows)
        if self.restart_gap is not None:
            metadata.update(rj.gap_metadata(self.restart_gap["last"], start))
        try:
            write_staged(self, start, end, metadata, data_writer=lambda f: f.write(body))
        except OSError as e:  # keep the events and retry at the next window
            self.errors += 1
            del self.rows[:-MAX_HELD_EVENTS]  # bounded while the disk refuses writes
            self.window_opened = time.monotonic()
            log.error("cannot write a record (%s); keeping %d event(s) to retry", e, len(rows))
            self.channel.send(ipc.ERROR, message=f"record write failed: {e}")
            self._blink(BLINK_ERROR)
            return
        self.rows, self.window_opened, self.errors, self.restart_gap = [], None, 0, None
        self._blink(BLINK_OK)
        try:
            self.journal.reset(rows[-1][0], None)
        except OSError as e:   # the events are in a record; a later fold finds it and skips
            log.warning("cannot reset the journal: %s", e)

    def _record(self, rows: list[list[str]]) -> tuple[bytes, dict]:
        """The CSV body and metadata of a record of input events."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
        metadata = {"sensor": self.sensor.name, "type": self.sensor.type, "backend": self.sensor.backend,
                    "start": rows[0][0], "end": rows[-1][0], "rows": len(rows), "columns": list(COLUMNS),
                    "errors": self.errors}
        return buf.getvalue().encode(), metadata
