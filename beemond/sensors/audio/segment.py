"""An audio segment: written to its temporary name in staging while a capture runs, salvaged after a
crash (see :mod:`beemond.sensors.audio.driver`, "Power cuts", for the rules).

:class:`Segment` is the open segment the driver's writer thread appends to; :func:`salvage_segment`
records a segment a crash left open, up to its last durable frame; :func:`set_aside` moves one that
cannot be read to ``spool/failed/<sensor>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from beemond.core import clock, fsio
from beemond import reading_journal as rj
from beemond.records import write_staged
from beemond.spool import Spool, open_segment_format, open_segment_header, open_segment_record_name

log = logging.getLogger("beemond.sensors.audio.driver")   # one logger for the audio worker's lines


class Segment:
    """One segment being written to its temporary name."""

    def __init__(self, worker, start: float, capture):
        self.w = worker
        self.start_ts = start          # UTC seconds; refined by write()
        self.capture = capture
        self.frames = 0
        self.overflows = 0
        s = worker.sensor
        self.tmp = Spool(worker.cfg.spool).open_segment(s.name, str(int(start * 1000)), s.format)
        self.header = open_segment_header(self.tmp)
        with fsio.atomic_writer(self.header) as f:   # what a salvage needs to know, durable first
            f.write(json.dumps({"start": start, "trigger": capture.trigger, "device": worker.device_name,
                                "schedule": self._schedule()}).encode())
        try:
            self.file = worker.soundfile.SoundFile(self.tmp, "w", samplerate=s.sample_rate_hz, channels=s.channels,
                                                   subtype=s.subtype, format=s.format.upper())
        except Exception:
            with contextlib.suppress(OSError):
                self.tmp.unlink()   # created, then its header could not be written
            with contextlib.suppress(OSError):
                self.header.unlink()
            raise
        self.synced_at = time.monotonic()
        self.sync_s = worker.cfg.daemon.journal_sync_s
        self.entry_synced = False   # the segment's directory entry (not only its data) is durable

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.start_ts, timezone.utc)

    def write(self, block, arrived: float):
        """Append as much of *block* (whose last frame arrived at UTC *arrived*) as fits; return the rest.

        Blocks arrive late, never early: after a stall the sound server delivers buffered blocks in a
        burst. So the segment's start is the earliest of the estimates "arrival of a block less the
        duration of the segment up to that block's end", the one with the least delivery delay."""
        room = self.w.frames_per_segment - self.frames
        head, rest = block[:room], block[room:]
        self.file.write(head)
        self.frames += len(head)
        self.start_ts = min(self.start_ts, arrived - len(rest) / self.w.sensor.sample_rate_hz
                            - self.frames / self.w.sensor.sample_rate_hz)
        if time.monotonic() - self.synced_at >= self.sync_s:
            # Durable up to here within ~sync_s: a power cut loses at most that much (and a FLAC
            # block the encoder still holds). sf_write_sync is an fsync of the file.
            self.file.flush()
            if not self.entry_synced:
                fsio.fsync_dir(self.tmp.parent)
                self.entry_synced = True
            self.synced_at = time.monotonic()
        return rest

    def close(self) -> None:
        self.file.close()
        s = self.w.sensor
        start = self.w.clock.floor(self.start)  # never before the previous segment's end (clock steps)
        end = self.w.clock.floor(start + timedelta(seconds=self.frames / s.sample_rate_hz))
        metadata = {"sensor": s.name, "type": s.type, "backend": s.backend,
                    "start": clock.utc_iso(start), "end": clock.utc_iso(end),
                    "sample_rate_hz": s.sample_rate_hz, "channels": s.channels, "frames": self.frames,
                    "format": s.format, "subtype": s.subtype, "overflows": self.overflows,
                    "device": self.w.device_name, "trigger": self.capture.trigger, "schedule": self._schedule()}
        self.w.overflows_total += self.overflows
        if self.overflows:
            log.warning("segment had %d input overflow(s)", self.overflows)
        if self.w.lost_frames:
            metadata["lost_to_full_disk_s"] = self.w._lost_to_full_disk_s()
        if self.w.restart_gap is not None:
            metadata.update(rj.gap_metadata(self.w.restart_gap["last"], start))
        write_staged(self.w, start, end, metadata, tmp=self.tmp)
        self.w._space_returned()
        self.w.restart_gap, self.w.last_end = None, metadata["end"]
        self.header.unlink(missing_ok=True)
        try:   # so a crash before the next segment's first sync still knows where the audio ended
            rj.write_state(Spool(self.w.cfg.spool).state_file(s.name), {"last_end": self.w.last_end})
        except OSError as e:
            log.warning("cannot write the audio state: %s", e)

    def _schedule(self) -> dict:
        s = self.w.sensor
        if s.schedule == "continuous":
            return {"mode": "continuous", "segment_s": s.segment_s}
        return {"mode": "window", "window_start": s.window_start, "window_end": s.window_end,
                "timezone": s.timezone or "local", "capture_s": s.capture_s, "every_s": s.every_s,
                "slot": clock.utc_iso(self.capture.slot) if self.capture.slot else None}


# ---- salvage of a segment cut by a crash or power failure

def salvage_segment(worker, segment: Path) -> str | None:
    """Record *segment* (an open segment a crash left, :meth:`beemond.spool.Spool.open_segment`)
    up to its last durable frame, with ``truncated: true`` and its real end; return that end (ISO), or
    None when it held no whole frame (then it is removed). Raises ``OSError``, ``ValueError`` (no
    readable header) or ``RuntimeError`` (libsndfile)."""
    s = worker.sensor
    header_path = open_segment_header(segment)
    try:
        header = json.loads(header_path.read_bytes())
    except FileNotFoundError:
        header = {"start": segment.stat().st_mtime, "trigger": "unknown", "device": "", "schedule": None}
        log.warning("open segment %s has no header; its start is taken from its modification time", segment.name)
    fmt = open_segment_format(segment)
    if fmt == "wav":
        rate, channels, subtype, frames = _salvage_wav(segment)
    else:
        rate, channels, subtype, frames = _salvage_flac(worker.soundfile, segment)
    if frames == 0:
        segment.unlink(missing_ok=True)
        header_path.unlink(missing_ok=True)
        log.warning("open segment %s held no durable audio; removed", segment.name)
        return None
    start = datetime.fromtimestamp(header["start"], timezone.utc)
    end = start + timedelta(seconds=frames / rate)
    metadata = {"sensor": s.name, "type": s.type, "backend": s.backend,
                "start": clock.utc_iso(start), "end": clock.utc_iso(end),
                "sample_rate_hz": rate, "channels": channels, "frames": frames, "format": fmt,
                "subtype": subtype, "overflows": 0, "device": header.get("device", ""),
                "trigger": header.get("trigger", ""), "schedule": header.get("schedule"), "truncated": True}
    write_staged(worker, start, end, metadata, tmp=segment, ext=fmt)
    header_path.unlink(missing_ok=True)
    log.warning("salvaged a segment cut by a crash: %d frames (%.1f s), %s to %s", frames, frames / rate,
                metadata["start"], metadata["end"])
    return metadata["end"]


def _salvage_wav(path: Path) -> tuple[int, int, str, int]:
    """Fix a WAV's RIFF and data sizes in place for the whole frames on disk (trailing all-zero frames,
    an unsynced tail a power cut left as zeros, dropped). Returns (rate, channels, subtype, frames)."""
    with open(path, "r+b") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("not a RIFF/WAVE file")
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError("no data chunk")
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                body = f.read(size)
                _tag, channels, rate, _bps, align, bits = struct.unpack("<HHIIHH", body[:16])
                fmt = (rate, channels, f"PCM_{bits}", align)
                f.seek(size % 2, os.SEEK_CUR)
            elif cid == b"data":
                break
            else:
                f.seek(size + size % 2, os.SEEK_CUR)
        if fmt is None:
            raise ValueError("no fmt chunk before the data")
        rate, channels, subtype, align = fmt
        data_at = f.tell()
        total = os.fstat(f.fileno()).st_size
        length = (total - data_at) // align * align
        # Drop trailing zero frames, reading back in steps (a cut leaves at most ~1 s of them).
        step = align * 4096
        while length > 0:
            lo = max(0, length - step)
            f.seek(data_at + lo)
            chunk = f.read(length - lo).rstrip(b"\x00")
            length = lo + (len(chunk) + align - 1) // align * align
            if chunk:
                break
        f.truncate(data_at + length)
        f.seek(4)
        f.write(struct.pack("<I", data_at + length - 8))
        f.seek(data_at - 4)
        f.write(struct.pack("<I", length))
        f.flush()
        os.fsync(f.fileno())
    return rate, channels, subtype, length // align


def _salvage_flac(soundfile, path: Path) -> tuple[int, int, str, int]:
    """Decode every FLAC frame that reads back (libFLAC resynchronises on frame headers and checks each
    frame's CRC; a torn or zero tail ends the stream) and write them to a fresh FLAC beside *path*,
    which then replaces it. Returns (rate, channels, subtype, frames)."""
    import numpy as np

    with soundfile.SoundFile(path) as src:
        rate, channels, subtype = src.samplerate, src.channels, src.subtype
        dtype = "int16" if subtype == "PCM_16" else "int32"
        blocks, frames = [], 0
        while True:
            try:
                block = src.read(4096, dtype=dtype, always_2d=True)
            except (RuntimeError, soundfile.LibsndfileError):  # the torn tail
                break
            if not len(block):
                break
            blocks.append(block)
            frames += len(block)
    tmp = fsio.temp_name(path.parent, path.name.lstrip("."))
    if frames:
        with soundfile.SoundFile(tmp, "w", samplerate=rate, channels=channels, subtype=subtype, format="FLAC") as dst:
            dst.write(np.concatenate(blocks))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return rate, channels, subtype, frames


def no_room_to_salvage(segment: Path) -> bool:
    """True when the file system lacks room for a copy of *segment* and its sidecar (FLAC is re-encoded)."""
    try:
        return shutil.disk_usage(segment.parent).free < segment.stat().st_size + 65536
    except OSError:
        return True


def set_aside(worker, segment: Path) -> None:
    """An open segment that cannot be salvaged goes to ``failed/<sensor>/`` for a human (never deleted)."""
    dest = Spool(worker.cfg.spool).failed_dir(worker.sensor.name) / open_segment_record_name(segment)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(segment, dest)
    open_segment_header(segment).unlink(missing_ok=True)
