"""The camera driver (beemond.sensors.camera.driver) in process against the picamera2 stand-in
(beemond.sensors.camera.emulator), and the daylight schedule (beemond.sensors.camera.daylight)."""

from __future__ import annotations

import json
import multiprocessing
import queue
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import av
import numpy as np
import pytest

from beemond import config, ipc
from beemond.sensors.base import SensorFailure
from beemond.sensors.camera.driver import CameraWorker
from beemond.sensors.camera.daylight import Daylight
from beemond.sensors.camera.emulator import StandInBackend, decode_jpeg
from beemond.spool import Spool
from conftest import make_config, wait_for


class Rig:
    """A CameraWorker on a real ipc.Channel, run in a thread; its events collected from the pipe."""

    def __init__(self, tmp_path: Path, keys, password_file, backend=None, **camera):
        over = {"sensors.cam.type": "camera", "sensors.cam.backend": "simulated", "sensors.cam.width": 64,
                "sensors.cam.height": 48, "sensors.cam.still_interval_s": 0, "sensors.cam.stall_timeout_s": 0.5}
        over.update({f"sensors.cam.{k}": v for k, v in camera.items()})
        self.cfg = config.load(make_config(tmp_path, keys, password_file, 21, **over))
        self.sensor = next(s for s in self.cfg.sensors if s.name == "cam")
        self.commands: queue.Queue = queue.Queue()
        self.reader, writer = multiprocessing.Pipe(duplex=False)
        self.channel = ipc.Channel("cam", self.commands, writer, 0.2)
        self.backend = backend or StandInBackend()
        self.worker = CameraWorker(self.cfg, self.sensor, self.channel, backend=self.backend)
        self.staging = Spool(tmp_path / "spool").staging_dir("cam")
        self.events: list[ipc.Event] = []
        self.error: BaseException | None = None

    def start(self) -> "Rig":
        def run():
            try:
                self.worker.run()
            except BaseException as e:  # the worker process would exit non-zero with it
                self.error = e
        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.commands.put(ipc.Shutdown())
        self.thread.join(30)
        assert not self.thread.is_alive()

    def drain(self) -> list[ipc.Event]:
        while self.reader.poll():
            self.events.append(self.reader.recv())
        return self.events

    def records(self, pattern: str) -> list[Path]:
        return sorted(self.staging.glob(pattern))


def meta(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".meta.json").read_text())


def test_stills_are_jpegs_of_the_configured_size_on_a_schedule(tmp_path, keys, password_file):
    rig = Rig(tmp_path, keys, password_file, width=320, height=240, still_interval_s=0.3, jpeg_quality=80).start()
    try:
        wait_for(lambda: len(rig.records("*.jpg")) >= 3, 15, "three stills")
    finally:
        rig.stop()
    stills = rig.records("*.jpg")
    images = [decode_jpeg(p.read_bytes()) for p in stills]
    assert all(img.shape == (240, 320, 3) for img in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1, "consecutive frames differ"
    m = meta(stills[0])
    assert m["reason"] == "schedule" and m["width"] == 320 and m["stalls"] == 0
    cam = rig.backend.cameras[0]
    assert len(rig.backend.cameras) == 1, "the camera stays open between stills"
    assert cam.config["main"]["size"] == (320, 240) and cam.options["quality"] == 80
    assert cam.closed, "closed at shutdown"
    ready = [e for e in rig.drain() if e.kind == ipc.READY_EVENT]
    assert len(ready) == len(stills)


def test_capture_now_takes_a_clip_in_mp4_with_size_and_frame_rate(tmp_path, keys, password_file):
    rig = Rig(tmp_path, keys, password_file, width=160, height=120, framerate_fps=25, clip_s=1.0,
              on_capture_now="clip").start()
    try:
        rig.commands.put(ipc.CaptureNow(reason="gpio.button (button)"))
        wait_for(lambda: rig.records("*.mp4"), 15, "a clip")
    finally:
        rig.stop()
    clip = rig.records("*.mp4")[0]
    assert meta(clip)["reason"] == "gpio.button (button)" and meta(clip)["codec"] == "h264"
    with av.open(str(clip)) as container:
        assert "mp4" in container.format.name
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (160, 120)
        assert stream.average_rate == 25
        frames = sum(1 for _ in container.decode(stream))
    assert 20 <= frames <= 30, f"about clip_s x fps frames, got {frames}"
    assert not list(rig.staging.glob(".*")), "no temporary file left"


def test_a_stalled_camera_is_closed_and_reopened_and_counted(tmp_path, keys, password_file):
    backend = StandInBackend(stall_after_frames=2, stalling_opens=(1,))
    rig = Rig(tmp_path, keys, password_file, backend=backend, still_interval_s=0.2).start()
    try:
        wait_for(lambda: len(rig.records("*.jpg")) >= 4, 20, "stills after the stall")
    finally:
        rig.stop()
    assert rig.error is None
    assert len(backend.cameras) >= 2, "a fresh Picamera2 after the stall"
    first = backend.cameras[0]
    assert first.closed and first.frames == 2, "the stalled camera was closed"
    stalls = [e for e in rig.drain() if e.kind == ipc.ERROR]
    assert stalls and stalls[0].stalls == 1 and "stalled" in stalls[0].message
    later = [meta(p) for p in rig.records("*.jpg")][2:]
    assert later and all(m["stalls"] == 1 and m["opens"] == 2 for m in later)


def test_a_camera_that_always_stalls_makes_the_worker_exit(tmp_path, keys, password_file):
    backend = StandInBackend(stall_after_frames=0, stalling_opens="all")
    rig = Rig(tmp_path, keys, password_file, backend=backend, still_interval_s=0.2).start()
    rig.thread.join(30)
    assert isinstance(rig.error, SensorFailure), rig.error
    assert all(c.closed for c in backend.cameras) and len(backend.cameras) == 5
    assert not rig.records("*.jpg"), "nothing invented"


def test_npy_burst_split_into_one_file_per_frame_named_with_split_index(tmp_path, keys, password_file):
    rig = Rig(tmp_path, keys, password_file, format="npy", burst_frames=3, split_data_array=True,
              filename_template="{{ sensor }}_{{ start }}_{{ _split_index }}.{{ ext }}").start()
    try:
        rig.commands.put(ipc.CaptureNow())
        wait_for(lambda: len(rig.records("*.npy")) == 3, 15, "three frames")
    finally:
        rig.stop()
    files = rig.records("*.npy")
    assert [p.stem.rsplit("_", 1)[1] for p in files] == ["0", "1", "2"]
    frames = [np.load(p, allow_pickle=False) for p in files]
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[1])
    assert [meta(p)["split_index"] for p in files] == [0, 1, 2]


def test_missing_picamera2_names_the_package_and_the_fix(tmp_path):
    code = ("from beemond.sensors.camera.driver import hardware_backend, CameraUnavailable\n"
            "try:\n    hardware_backend()\nexcept CameraUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "picamera2" in out and "apt install python3-picamera2" in out


# ----------------------------------------------------------------------------------- daylight

def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_london_midsummer_sunrise_and_sunset_match_the_almanac():
    # timeanddate.com, London, 21 June 2024: sunrise 04:43, sunset 21:21 BST (UTC+1).
    d = Daylight(51.5072, -0.1276)
    rise, set_ = d.sun_times(at("2024-06-21T12:00").date())
    assert abs((rise - at("2024-06-21T03:43")).total_seconds()) <= 180
    assert abs((set_ - at("2024-06-21T20:21")).total_seconds()) <= 180
    assert not d.is_daylight(at("2024-06-21T03:30")) and d.is_daylight(at("2024-06-21T03:50"))
    assert d.is_daylight(at("2024-06-21T20:15")) and not d.is_daylight(at("2024-06-21T20:30"))


def test_offsets_and_a_day_that_spans_two_utc_dates():
    london = Daylight(51.5072, -0.1276, sunrise_offset_min=30, sunset_offset_min=-30)
    assert not london.is_daylight(at("2024-06-21T04:00")) and london.is_daylight(at("2024-06-21T04:20"))
    assert not london.is_daylight(at("2024-06-21T20:00"))
    # Auckland, 21 June 2024 (winter): sunrise 07:33, sunset 17:11 NZST (UTC+12), i.e. 19:33 and 05:11 UTC
    auckland = Daylight(-36.8485, 174.7633)
    assert auckland.is_daylight(at("2024-06-21T00:00")) and auckland.is_daylight(at("2024-06-20T20:00"))
    assert not auckland.is_daylight(at("2024-06-21T10:00"))


def test_polar_day_and_polar_night_do_not_crash():
    tromso = Daylight(69.6492, 18.9553)
    assert tromso.sun_times(at("2024-06-21T00:00").date()) == (None, None)
    assert all(tromso.is_daylight(at(f"2024-06-21T{h:02d}:00")) for h in range(0, 24, 3)), "midnight sun"
    assert not any(tromso.is_daylight(at(f"2024-12-21T{h:02d}:00")) for h in range(0, 24, 3)), "polar night"
    assert Daylight(-90, 0).is_daylight(at("2024-12-21T00:00")) and not Daylight(90, 0).is_daylight(at("2024-12-21T00:00"))


def test_daylight_only_skips_scheduled_stills_at_night_but_not_capture_now(tmp_path, keys, password_file):
    # Whichever pole is in its polar night now: the sun stays down all day there.
    now = datetime.now(timezone.utc)
    dark = [lat for lat in (90.0, -90.0) if not Daylight(lat, 0).is_daylight(now)]
    if not dark:
        pytest.skip("both poles are lit (equinox); the night case is covered by the polar test")
    rig = Rig(tmp_path, keys, password_file, still_interval_s=0.1, daylight_only=True, latitude=dark[0],
              longitude=0.0).start()
    try:
        wait_for(lambda: rig.worker.skipped_night >= 3, 10, "skipped night stills")
        assert not rig.records("*.jpg")
        rig.commands.put(ipc.CaptureNow(reason="button"))
        wait_for(lambda: rig.records("*.jpg"), 10, "a still on demand")
    finally:
        rig.stop()
    assert meta(rig.records("*.jpg")[0])["reason"] == "button"


def test_a_clip_that_stalls_midway_is_dropped_and_retaken_on_a_fresh_camera(tmp_path, keys, password_file):
    backend = StandInBackend(stall_after_frames=5, stalling_opens=(1,))
    rig = Rig(tmp_path, keys, password_file, backend=backend, clip_s=0.5, framerate_fps=20,
              on_capture_now="clip").start()
    try:
        rig.commands.put(ipc.CaptureNow())
        wait_for(lambda: rig.records("*.mp4"), 20, "the retaken clip")
    finally:
        rig.stop()
    clips = rig.records("*.mp4")
    assert len(clips) == 1 and meta(clips[0])["stalls"] == 1 and meta(clips[0])["opens"] == 2
    assert not list(rig.staging.glob(".*")), "the stalled clip's temporary file is removed"
    with av.open(str(clips[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) >= 8


def test_power_pin_around_each_still_and_a_fresh_camera_each_time(tmp_path, keys, password_file):
    rig = Rig(tmp_path, keys, password_file, power_pin=6, power_lead_s=0.2)
    pin = rig.worker.power.device.pin
    rig.start()
    try:
        for n in (1, 2):
            rig.commands.put(ipc.CaptureNow())
            wait_for(lambda: len(rig.records("*.jpg")) == n and len(pin.states) >= 1 + 2 * n, 10, f"still {n}")
    finally:
        rig.stop()
    assert [s.state for s in pin.states] == [False, True, False, True, False]
    assert all(pin.states[i].timestamp >= 0.2 for i in (2, 4)), "on for at least the lead time"
    assert len(rig.backend.cameras) == 2 and all(c.closed for c in rig.backend.cameras)


@pytest.mark.parametrize("missing", ["latitude", "longitude"])
def test_daylight_only_without_the_hives_position_is_a_config_error(tmp_path, keys, password_file, missing):
    # A default of 0,0 would silently follow the sun of the Gulf of Guinea.
    over = {"sensors.cam.type": "camera", "sensors.cam.backend": "simulated", "sensors.cam.daylight_only": True,
            "sensors.cam.latitude": 50.63, "sensors.cam.longitude": 3.06, f"sensors.cam.{missing}": None}
    with pytest.raises(config.ConfigError) as err:
        config.load(make_config(tmp_path, keys, password_file, 21, **over))
    assert err.value.key == f"sensors.cam.{missing}" and "daylight_only" in err.value.message
