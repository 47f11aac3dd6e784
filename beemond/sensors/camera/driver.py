"""Raspberry Pi camera through picamera2: JPEG or NumPy stills at an interval, H.264 clips in MP4.

Follows the Picamera2 manual (Raspberry Pi Ltd, 2024), chapters 3 (configuration), 4 (capturing
images) and 7 (capturing videos):

- stills: ``create_still_configuration(main={"size": (w, h), "format": "RGB888"})``, ``configure``,
  ``start``, then ``capture_file(file, format="jpeg")`` (quality from ``options["quality"]``) or
  ``capture_array("main")`` per frame of a burst (an H x W x 3 uint8 array in picamera2's RGB888
  layout, which is B, G, R byte order) saved as ``.npy`` (``records.ArrayArchiver``; with
  ``split_data_array`` one record per frame, named with ``_split_index``);
- clips: ``create_video_configuration(main={"size": (w, h)}, controls={"FrameRate": fps})``,
  ``start_recording(H264Encoder(bitrate), PyavOutput(tmp, format="mp4"))`` for ``clip_s`` seconds,
  then ``stop_recording``. The clip is written under a temporary name in staging, fsynced and renamed.

Full disk: a clip is not started unless the spool's file system has room for it (``bitrate_bps / 8 *
clip_s``, with half again for the container and a reading's worth of slack, above
``[daemon] spool_min_free_bytes``): the encoder is never handed a disk it cannot finish on. A write
that fails anyway is reported by the output's ``error_callback`` (picamera2's ``PyavOutput`` closes its
container at the first failed ``mux`` and calls it; flushing an encoder into a container whose write
failed crashes libav with SIGSEGV), and the clip's temporary file is removed at once. A capture that
fails for space (``ENOSPC``, ``EDQUOT``) is logged, reported and skipped: it is not a camera fault,
so it neither counts towards ``MAX_CONSECUTIVE_FAILURES`` nor is retried; the next due capture tries again.

``picamera2`` is imported in the worker only (Raspberry Pi OS: ``apt install python3-picamera2``; a
venv needs ``--system-site-packages`` to see it). ``backend = "simulated"`` and the tests use
:mod:`beemond.sensors.camera.emulator`'s stand-in with the same methods; this module's code is the same.

Stall watchdog: picamera2 can stop delivering frames without an error after hours of capture. Every
camera call runs on a helper thread and the run loop waits for it with a deadline (``stall_timeout_s``
for each frame; during a clip ``capture_metadata`` is called frame by frame, so a clip stalls as soon as
no frame arrives for ``stall_timeout_s``). On a stall the camera object is closed and abandoned, with
its helper thread; the capture is retried on a fresh ``Picamera2()`` after a short backoff. Stalls and
errors are counted (``stalls``, ``errors`` in record metadata and ERROR events); after
``MAX_CONSECUTIVE_FAILURES`` failed attempts in a row the worker exits non-zero and the orchestrator
restarts it. A failed capture is never replaced by anything: there is simply no record.

Schedule: a still every ``still_interval_s`` and a clip every ``clip_interval_s`` (0: off), due times on
the monotonic clock; with ``daylight_only`` a due capture is skipped when the sun is down at
(``latitude``, ``longitude``) at that UTC wall time (:mod:`beemond.sensors.camera.daylight`). A
``capture_now`` command (a GPIO trigger) takes a still or a clip (``on_capture_now``) at any hour.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from beemond import ipc, records
from beemond.core import clock, fsio, names
from beemond.sensors import seams
from beemond.sensors.base import MAX_CONSECUTIVE_FAILURES, SensorFailure, write_staged
from beemond.sensors.power import power_switch
from beemond.spool import Spool
from beemond.errors import PersistentSensorError
from beemond.worker import Worker

log = logging.getLogger(__name__)

RETRIES = 2                 # further attempts of one capture, each on a fresh camera
BACKOFF_S = (0.5, 2.0)      # before each retry
CLOSE_TIMEOUT_S = 5.0       # a stalled camera's close() may hang too: give up on it after this
START_GRACE_S = 5.0         # configure/start/open take a while on a Pi: added to their deadline
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CameraUnavailable(PersistentSensorError):
    """picamera2 is not installed (or the camera cannot be opened at all)."""


class CameraStall(PersistentSensorError):
    """No frame (or no answer from the camera) within ``stall_timeout_s``."""


def hardware_backend(clips: bool = True):
    """picamera2's ``Picamera2``, ``H264Encoder`` and ``PyavOutput``. Raises :class:`CameraUnavailable`.
    Without *clips* the encoder and output stay unimported (``None``): ``picamera2.outputs`` imports
    PyAV, about 19 MB in this process, which a stills-only camera never uses."""
    try:
        from picamera2 import Picamera2
        H264Encoder = PyavOutput = None
        if clips:
            from picamera2.encoders import H264Encoder
            from picamera2.outputs import PyavOutput
    except ImportError as e:
        raise CameraUnavailable(
            f"the camera needs the picamera2 package (0.3.20 or later, for PyavOutput), which could not be "
            f"imported ({e}); on Raspberry Pi OS: sudo apt install python3-picamera2, and create beemond's "
            f"venv with --system-site-packages so it can see it") from None

    class Backend:
        pass

    b = Backend()
    b.Picamera2, b.H264Encoder, b.PyavOutput = Picamera2, H264Encoder, PyavOutput
    return b


class _Runner:
    """One helper thread that runs camera calls in order; callers wait with a deadline.

    A call that misses its deadline raises :class:`CameraStall` and the runner is abandoned: its thread
    may stay blocked inside the camera library for good (a daemon thread, gone at exit).
    """

    def __init__(self, beat):
        self.jobs: queue.Queue = queue.Queue()
        self.beat = beat
        threading.Thread(target=self._loop, name="camera-call", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            done.set()

    def call(self, fn, timeout: float, what: str):
        box: list = []
        done = threading.Event()
        self.jobs.put((fn, box, done))
        deadline = time.monotonic() + timeout
        while not done.wait(max(0.0, min(0.5, deadline - time.monotonic()))):
            self.beat()
            if time.monotonic() >= deadline:
                raise CameraStall(f"camera stalled: no answer to {what} within {timeout:g} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.jobs.put(None)


class CameraWorker(Worker):
    """Stills and clips on a schedule and on ``capture_now``; see the module docstring."""

    ext = "jpg"

    def __init__(self, cfg, sensor, channel: ipc.Channel, backend=None):
        self.cfg, self.sensor, self.channel = cfg, sensor, channel
        self.spool = Spool(cfg.spool)
        self.name = sensor.name   # the owner of its records (beemond.records)
        self.staging = self.spool.staging_dir(sensor.name)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.template = cfg.template_for(sensor)
        if backend is None:
            clips = sensor.clip_interval_s > 0 or sensor.on_capture_now == "clip"
            backend = seams.camera_backend(sensor, lambda: hardware_backend(clips=clips))
        self.backend = backend
        self.daylight = None
        if sensor.daylight_only:
            from beemond.sensors.camera.daylight import Daylight

            self.daylight = Daylight(sensor.latitude, sensor.longitude, sensor.sunrise_offset_min,
                                     sensor.sunset_offset_min)
        self.power = power_switch(sensor, channel.beat)
        self.cam = None
        self.mode: str | None = None          # "still" (configured and started) or None
        self.runner: _Runner | None = None
        self.stalls = 0                       # since this worker started
        self.errors = 0
        self.opens = 0
        self.consecutive_failures = 0
        self.skipped_night = 0
        self.paused = False
        self._night_logged = False

    # ---- camera calls, each on the runner with a deadline
    def _call(self, fn, what: str, timeout: float | None = None):
        if self.runner is None:
            self.runner = _Runner(self.channel.beat)
        return self.runner.call(fn, timeout or self.sensor.stall_timeout_s, what)

    def _open(self) -> None:
        if self.cam is None:
            self.cam = self._call(self.backend.Picamera2, "Picamera2()", self.sensor.stall_timeout_s + START_GRACE_S)
            self.cam.options["quality"] = self.sensor.jpeg_quality
            self.opens += 1
            self.mode = None

    def _abandon(self) -> None:
        """Close the camera (if it answers) and forget it and its helper thread: the next capture opens
        a fresh ``Picamera2()``."""
        cam, runner = self.cam, self.runner
        self.cam, self.runner, self.mode = None, None, None
        if cam is not None:
            closer = _Runner(self.channel.beat)
            try:
                closer.call(cam.close, CLOSE_TIMEOUT_S, "close()")
                closer.stop()
            except CameraStall:
                log.error("the stalled camera did not close within %g s; abandoning it", CLOSE_TIMEOUT_S)
            except Exception as e:
                log.warning("closing the camera failed: %s", e)
                closer.stop()
        if runner is not None:
            runner.stop()

    def _still_mode(self) -> None:
        if self.mode == "still":
            return
        s = self.sensor

        def configure():
            cam = self.cam
            cam.stop()
            cam.configure(cam.create_still_configuration(main={"size": (s.width, s.height), "format": "RGB888"}))
            cam.start()
        self._call(configure, "configure/start", s.stall_timeout_s + START_GRACE_S)
        self.mode = "still"

    # ---- captures
    def _take_still(self, reason: str) -> list[Path]:
        s = self.sensor
        self._open()
        self._still_mode()
        start = datetime.now(timezone.utc)
        cam = self.cam
        if s.format == "jpeg":
            def grab():
                buf = io.BytesIO()
                cam.capture_file(buf, format="jpeg")
                return buf.getvalue()
            data = self._call(grab, "capture_file")
        else:
            import numpy as np

            frames = [self._call(lambda: cam.capture_array("main"), "capture_array") for _ in range(s.burst_frames)]
            data = np.stack(frames) if s.burst_frames > 1 else frames[0]
        end = datetime.now(timezone.utc)
        meta = self._metadata(start, end, reason, kind="still", format=s.format)
        if s.format == "jpeg":
            return [write_staged(self, start, end, meta, data_writer=lambda f: f.write(data), ext="jpg")]
        meta.update(shape=list(data.shape), dtype=str(data.dtype), frames=s.burst_frames,
                    pixel_order="BGR" if self.sensor.backend == "hardware" else "RGB")
        arrays = records.ArrayArchiver(s.split_data_array)
        paths = []
        for index, part in arrays.parts(data):
            part_meta = {**meta, "split_index": index, "shape": list(part.shape)} if s.split_data_array else meta
            paths.append(write_staged(self, start, end, part_meta, data_writer=arrays.writer(part),
                                      split_index=index, ext="npy"))
        return paths

    def _check_room_for_clip(self) -> None:
        """Raise ``OSError(ENOSPC)`` unless staging's file system has room for a whole clip."""
        s = self.sensor
        need = int(s.bitrate_bps / 8 * s.clip_s * 1.5) + 2**20 + self.cfg.daemon.spool_min_free_bytes
        free = self.spool.free_bytes()
        if free < need:
            raise OSError(errno.ENOSPC, f"{free} bytes free on the spool's file system; a {s.clip_s:g} s clip "
                                        f"needs about {need} (with daemon.spool_min_free_bytes kept free)")

    def _take_clip(self, reason: str) -> list[Path]:
        s = self.sensor
        self._check_room_for_clip()
        self._open()
        cam, backend = self.cam, self.backend
        start = datetime.now(timezone.utc)
        tmp = fsio.temp_name(self.staging, f"clip-{names.utc_stamp(start)}")
        encoder = backend.H264Encoder(bitrate=s.bitrate_bps)
        output = backend.PyavOutput(str(tmp), format="mp4")
        write_errors: list[BaseException] = []
        output.error_callback = write_errors.append   # called from the encoder's thread

        def begin():
            cam.stop()
            cam.configure(cam.create_video_configuration(main={"size": (s.width, s.height)},
                                                         controls={"FrameRate": s.framerate_fps}))
            cam.start_recording(encoder, output)
        self.mode = None  # from here on the camera is not in still mode
        try:
            self._call(begin, "start_recording", s.stall_timeout_s + START_GRACE_S)
            frames = 0
            until = time.monotonic() + s.clip_s
            while time.monotonic() < until:
                self._call(cam.capture_metadata, "capture_metadata")  # one frame, or a stall
                frames += 1
            self._call(cam.stop_recording, "stop_recording", s.stall_timeout_s + START_GRACE_S)
            if write_errors:
                e = write_errors[0]
                raise OSError(getattr(e, "errno", None) or errno.EIO, f"writing the clip failed: {e}") from e
            end = datetime.now(timezone.utc)
            meta = self._metadata(start, end, reason, kind="clip", format="mp4", codec="h264",
                                  framerate_fps=s.framerate_fps, bitrate_bps=s.bitrate_bps, frames_seen=frames)
            return [write_staged(self, start, end, meta, tmp=tmp, ext="mp4")]
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()   # now, not at the next start: on a full disk its space is what is missing
            raise

    def _metadata(self, start, end, reason, **extra) -> dict:
        s = self.sensor
        return {"sensor": s.name, "type": s.type, "backend": s.backend, "start": clock.utc_iso(start),
                "end": clock.utc_iso(end), "width": s.width, "height": s.height, "reason": reason,
                "stalls": self.stalls, "errors": self.errors, "opens": self.opens, **extra}

    def capture(self, kind: str, reason: str) -> list[Path]:
        """One still or clip, retried on a fresh camera after a stall or error. Returns the records
        written ([] if every attempt failed). Raises :class:`SensorFailure` after
        ``MAX_CONSECUTIVE_FAILURES`` failed attempts in a row."""
        take = self._take_still if kind == "still" else self._take_clip
        for attempt in range(RETRIES + 1):
            try:
                with self.power:
                    paths = take(reason)
                    if self.sensor.power_pin is not None:
                        self._abandon()  # closed before its power goes off; reopened next time
                self.consecutive_failures = 0
                return paths
            except CameraUnavailable:
                raise
            except Exception as e:
                if isinstance(e, OSError) and e.errno in NO_SPACE:
                    log.warning("%s skipped: no space (%s)", kind, e)
                    self.channel.send(ipc.ERROR, message=f"camera {kind} skipped: {e}", stalls=self.stalls,
                                      errors=self.errors)
                    if kind == "clip":
                        self._abandon()   # a recording cut short: the next starts on a fresh camera
                    return []
                stalled = isinstance(e, CameraStall)
                self.stalls += stalled
                self.errors += not stalled
                self.consecutive_failures += 1
                log.warning("%s failed (attempt %d, %d in a row, %d stall(s) so far): %s",
                            kind, attempt + 1, self.consecutive_failures, self.stalls, e)
                self.channel.send(ipc.ERROR, message=f"camera {kind} failed: {e}", stalls=self.stalls,
                                  errors=self.errors)
                self._abandon()
                if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                    raise SensorFailure(f"{self.consecutive_failures} camera attempts in a row failed: {e}") from e
                if attempt < RETRIES:
                    self._sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        return []

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.channel.beat()
            time.sleep(min(left, 0.5))

    def _daytime(self) -> bool:
        if self.daylight is None or self.daylight.is_daylight(datetime.now(timezone.utc)):
            self._night_logged = False
            return True
        if not self._night_logged:
            log.info("the sun is down at %g,%g: scheduled captures paused", self.sensor.latitude, self.sensor.longitude)
            self._night_logged = True
        self.skipped_night += 1
        return False

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        s = self.sensor
        log.info("camera: %s", s.describe())
        now = time.monotonic()
        self.intervals = {"still": s.still_interval_s, "clip": s.clip_interval_s}
        self.due = {kind: now for kind, every in self.intervals.items() if every}

    def timeout(self) -> float:
        return max(0.0, min(self.due.values()) - time.monotonic()) if self.due and not self.paused else 3600.0

    def on_start(self, cmd: ipc.Start) -> None:
        self.paused = False
        self.due = {kind: time.monotonic() for kind in self.due}

    def on_capture_now(self, cmd: ipc.CaptureNow) -> None:
        self.capture(self.sensor.on_capture_now, cmd.reason or "capture_now")

    def tick(self) -> None:
        if self.paused:
            return
        for kind in list(self.due):
            now = time.monotonic()
            if now < self.due[kind]:
                continue
            if self._daytime():
                self.capture(kind, "schedule")
            self.due[kind] += self.intervals[kind]
            if self.due[kind] < time.monotonic():  # a capture ran long: skip, do not burst
                self.due[kind] = time.monotonic() + self.intervals[kind]

    def cleanup(self) -> None:
        self._abandon()
        self.power.close()
