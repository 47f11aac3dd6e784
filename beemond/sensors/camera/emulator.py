"""A stand-in for ``picamera2``: the methods beemond's camera driver calls, producing synthetic frames.

:class:`StandInBackend` has the three names the driver takes from picamera2 (``Picamera2``,
``H264Encoder``, ``PyavOutput``), with the same call signatures as picamera2 0.3 (Picamera2 manual,
chapters 4 "Capturing images" and 7 "Capturing videos"):

- ``Picamera2.create_still_configuration(main={"size": (w, h)}, ...)`` and
  ``create_video_configuration(main=..., controls={"FrameRate": fps})`` return configuration dicts;
  ``configure``, ``start``, ``stop``, ``close``; ``capture_array("main")`` (an H x W x 3 uint8 frame),
  ``capture_file(file, format="jpeg")`` (a real JPEG, Pillow, quality from ``options["quality"]``),
  ``capture_metadata()`` (waits for the next frame); ``start_recording(encoder, output)`` and
  ``stop_recording()``.
- Frames come at the configured frame rate on the monotonic clock. A recording encodes every frame
  with H.264 (libx264 through PyAV, the library picamera2's own ``PyavOutput`` muxes with) into a
  real MP4 container, so a test can decode the clip and check its size, rate and frame count.

Frames are a diagonal gradient moving 4 pixels per frame, plus a little noise, so consecutive
frames differ and a JPEG of one is not trivially compressible.

A camera can be told to stall (``stall_after_frames``): after that many frames every call that
waits for a frame blocks until ``close()``, like the silent stalls picamera2 shows after hours of
capture. :attr:`StandInBackend.stalling_opens` says which opened cameras (1 = the first) stall.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from fractions import Fraction

import numpy as np
from beemond.errors import PersistentSensorError


class CameraClosed(PersistentSensorError):
    """A call on a closed (or, after a stall, abandoned) stand-in camera."""


class StandInBackend:
    """picamera2's names, bound to stand-ins. ``stalling_opens``: 1-based numbers of the
    ``Picamera2()`` objects that stall after ``stall_after_frames`` frames (``"all"`` for every one)."""

    def __init__(self, stall_after_frames: int | None = None, stalling_opens=(1,)):
        self.stall_after_frames = stall_after_frames
        self.stalling_opens = stalling_opens
        self.cameras: list[StandInPicamera2] = []
        backend = self

        class Picamera2(StandInPicamera2):
            def __init__(self, camera_num: int = 0):
                n = len(backend.cameras) + 1
                stalls = backend.stalling_opens == "all" or n in backend.stalling_opens
                super().__init__(camera_num, backend.stall_after_frames if stalls else None)
                backend.cameras.append(self)

        self.Picamera2 = Picamera2
        self.H264Encoder = StandInH264Encoder
        self.PyavOutput = StandInPyavOutput


class StandInPicamera2:
    def __init__(self, camera_num: int = 0, stall_after_frames: int | None = None):
        self.camera_num = camera_num
        self.options = {"quality": 90, "compress_level": 1}
        self.stall_after_frames = stall_after_frames
        self.config: dict | None = None
        self.started = False
        self.closed = False
        self.frames = 0               # frames produced since open
        self.calls: list[str] = []    # method names, in order, for tests
        self._t0 = 0.0
        self._closed_event = threading.Event()
        self._new_frame = threading.Condition()
        self._recording: tuple | None = None
        self._rec_thread: threading.Thread | None = None
        self._rng = np.random.default_rng(camera_num)

    # ---- configuration (dicts, as picamera2's CameraConfiguration converts to and from)
    def create_still_configuration(self, main=None, controls=None, **kw) -> dict:
        return {"use_case": "still", "main": {"size": (4056, 3040), "format": "BGR888", **(main or {})},
                "controls": dict(controls or {})}

    def create_video_configuration(self, main=None, controls=None, **kw) -> dict:
        return {"use_case": "video", "main": {"size": (1280, 720), "format": "XBGR8888", **(main or {})},
                "controls": {"FrameRate": 30.0, **(controls or {})}}

    def configure(self, config: dict) -> None:
        self._check()
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        self.calls.append("configure")
        self.config = config

    @property
    def fps(self) -> float:
        return float(self.config["controls"].get("FrameRate", 30.0))

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.config["main"]["size"])

    def start(self) -> None:
        self._check()
        if self.config is None:
            self.configure(self.create_still_configuration())
        self.calls.append("start")
        self.started = True
        self._t0 = time.monotonic()
        self._next_frame = 0

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True
        self._closed_event.set()  # first: wakes a stalled frame wait, so the recorder thread can end
        with self._new_frame:
            self._new_frame.notify_all()
        if self._recording is not None:
            self.stop_recording()
        self.started = False

    # ---- frames
    def _check(self) -> None:
        if self.closed:
            raise CameraClosed("camera is closed")

    def _wait_frame(self) -> int:
        """Block until the next frame is due; return its index. Stalls (forever, until close) on cue."""
        self._check()
        if not self.started:
            raise RuntimeError("camera is not started")
        if self.stall_after_frames is not None and self.frames >= self.stall_after_frames:
            self._closed_event.wait()
            raise CameraClosed("camera closed while waiting for a frame")
        index = self._next_frame
        due = self._t0 + index / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with self._new_frame:
            self._next_frame += 1
            self.frames += 1
            self._new_frame.notify_all()
        return index

    def _render(self, index: int) -> np.ndarray:
        w, h = self.size
        x = np.arange(w, dtype=np.int32)[None, :]
        y = np.arange(h, dtype=np.int32)[:, None]
        diag = ((x + y + 4 * index) % 256).astype(np.uint8)
        frame = np.empty((h, w, 3), np.uint8)
        frame[..., 0] = diag
        frame[..., 1] = (diag.astype(np.int32) + 85) % 256
        frame[..., 2] = (y * 255 // max(1, h - 1)).astype(np.uint8)
        noise = self._rng.integers(0, 8, size=(h, w, 1), dtype=np.uint8)
        return frame + np.minimum(noise, 255 - frame)

    def capture_array(self, name: str = "main", wait=None, signal_function=None) -> np.ndarray:
        self.calls.append("capture_array")
        return self._render(self._wait_frame())

    def capture_metadata(self, wait=None, signal_function=None) -> dict:
        if self._recording is None:
            index = self._wait_frame()
        else:  # the encoder's thread draws the frames: wait for its next one
            with self._new_frame:
                seen = self.frames
                while self.frames == seen:
                    self._check()
                    self._new_frame.wait()
                index = self._next_frame - 1
        return {"SensorTimestamp": int((self._t0 + index / self.fps) * 1e9), "FrameDuration": int(1e6 / self.fps)}

    def capture_file(self, file_output, name: str = "main", format=None, wait=None, signal_function=None,
                     exif_data=None) -> dict:
        from PIL import Image

        self.calls.append("capture_file")
        frame = self.capture_array(name)
        fmt = (format or str(file_output).rsplit(".", 1)[-1]).upper().replace("JPG", "JPEG")
        Image.fromarray(frame, "RGB").save(file_output, format=fmt, quality=self.options["quality"])
        return {"FrameDuration": int(1e6 / self.fps)}

    # ---- video
    def start_recording(self, encoder, output, pts=None, config=None, quality=None, name=None) -> None:
        self._check()
        if config is not None:
            self.configure(config)
        self.calls.append("start_recording")
        w, h = self.size
        output.start()
        output.add_video_stream(w, h, self.fps, encoder.bitrate)
        self.start()
        self._recording = (encoder, output)
        self._rec_thread = threading.Thread(target=self._record, name="standin-encoder", daemon=True)
        self._rec_thread.start()

    def _record(self) -> None:
        encoder, output = self._recording
        try:
            while self._recording is not None and self.started:
                index = self._wait_frame()
                if self._recording is None:
                    break
                output.encode(self._render(index), index)
        except CameraClosed:
            pass
        except Exception as e:  # reported like picamera2's output error_callback
            output._failed(e)

    def stop_recording(self) -> None:
        self.calls.append("stop_recording")
        recording, self._recording = self._recording, None
        self.started = False
        if self._rec_thread is not None and self._rec_thread is not threading.current_thread():
            self._rec_thread.join(timeout=10)
        if recording is not None:
            recording[1].stop()


class StandInH264Encoder:
    """``picamera2.encoders.H264Encoder(bitrate=None, repeat=False, iperiod=None, ...)``."""

    def __init__(self, bitrate=None, repeat=False, iperiod=None, framerate=None, qp=None, profile=None):
        self.bitrate = bitrate


class StandInPyavOutput:
    """``picamera2.outputs.PyavOutput(output_name, format=None)``: muxes H.264 into a container with PyAV.

    As picamera2's ``outputframe`` does, the first failed write (``ENOSPC`` on a full disk) closes the
    container, forgets it and calls ``error_callback(exception)``; later frames and ``stop()`` then
    write nothing. (Flushing the encoder into a container whose write failed would crash libav with
    SIGSEGV: PyAV 18, libavformat's mp4 muxer.)"""

    def __init__(self, output_name, format=None, pts=None):
        self.output_name = output_name
        self.format = format
        self.container = None
        self.stream = None
        self.error: Exception | None = None
        self.error_callback = None
        self.frames = 0

    def start(self) -> None:
        try:
            import av
        except ImportError:
            raise RuntimeError("the camera stand-in encodes clips with PyAV: pip install av") from None
        self.container = av.open(str(self.output_name), "w", format=self.format)

    def add_video_stream(self, width: int, height: int, fps: float, bitrate) -> None:
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                                options={"preset": "ultrafast"})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        if bitrate:
            self.stream.bit_rate = int(bitrate)

    def encode(self, frame: np.ndarray, index: int) -> None:
        import av

        if self.container is None:   # closed after a failed write
            return
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = index
        try:
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
        except Exception as e:
            self._failed(e)
            return
        self.frames += 1

    def _failed(self, e: Exception) -> None:
        container, self.container = self.container, None
        with contextlib.suppress(Exception):
            container.close()
        self.error = e
        if self.error_callback is not None:
            self.error_callback(e)

    def stop(self) -> None:
        if self.container is not None:
            try:
                for packet in self.stream.encode():
                    self.container.mux(packet)
                self.container.close()
                self.container = None
            except Exception as e:
                self._failed(e)


def decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG decoded with Pillow (for tests and checks)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
