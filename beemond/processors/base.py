"""The processor lifecycle shared by every processor.

A processor reads one sensor's output and writes derived records (JSON) and metrics:

- **Process.** Each processor is its own worker process (role ``processor``), started through the
  orchestrator's forkserver like a sensor, restarted with backoff when it exits non-zero or stops
  sending heartbeats, and given up after the crash-loop limit without stopping the daemon. At
  shutdown it is stopped after the sensors (so their last records reach it) and before the
  aggregator (so its last outputs travel in the final bundles).
- **Commands.** ``stop`` pauses it (inputs arriving while paused are skipped), ``start`` resumes it,
  ``shutdown`` ends it.
- **Record inputs.** For every *record ready* of the processor's sensor the orchestrator hard-links
  the record and its sidecar into ``spool/processing/<processor>/`` (a directory entry; no data is
  copied) *before* it tells the aggregator, so the aggregator may bundle and delete the staged
  original at any time. The processor reads its link and removes it when done (at-least-once). Links
  left by a crash or by a restart are processed when the processor starts, oldest first.
- **Sample inputs.** The sensor's ``sample`` events, forwarded as ``sample`` commands with
  ``time`` (the event's UTC time, s since the epoch) added.
- **Outputs.** A result becomes a JSON record in ``spool/staging/<processor>/`` through
  :func:`beemond.records.write_staged` (temp, fsync, rename, sidecar, *record ready* to the
  aggregator) and ``sample`` events that the metrics registry exports. The record is
  ``{"sensor", "type", "source", "start", "end", "skipped", "result": {...}, "metadata": {...}}``:
  :class:`beemond.records.JsonArchiver` puts the record's full metadata (its sidecar's, with
  ``[archive] default_metadata`` and ``clock_synchronized``) under ``"metadata"``.

Spacing (seconds, 0 turns each off; see :class:`Spacing` for the exact rules): ``min_input_spacing``
thins inputs by their *data* time, ``min_step_spacing`` limits the processing rate by *run* time,
``min_output_spacing`` thins the written records by *data* time. Skipped inputs are counted in each
output record's metadata (``skipped``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from beemond import ipc
from beemond.core import clock, fsio
from beemond.records import BackgroundWriter, JsonArchiver, stage, staged_metadata, staged_name
from beemond.spool import META_SUFFIX, Spool, sidecar_of
from beemond.worker import Worker

log = logging.getLogger(__name__)

SHUTDOWN_WRITE_S = 5.0   # at shutdown, time left to records whose write is being retried


class Spacing:
    """The three spacing rules. Each compares with the last *accepted* item, never with a skipped one,
    so a steady stream faster than the spacing is thinned to one item per spacing, not starved.

    - :meth:`input_ok` (``min_input_spacing``): an input whose data time (a record's metadata
      ``start``, a sample's event ``time``) is less than the spacing after the data time of the last
      accepted input is skipped before it is read. A data time *earlier* than the last accepted one
      (a clock step back, a replayed backlog) is accepted and becomes the new reference.
    - :meth:`step_ok` (``min_step_spacing``): an input that passed the input rule but arrives (on the
      monotonic clock) less than the spacing after the previous processing step started is skipped
      unprocessed. This bounds the CPU a burst costs (a backlog of records after a restart).
    - :meth:`output_ok` (``min_output_spacing``): a result whose data time is less than the spacing
      after the last *written* result is not written as a record. Its metrics are still sent (the
      latest value is always exported). A swarm alert's record follows the same rule; its warning
      line and ``alert`` event (``beemond_alerts_total``) are sent for every alert.
    """

    def __init__(self, min_input: float, min_step: float, min_output: float):
        self.min_input, self.min_step, self.min_output = min_input, min_step, min_output
        self._input: float | None = None
        self._step: float | None = None
        self._output: float | None = None

    @staticmethod
    def _ok(last: float | None, t: float, spacing: float) -> bool:
        return spacing <= 0 or last is None or not 0 <= t - last < spacing

    def input_ok(self, data_time: float) -> bool:
        if not self._ok(self._input, data_time, self.min_input):
            return False
        self._input = data_time
        return True

    def step_ok(self, monotonic_now: float) -> bool:
        if not self._ok(self._step, monotonic_now, self.min_step):
            return False
        self._step = monotonic_now
        return True

    def output_ok(self, data_time: float) -> bool:
        if not self._ok(self._output, data_time, self.min_output):
            return False
        self._output = data_time
        return True


class ProcessorWorker(Worker):
    """Subclasses implement :meth:`process_record` and/or :meth:`process_sample`."""

    ext = "json"

    def __init__(self, cfg, proc, channel: ipc.Channel):
        self.cfg = cfg
        self.proc = proc
        self.name = proc.name   # the owner of its records (beemond.records): staging/<name>/
        self.channel = channel
        self.template = cfg.template_for(proc)
        spool = Spool(cfg.spool)
        self.staging = spool.staging_dir(proc.name)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.inbox = spool.processing_dir(proc.name)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.spacing = Spacing(proc.min_input_spacing, proc.min_step_spacing, proc.min_output_spacing)
        self.paused = False
        self.skipped = {"paused": 0, "input": 0, "step": 0, "output": 0}
        self.outputs = 0
        self.archiver = JsonArchiver(merge_metadata=True)
        # A derived record whose write fails is retried off the processing loop, then kept in
        # spool/failed/<processor>/ with a log line: never dropped, and never blocking the next input.
        self.writer = BackgroundWriter(lambda rel, meta, dw: stage(self, rel, meta, dw),
                                       spool.failed_dir(proc.name),
                                       max_retries=cfg.archive.max_retries, name=f"{proc.name}-writer")

    # -- for subclasses
    def process_record(self, path: Path, metadata: dict) -> dict | None:
        """One record of the sensor -> a result (JSON-able dict) or None."""
        return None

    def process_sample(self, values: dict, data_time: float) -> dict | None:
        """One reading of the sensor (``{quantity: value}``) -> a result or None."""
        return None

    # -- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        log.info("processing %s's %s", self.proc.sensor, "records" if self.uses_records() else "samples")
        for path in self.leftovers():
            self.handle_record(path)
            self.channel.beat()  # a long backlog must not look like a hung worker

    def cleanup(self) -> None:
        # Within the processors' share of the shutdown; a record still queued after it is logged as lost.
        self.writer.close(timeout=SHUTDOWN_WRITE_S)

    def uses_records(self) -> bool:
        return type(self).process_record is not ProcessorWorker.process_record

    def leftovers(self) -> list[Path]:
        """Inbox links not yet processed (a crash, a restart, a backlog), oldest first."""
        paths = [p for p in self.inbox.iterdir() if not fsio.is_internal(p.name)
                 and not p.name.endswith(META_SUFFIX)]
        return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))

    def pause(self) -> None:
        log.info("paused by command")

    def resume(self) -> None:
        log.info("resumed by command")

    def on_record_ready(self, cmd: ipc.RecordReady) -> None:
        self.handle_record(Path(cmd.path))

    def on_sample(self, cmd: ipc.Sample) -> None:
        self.handle_sample(cmd)

    def _admit(self, data_time: float, monotonic_now: float) -> bool:
        if self.paused:
            why = "paused"
        elif not self.spacing.input_ok(data_time):
            why = "input"
        elif not self.spacing.step_ok(monotonic_now):
            why = "step"
        else:
            return True
        self.skipped[why] += 1
        return False

    def handle_record(self, path: Path) -> None:
        meta_path = sidecar_of(path)
        if not path.exists():
            return  # already handled: found among the leftovers at start and announced as well
        try:
            try:
                metadata = json.loads(meta_path.read_bytes())
            except (OSError, ValueError):
                metadata = {}
            try:
                data_time = clock.parse_iso(metadata["start"]).timestamp()
            except (KeyError, TypeError, ValueError):
                data_time = path.stat().st_mtime
            if not self._admit(data_time, time.monotonic()):
                return
            result = self.process_record(path, metadata)
            if result is not None:
                end = clock.parse_iso(metadata["end"]).timestamp() if metadata.get("end") else data_time
                self.emit(result, data_time, end)
        except FileNotFoundError as e:
            log.error("input record %s vanished: %s", path.name, e)
        except Exception as e:  # a damaged record must not stop the processor (nor be retried forever)
            log.error("cannot process %s: %s: %s", path.name, type(e).__name__, e)
            self.channel.send(ipc.ERROR, message=f"cannot process {path.name}: {e}")
        finally:
            path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)

    def handle_sample(self, sample: ipc.Sample) -> None:
        data_time = float(sample.time or time.time())
        if not self._admit(data_time, time.monotonic()):
            return
        result = self.process_sample(sample.values or {}, data_time)
        if result is not None:
            self.emit(result, data_time, data_time)

    def emit(self, result: dict, start: float, end: float) -> bool:
        """Write *result* as a JSON record unless the output spacing says to skip it; True if it was
        written or queued for a retry (see :meth:`write_output`)."""
        if not self.spacing.output_ok(start):
            self.skipped["output"] += 1
            return False
        t0, t1 = (datetime.fromtimestamp(t, timezone.utc) for t in (start, end))
        fields = {"sensor": self.proc.name, "type": self.proc.type, "source": self.proc.sensor,
                  "start": clock.utc_iso(t0), "end": clock.utc_iso(t1), "skipped": dict(self.skipped)}
        metadata = staged_metadata(self, dict(fields))
        # The seeds' JsonArchiver: the record's full metadata (default_metadata included) under
        # "metadata". The top-level fields and "result" stay as before, so the lab's readers still work.
        self.write_output(t0, t1, metadata, self.archiver.render({**fields, "result": result}, metadata))
        self.outputs += 1
        for k in self.skipped:
            self.skipped[k] = 0
        return True

    def write_output(self, t0: datetime, t1: datetime, metadata: dict, body: bytes, ext: str | None = None) -> None:
        """Write one derived record (*metadata* from :func:`staged_metadata`) into staging now; if that
        fails (``OSError``: disk full, read-only remount) send an ERROR event and hand it to the
        background writer, which retries ``[archive] max_retries`` times and then moves it to
        ``spool/failed/<processor>/`` with a log line."""
        rel = staged_name(self, t0, t1, metadata, ext=ext)

        def data_writer(f):
            f.write(body)
        try:
            stage(self, rel, metadata, data_writer)
        except OSError as e:
            log.error("cannot write output record %s (%s); retrying in the background", rel, e.strerror or e)
            self.channel.send(ipc.ERROR, message=f"record write failed: {e}")
            self.writer.submit(rel, metadata, data_writer)
