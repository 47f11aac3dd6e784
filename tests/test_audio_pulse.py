"""The audio worker on a real capture device: PortAudio's ALSA ``pulse`` device on a PulseAudio null
sink (tests/audio_peers.py). A known tone is played into the sink with ``paplay``; the worker's FLAC
must hold it (spectral peak), in the configured format, with no input overflows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import soundfile

from audio_peers import PULSEAUDIO, AudioThread, PulseServer, peak_hz, tone_wav
from beemond import ipc
from beemond.sensors.audio.device import DeviceError
from beemond.sensors.base import SensorFailure
from conftest import make_config, wait_for


@pytest.fixture
def pulse(monkeypatch):
    if PULSEAUDIO is None:
        pytest.skip("pulseaudio is not installed (scripts/setup installs it)")
    server = PulseServer().start()
    monkeypatch.setenv("PULSE_SERVER", server.server)
    yield server
    server.stop()


def running(tmp_path, keys, password_file, **audio) -> AudioThread:
    """The real audio driver on the pulse server's device: 48 kHz PCM_24 FLAC plus *audio* keys."""
    over = {f"sensors.hive_audio.{k}": v for k, v in {
        "backend": "hardware", "sample_rate_hz": 48000, "subtype": "PCM_24", "format": "flac",
        "block_s": 0.05, **audio}.items()}
    return AudioThread(make_config(tmp_path, keys, password_file, 21, **over))


def _check_flac(path, hz):
    info = soundfile.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_24", 48000, 1)
    data, rate = soundfile.read(path, dtype="float64")
    assert abs(peak_hz(data, rate) - hz) <= 2, f"the {hz} Hz tone is the spectral peak"
    assert np.sqrt(np.mean(data ** 2)) > 0.2, "the tone (RMS 0.35) fills the record, not silence"
    meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
    assert meta["overflows"] == 0 and meta["frames"] == info.frames
    return meta


def test_capture_now_in_window_mode_records_the_tone_and_closes_the_device(tmp_path, keys, password_file, pulse):
    # A window that is hours away: nothing is captured except what capture_now asks for.
    later = datetime.now(timezone.utc) + timedelta(hours=3)
    tone = pulse.play(tone_wav(tmp_path / "a440.wav", 440, 6))
    try:
        with running(tmp_path, keys, password_file, device="PULSE", schedule="window", timezone="UTC",
                     window_start=f"{later:%H}:00", window_end=f"{later + timedelta(hours=1):%H}:00",
                     capture_s=1, every_s=300, segment_s=60) as run:
            wait_for(lambda: pulse.count("sink-inputs"), 5, "paplay to connect")
            assert pulse.count("source-outputs") == 0, "outside the window the device is closed"
            run.commands.put(ipc.CaptureNow(reason="test"))
            wait_for(run.records, 10, "the capture_now record")
            wait_for(lambda: pulse.count("source-outputs") == 0, 5, "the stream to close after the capture")
    finally:
        tone.kill()
        tone.wait()
    assert run.error is None, run.error
    [flac] = run.records()
    meta = _check_flac(flac, 440)
    assert meta["frames"] == 48000 and meta["trigger"] == "capture_now" and meta["device"] == "pulse"
    assert meta["schedule"]["mode"] == "window" and meta["schedule"]["slot"] is None
    assert sum(e.kind == ipc.READY_EVENT for e in run.events) == 1


def test_continuous_by_index_records_segments_of_the_tone(tmp_path, keys, password_file, pulse):
    import sounddevice as sd

    sd._terminate()  # see the pulse server started for this test (PortAudio lists devices at init)
    sd._initialize()
    index = next(i for i, d in enumerate(sd.query_devices()) if d["name"] == "pulse")
    tone = pulse.play(tone_wav(tmp_path / "a1000.wav", 1000, 8))
    try:
        wait_for(lambda: pulse.count("sink-inputs"), 5, "paplay to connect")
        with running(tmp_path, keys, password_file, device=str(index), segment_s=1) as run:
            wait_for(lambda: len(run.records()) >= 2, 10, "two one-second segments")
    finally:
        tone.kill()
        tone.wait()
    assert run.error is None, run.error
    full = [f for f in run.records() if soundfile.info(f).frames == 48000]
    assert len(full) >= 2
    for f in full:
        meta = _check_flac(f, 1000)
        assert meta["trigger"] == "continuous" and meta["device"] == "pulse"


def test_missing_device_is_retried_then_the_worker_fails(tmp_path, keys, password_file, pulse):
    with running(tmp_path, keys, password_file, device="usb mic", open_retries=2, open_backoff_s=0.05) as run:
        run.thread.join(10)
    assert isinstance(run.error, SensorFailure), run.error
    errors = [e.message for e in run.events if e.kind == ipc.ERROR]
    assert len(errors) == 3, "the first attempt and two retries, each reported"
    assert "no input device matching 'usb mic'" in errors[0] and "pulse" in errors[0], "lists what is there"
    assert run.records() == []


def test_ambiguous_device_name_fails_at_once_listing_the_candidates(tmp_path, keys, password_file, pulse):
    with running(tmp_path, keys, password_file, device="ul") as run:  # in "pulse" and "default"
        run.thread.join(10)
    assert isinstance(run.error, DeviceError)
    assert "pulse" in str(run.error) and "default" in str(run.error)


def test_a_device_that_appears_later_is_found_by_the_retries(tmp_path, keys, password_file, monkeypatch):
    # A USB microphone plugged in after the worker started: here the sound server comes up late.
    if PULSEAUDIO is None:
        pytest.skip("pulseaudio is not installed (scripts/setup installs it)")
    server = PulseServer()
    monkeypatch.setenv("PULSE_SERVER", server.server)
    try:
        with running(tmp_path, keys, password_file, device="pulse", segment_s=0.5, open_retries=20,
                     open_backoff_s=0.1) as run:
            seen = []

            def device_error():
                while run.reader.poll():
                    seen.append(run.reader.recv())
                return [e for e in seen if e.kind == ipc.ERROR]
            assert "pulse" in wait_for(device_error, 10, "an ERROR event for the missing device")[0].message
            server.start()
            wait_for(run.records, 15, "a record once the device is there")
    finally:
        server.stop()
    assert run.error is None, run.error
    meta = run.metadata()[0]
    assert meta["device"] == "pulse" and meta["sample_rate_hz"] == 48000
