"""Audio capture through ``sounddevice.InputStream`` into FLAC (or WAV) records.

The PortAudio callback only copies each block into a queue; a writer thread appends blocks to the
open segment (``soundfile``, written to a temporary name in staging), and when a segment holds
``round(segment_s * sample_rate_hz)`` frames, or its capture ends, it is closed, fsynced and renamed,
its sidecar written, and *record ready* sent. Input overflows (xruns: PortAudio's
``paInputOverflow``, ``CallbackFlags.input_overflow``) are counted per segment into its metadata.

Schedule (``schedule`` key): ``continuous`` keeps one stream open and cuts it into segments;
``window`` opens the device for ``capture_s`` every ``every_s`` inside a daily local-time window
(:mod:`beemond.sensors.audio.schedule`; AppMAIS: 60 s every 300 s, 08:00-20:00) and closes it in between,
which saves power and CPU on a Pi. ``capture_now`` starts a capture of ``capture_s`` at once.

Device: ``device`` is a case-insensitive substring of an input device's name, or its PortAudio index
(empty: the default input). PortAudio lists devices only when it initialises, so it is initialised
afresh before each opening: a USB microphone that was re-plugged (perhaps as another card) is found
again. A device that is missing is a transient error: retried ``open_retries`` times with a doubling
backoff, each failure sent as an ERROR event, then the worker exits non-zero and the orchestrator
restarts it. A name matching several devices, or settings the device cannot record
(``sounddevice.check_input_settings``), end the worker at once with the reason.

Sample format: PCM_16 is read from PortAudio as int16, PCM_24 as int32 (libsndfile keeps the top 24
bits). Segment times: ``start`` is estimated from the host's UTC clock at each block's arrival less the
audio before it in the segment, taking the earliest estimate (blocks are delivered late, in bursts
after a stall, never early); ``end`` is ``start`` plus frames / sample rate.

Power cuts: the open segment is written to ``.segment-<ms>.<ext>.open`` in staging with a small JSON
header beside it (its start, format, trigger), and flushed and fsynced every ``daemon.journal_sync_s``
(1 s). At the next start a segment left open by a crash is salvaged (:func:`salvage_segment`) up to
its last durable frame (FLAC: every frame that decodes, re-encoded; WAV: the header's sizes fixed,
trailing all-zero frames of an unsynced tail dropped) and recorded with ``truncated: true`` and its
real end. The first record of a run that follows an earlier one carries ``after_restart: true`` and
``gap_s`` (seconds from the end of the last durable audio to its start).

Full disk: a segment whose write fails while the spool's file system is (nearly) full is dropped at
once, its temporary file removed, and the worker keeps its stream: blocks are discarded (and
counted) while there is no room, a new segment is tried every ``NO_SPACE_RETRY_S``, and recording
resumes within that of space returning. The first segment after the episode carries
``lost_to_full_disk_s`` in its metadata; the episode is logged and sent as one ERROR event. (libsndfile
reports a failed write as a generic "System error", so the file system's free space decides whether
the failure was the disk's; any other writer failure still ends the worker.)

``backend = "simulated"`` swaps only the stream class for
:class:`beemond.sensors.audio.emulator.SimulatedInputStream`; this module's code is the same.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from beemond import ipc, reading_journal as rj
from beemond.core.clock import Backoff, Clock, utc_iso
from beemond.sensors import seams
from beemond.sensors.audio.device import DeviceMissing, open_input_stream
from beemond.sensors.audio.segment import Segment, no_room_to_salvage, salvage_segment, set_aside
from beemond.sensors.base import SensorFailure
from beemond.sensors.power import power_switch
from beemond.spool import Spool
from beemond.worker import Worker

log = logging.getLogger(__name__)

_DTYPE = {"PCM_16": "int16", "PCM_24": "int32"}
_CLOSE = object()          # writer marker: the capture (stream) ended; close the open segment
MAX_BACKOFF_S = 30.0
NO_SPACE_RETRY_S = 1.0      # while the disk is full, a new segment is tried this often
NO_SPACE_FREE_BYTES = 256 * 1024   # a write failure with less free than this is the full disk's


@dataclass(frozen=True)
class _Capture:
    """One opening of the stream, as the writer sees it."""

    frames: int | None              # frames to record; None: until the stream stops (continuous)
    trigger: str                    # continuous | schedule | capture_now
    slot: datetime | None = None    # the schedule slot it was started for


class AudioWorker(Worker):
    def __init__(self, cfg, sensor, channel: ipc.Channel):
        import numpy as np  # noqa: F401  (fail here, in the worker, if numpy is missing)
        import soundfile

        self.soundfile = soundfile
        self.cfg = cfg
        self.sensor = sensor
        self.channel = channel
        self.ext = sensor.format
        self.template = cfg.template_for(sensor)
        self.spool = Spool(cfg.spool)
        self.name = sensor.name   # the owner of its records (beemond.records)
        self.staging = self.spool.staging_dir(sensor.name)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.frames_per_segment = round(sensor.segment_s * sensor.sample_rate_hz)
        self.frames_per_capture = round(sensor.capture_s * sensor.sample_rate_hz)
        self.blocksize = max(1, round(sensor.block_s * sensor.sample_rate_hz))
        self.window = sensor.capture_window()   # None: continuous
        self.blocks: queue.Queue = queue.Queue()
        self.last_block = time.monotonic()
        self.writer_error: BaseException | None = None
        self.overflows_total = 0
        self.stream = None                      # open only while capturing
        self.writer: threading.Thread | None = None   # the segment writer, from prepare()
        self.device_name = ""
        self.capture_done = threading.Event()   # set by the writer after a capture's last frame
        self.capture_ends = 0.0                 # monotonic time a limited capture should end
        self.pending: _Capture | None = None    # a capture waiting for the device to come back
        self.retry_at = 0.0
        self.open_failures = 0
        self.clock = Clock()  # segment starts never precede the previous segment's end (clock steps)
        # power_pin (a USB microphone behind a load switch): on power_lead_s before each opening of
        # the device, off once it is closed again.
        self.power = power_switch(sensor, channel.beat)
        self.powered = False
        self.restart_gap: dict | None = None   # {"last": ISO|None} until the run's first segment is written
        self.last_end: str | None = None       # end of the last segment written (ISO)
        self.no_space_since: float | None = None   # monotonic; set while segments cannot be written
        self.no_space_retry = 0.0
        self.lost_frames = 0                        # dropped for lack of space, not yet reported in a record

    def _power(self, on: bool) -> None:
        if on and not self.powered:
            self.power.__enter__()  # waits power_lead_s (beating) for the device to come up
        elif self.powered and not on:
            self.power.__exit__(None, None, None)
        self.powered = on

    # ---- PortAudio's thread: copy and return, nothing else (no allocation-heavy work, no I/O)
    def _callback(self, indata, frames, time_info, status) -> None:
        self.blocks.put((indata.copy(), bool(status and status.input_overflow), time.time()))

    def _open_stream(self):
        """A new, unstarted input stream. Raises DeviceMissing (transient) or DeviceError."""
        s = self.sensor
        kwargs = dict(samplerate=s.sample_rate_hz, blocksize=self.blocksize, channels=s.channels,
                      dtype=_DTYPE[s.subtype], callback=self._callback)
        stream, self.device_name = seams.input_stream(s, functools.partial(open_input_stream, s), **kwargs)
        return stream

    def _begin(self, cap: _Capture) -> None:
        """Open the device and start *cap*; on a transient failure keep it pending for a retry."""
        self._power(True)
        try:
            stream = self._open_stream()
            self.capture_done.clear()
            self.blocks.put(cap)  # before start(): every block of this stream follows the marker
            try:
                stream.start()
            except Exception as e:
                self.blocks.put(_CLOSE)
                stream.close()
                raise DeviceMissing(f"cannot start input device {self.device_name!r}: {e}") from None
        except DeviceMissing as e:
            self._power(False)
            self.open_failures += 1
            self.channel.send(ipc.ERROR, message=f"audio device: {e}")
            if self.open_failures > self.sensor.open_retries:
                raise SensorFailure(f"audio device unavailable after {self.open_failures} attempt(s): {e}") from None
            delay = Backoff(self.sensor.open_backoff_s, MAX_BACKOFF_S).delay(self.open_failures)
            log.warning("%s; retry %d of %d in %.1f s", e, self.open_failures, self.sensor.open_retries, delay)
            self.pending, self.retry_at = cap, time.monotonic() + delay
            return
        self.stream, self.pending, self.open_failures = stream, None, 0
        self.last_block = time.monotonic()
        # 0: until stopped (continuous); else when the writer should have the capture's last frame
        self.capture_ends = 0.0 if cap.frames is None else self.last_block + cap.frames / self.sensor.sample_rate_hz
        log.info("%s capture from %r: %d Hz x%d %s%s", cap.trigger, self.device_name, self.sensor.sample_rate_hz,
                 self.sensor.channels, self.sensor.subtype,
                 f", {self.sensor.capture_s:g} s" if cap.frames is not None else
                 f" in {self.sensor.segment_s:g} s {self.sensor.format} segments")

    def _end(self) -> None:
        """Stop and close the stream; the open segment becomes a (possibly shorter) record."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            stream.stop()  # returns after the last callback: its blocks are queued before _CLOSE
        finally:
            stream.close()
            self.blocks.put(_CLOSE)
            self._power(False)

    def _timeout(self, paused: bool, due: datetime | None) -> float:
        now = time.monotonic()
        if self.stream is not None:
            if self.capture_ends <= 0:
                return self.cfg.daemon.heartbeat_interval_s
            return max(0.02, self.capture_ends - now)  # then short waits for the writer to finish
        if self.pending is not None:
            return max(0.0, self.retry_at - now)
        if paused or due is None:
            return self.cfg.daemon.heartbeat_interval_s
        return self.window.wait_s(datetime.now(timezone.utc), due)

    def salvage(self) -> None:
        """At start: record the segments a crash left open, and note the gap for this run's first one."""
        sp = Spool(self.cfg.spool)
        state = rj.read_state(sp.state_file(self.sensor.name))
        last = state.get("last_end") if state else None
        existed = state is not None
        for header in sp.open_segment_headers(self.sensor.name):
            if not header.with_name(header.name[:-len(".json")]).exists():
                header.unlink(missing_ok=True)   # its segment was recorded; the crash came before this unlink
        for segment in sp.open_segments(self.sensor.name):
            existed = True
            try:
                end = salvage_segment(self, segment)
            except (OSError, ValueError, RuntimeError) as e:
                if isinstance(e, OSError) or no_room_to_salvage(segment):
                    # A full disk (no room for the sidecar or the FLAC copy; libsndfile then fails
                    # even to open the FLAC): the segment may be sound, so it waits, never set aside.
                    log.error("cannot salvage the open segment %s now: %s; trying again at the next start",
                              segment.name, e)
                    continue
                log.error("cannot salvage the open segment %s: %s; moving it to failed/", segment.name, e)
                set_aside(self, segment)
                continue
            if end is not None and (last is None or end > last):
                last = end
        if existed:
            self.restart_gap = {"last": last}

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        try:
            self.salvage()
        except OSError as e:
            log.error("cannot salvage open segments: %s", e)
        self.writer = threading.Thread(target=self._write_loop, name="audio-writer", daemon=True)
        self.writer.start()
        if self.window is None:
            log.info("recording continuously")
        else:
            log.info("capturing %g s every %g s from %s to %s (%s)", self.sensor.capture_s, self.sensor.every_s,
                     self.sensor.window_start, self.sensor.window_end, self.sensor.timezone or "local time")
        self.stall_s = max(5.0, 20 * self.sensor.block_s)
        self.due: datetime | None = None   # the schedule slot we wait for (UTC)
        self.looked = time.monotonic()     # when this loop last ran
        self._start_due()

    def _start_due(self) -> None:
        """Open the device for the capture that is due, if any (continuous, a retry, a schedule slot)."""
        if self.stream is None and not self.paused:
            if self.pending is not None:
                if time.monotonic() >= self.retry_at:
                    self._begin(self.pending)
            elif self.window is None:
                self._begin(_Capture(None, "continuous"))
            else:
                self.due = self._schedule(self.due)

    def timeout(self) -> float:
        self.waited = self._timeout(self.paused, self.due)
        return self.waited

    def on_stop(self, cmd: ipc.Stop) -> None:
        if not self.paused:
            self._end()
            self.pending, self.paused = None, True
            log.info("capture stopped by command")

    def on_start(self, cmd: ipc.Start) -> None:
        if self.paused:
            self.paused, self.due = False, None  # slots missed while stopped are not made up
            log.info("capture started by command")

    def on_capture_now(self, cmd: ipc.CaptureNow) -> None:
        if self.window is None and not self.paused:
            log.debug("capture_now: already recording continuously")
        elif self.stream is not None or self.pending is not None:
            log.info("capture_now: a capture is already running")
        else:
            self._begin(_Capture(self.frames_per_capture, "capture_now"))

    def tick(self) -> None:
        if self.writer_error is not None:
            raise RuntimeError(f"segment writer failed: {self.writer_error}") from self.writer_error
        now = time.monotonic()
        if now - self.looked > min(self.waited, self.channel.heartbeat_interval_s) + self.stall_s / 2:
            # This process itself was not running (SIGSTOP, a swap storm): the blocks are
            # probably queued behind us. Do not blame the device for our own stall.
            self.last_block = max(self.last_block, now)
        self.looked = now
        if self.stream is not None:
            if self.capture_done.is_set():
                self._end()
            elif now - self.last_block > self.stall_s:
                raise RuntimeError(f"no audio block for {self.stall_s:g} s: the input stream stalled")
        self._start_due()   # the next wait's capture

    def cleanup(self) -> None:
        try:
            self._end()
        finally:
            self.blocks.put(None)  # the writer closes the partial segment as a shorter record
            if self.writer is not None:
                self.writer.join(timeout=30)
            self._power(False)
            self.power.close()
            try:
                rj.write_state(Spool(self.cfg.spool).state_file(self.sensor.name),
                               {"last_end": self.last_end or (self.restart_gap or {}).get("last")})
            except OSError as e:
                log.warning("cannot write the audio state: %s", e)

    def _schedule(self, due: datetime | None) -> datetime:
        """Start the capture for slot *due* if it has come; return the slot to wait for next."""
        now = datetime.now(timezone.utc)
        capture, new_due = self.window.step(now, due)
        if capture:
            self._begin(_Capture(self.frames_per_capture, "schedule", due))
            return self.window.after(due)
        if due is not None and now > due and new_due > due:
            log.warning("skipped the capture due at %s (the clock jumped, or the worker was busy)",
                        utc_iso(due))
        return new_due

    # ---- writer thread
    def _write_loop(self) -> None:
        segment = None
        cap: _Capture | None = None    # None: drop blocks (after a capture's last frame)
        remaining: int | None = None
        try:
            while True:
                item = self.blocks.get()
                if item is None:
                    break
                if item is _CLOSE or isinstance(item, _Capture):
                    if segment is not None:
                        segment.close()
                        segment = None
                    cap = item if isinstance(item, _Capture) else None
                    remaining = cap.frames if cap is not None else None
                    continue
                if cap is None:
                    continue
                self.last_block = time.monotonic()
                block, overflow, arrived = item
                if remaining is not None:
                    block = block[:remaining]
                    remaining -= len(block)
                while len(block):
                    try:
                        if segment is None:
                            if self.no_space_since is not None and time.monotonic() < self.no_space_retry:
                                self.lost_frames += len(block)
                                break
                            segment = Segment(self, arrived - len(block) / self.sensor.sample_rate_hz, cap)
                        if overflow:
                            segment.overflows += 1
                            overflow = False
                        block = segment.write(block, arrived)
                        if segment.frames == self.frames_per_segment:
                            segment.close()
                            segment = None
                    except Exception as e:
                        if not self._out_of_space(e):
                            raise
                        self._drop_segment(segment, len(block), e)
                        segment, block = None, block[:0]
                if remaining == 0:
                    if segment is not None:
                        segment.close()
                        segment = None
                    cap = None
                    self.capture_done.set()
        except BaseException as e:  # reported by the main loop, which exits non-zero
            self.writer_error = e
            log.exception("segment writer failed")
        finally:
            if segment is not None:
                try:
                    segment.close()
                except Exception as e:
                    if self._out_of_space(e):
                        self._drop_segment(segment, 0, e)
                    else:
                        log.exception("could not close the last segment")


    def _out_of_space(self, e: Exception) -> bool:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        try:
            free = self.spool.free_bytes()
        except OSError:
            return False
        return isinstance(e, (OSError, RuntimeError)) and free < NO_SPACE_FREE_BYTES

    def _drop_segment(self, segment: "Segment | None", unwritten: int, e: Exception) -> None:
        """The disk is full: discard *segment* and its temporary file now, count what is lost, and
        try a new segment in ``NO_SPACE_RETRY_S``."""
        if segment is not None:
            with contextlib.suppress(Exception):
                segment.file.close()
            with contextlib.suppress(OSError):
                segment.tmp.unlink()
            with contextlib.suppress(OSError):
                segment.header.unlink()
            self.lost_frames += segment.frames
        self.lost_frames += unwritten
        now = time.monotonic()
        if self.no_space_since is None:
            self.no_space_since = now
            message = f"no space for audio on the spool ({e}); dropping audio until space returns"
            log.error("%s", message)
            self.channel.send(ipc.ERROR, message=message)
        self.no_space_retry = now + NO_SPACE_RETRY_S

    def _lost_to_full_disk_s(self) -> float:
        return round(self.lost_frames / self.sensor.sample_rate_hz, 3)

    def _space_returned(self) -> None:
        """A segment was written (the first after a full disk carries the loss): end the episode."""
        if self.no_space_since is not None:
            log.info("recording audio again: space returned after %.0f s, %.1f s of audio lost",
                     time.monotonic() - self.no_space_since, self._lost_to_full_disk_s())
        self.no_space_since, self.lost_frames = None, 0
