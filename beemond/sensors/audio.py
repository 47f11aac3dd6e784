"""Audio capture through ``sounddevice.InputStream`` into fixed-length FLAC or WAV segments.

The PortAudio callback only copies each block into a queue; a writer thread appends blocks to the
open segment (``soundfile``, written to a temporary name in staging), and when a segment holds
exactly ``round(segment_s * sample_rate_hz)`` frames it is closed, fsynced and renamed, its sidecar
written, and *record ready* sent. Input overflows (xruns: PortAudio's ``input_overflow`` flag) are
counted per segment into the record's metadata.

Segment times: ``start`` is the host's UTC clock when the segment's first block arrived, less that
block's duration; ``end`` is ``start`` plus frames / sample rate.

``backend = "simulated"`` swaps only the stream class for
:class:`beemond.sensors.emulators.audio.SimulatedInputStream`; this module's code is the same.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from beemond import archive, ipc
from beemond.clock import Clock
from beemond.sensors.base import write_staged

log = logging.getLogger(__name__)

_DTYPE = {"PCM_16": "int16", "PCM_24": "int32"}
_CLOSE_SEGMENT = object()


class AudioWorker:
    def __init__(self, cfg, sensor, channel: ipc.Channel):
        import numpy as np  # noqa: F401  (fail here, in the worker, if numpy is missing)
        import soundfile

        self.soundfile = soundfile
        self.cfg = cfg
        self.sensor = sensor
        self.channel = channel
        self.ext = sensor.format
        self.template = cfg.template_for(sensor)
        self.staging = Path(cfg.spool) / "staging" / sensor.name
        self.staging.mkdir(parents=True, exist_ok=True)
        self.frames_per_segment = round(sensor.segment_s * sensor.sample_rate_hz)
        self.blocksize = max(1, round(sensor.block_s * sensor.sample_rate_hz))
        self.blocks: queue.Queue = queue.Queue()
        self.last_block = time.monotonic()
        self.writer_error: BaseException | None = None
        self.overflows_total = 0
        self.clock = Clock()  # segment starts never precede the previous segment's end (clock steps)

    # ---- PortAudio's thread: copy and return, nothing else (no allocation-heavy work, no I/O)
    def _callback(self, indata, frames, time_info, status) -> None:
        self.blocks.put((indata.copy(), bool(status and status.input_overflow), time.time()))

    def _open_stream(self):
        s = self.sensor
        kwargs = dict(samplerate=s.sample_rate_hz, blocksize=self.blocksize, channels=s.channels,
                      dtype=_DTYPE[s.subtype], callback=self._callback)
        if s.backend == "simulated":
            from beemond.sensors.emulators.audio import SimulatedInputStream

            return SimulatedInputStream(tone_hz=s.tone_hz, noise=s.noise, **kwargs)
        import sounddevice

        device = int(s.device) if s.device.isdigit() else (s.device or None)
        return sounddevice.InputStream(device=device, **kwargs)

    def run(self) -> None:
        stream = self._open_stream()
        writer = threading.Thread(target=self._write_loop, name="audio-writer", daemon=True)
        writer.start()
        stream.start()
        log.info("recording %d Hz x%d %s in %g s segments", self.sensor.sample_rate_hz,
                 self.sensor.channels, self.sensor.format, self.sensor.segment_s)
        stall_s = max(5.0, 20 * self.sensor.block_s)
        paused = False
        try:
            while True:
                cmd = self.channel.receive(timeout=self.cfg.daemon.heartbeat_interval_s)
                if cmd is not None:
                    if cmd.kind == ipc.SHUTDOWN:
                        log.info("shutting down (%s)", cmd.args.get("reason", "command"))
                        break
                    if cmd.kind == ipc.STOP and not paused:
                        stream.stop()
                        self.blocks.put(_CLOSE_SEGMENT)  # the segment so far becomes a (shorter) record
                        paused = True
                        log.info("capture stopped by command")
                    elif cmd.kind == ipc.START and paused:
                        self.last_block = time.monotonic()
                        stream.start()
                        paused = False
                        log.info("capture started by command")
                    # capture_now: audio records continuously; nothing to add.
                if self.writer_error is not None:
                    raise RuntimeError(f"segment writer failed: {self.writer_error}") from self.writer_error
                if not paused and time.monotonic() - self.last_block > stall_s:
                    raise RuntimeError(f"no audio block for {stall_s:g} s: the input stream stalled")
        finally:
            stream.stop()
            stream.close()
            self.blocks.put(None)  # the writer closes the partial segment as a shorter record
            writer.join(timeout=30)

    # ---- writer thread
    def _write_loop(self) -> None:
        segment = None
        try:
            while True:
                item = self.blocks.get()
                if item is None:
                    break
                if item is _CLOSE_SEGMENT:
                    if segment is not None:
                        segment.close()
                        segment = None
                    continue
                self.last_block = time.monotonic()
                block, overflow, arrived = item
                while len(block):
                    if segment is None:
                        start = datetime.fromtimestamp(arrived, timezone.utc) - timedelta(
                            seconds=len(block) / self.sensor.sample_rate_hz)
                        segment = _Segment(self, self.clock.floor(start))
                    if overflow:
                        segment.overflows += 1
                        overflow = False
                    block = segment.write(block)
                    if segment.frames == self.frames_per_segment:
                        segment.close()
                        segment = None
        except BaseException as e:  # reported by the main loop, which exits non-zero
            self.writer_error = e
            log.exception("segment writer failed")
        finally:
            if segment is not None:
                try:
                    segment.close()
                except Exception:
                    log.exception("could not close the last segment")


class _Segment:
    """One segment being written to its temporary name."""

    def __init__(self, worker: AudioWorker, start: datetime):
        self.w = worker
        self.start = start
        self.frames = 0
        self.overflows = 0
        s = worker.sensor
        self.tmp = archive.temp_name(worker.staging, f"segment-{archive.utc_stamp(start)}")
        self.file = worker.soundfile.SoundFile(self.tmp, "w", samplerate=s.sample_rate_hz, channels=s.channels,
                                               subtype=s.subtype, format=s.format.upper())

    def write(self, block):
        """Append as much of *block* as fits; return the rest."""
        room = self.w.frames_per_segment - self.frames
        head, rest = block[:room], block[room:]
        self.file.write(head)
        self.frames += len(head)
        return rest

    def close(self) -> None:
        self.file.close()
        s = self.w.sensor
        end = self.w.clock.floor(self.start + timedelta(seconds=self.frames / s.sample_rate_hz))
        metadata = {"sensor": s.name, "type": s.type, "backend": s.backend,
                    "start": archive.utc_iso(self.start), "end": archive.utc_iso(end),
                    "sample_rate_hz": s.sample_rate_hz, "channels": s.channels, "frames": self.frames,
                    "format": s.format, "subtype": s.subtype, "overflows": self.overflows}
        self.w.overflows_total += self.overflows
        if self.overflows:
            log.warning("segment had %d input overflow(s)", self.overflows)
        write_staged(self.w, self.start, end, metadata, tmp=self.tmp)
