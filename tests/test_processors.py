"""Processors in process, with a real ipc.Channel: spacing rules, audio band power of a generated tone
read back from a real FLAC, the swarm detector on a replayed weight series, config validation."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import tomli_w
from conftest import wait_for

from beemond import config, ipc
from beemond.bundle import crypto
from beemond.processors.audio_bands.worker import AudioBandsWorker, band_power
from beemond.processors.base import Spacing
from beemond.spool import META_SUFFIX, link_record, sidecar_of, write_record
from beemond.processors.swarm.worker import SwarmDetector, SwarmWorker

URBAN = Path(__file__).resolve().parents[1] / "data/urban-2021/hive_temperature_humidity_2021.csv"


def records(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.json") if not p.name.endswith(META_SUFFIX))


def write_config(tmp_path: Path, processors: dict, sensors: dict | None = None, archive_table: dict | None = None) -> Path:
    _, rcpt, _ = crypto.keygen(tmp_path / "keys")
    tree = {
        "daemon": {"host": "hive", "spool_dir": str(tmp_path / "spool")},
        "bundle": {"recipients": [str(rcpt)]},
        "upload": {"protocol": "none"},
        "sensors": sensors or {
            "hive_audio": {"type": "audio", "backend": "simulated", "sample_rate_hz": 8000},
            "hive_scale": {"type": "scale", "backend": "hardware"},
        },
        "processors": processors,
        **({"archive": archive_table} if archive_table else {}),
    }
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(tree))
    return path


class Sink:
    """The orchestrator's end of a worker's event pipe, drained by a thread (a full pipe would block
    the worker)."""

    def __init__(self, name: str):
        self.commands = multiprocessing.Queue()
        self.reader, writer = multiprocessing.Pipe(duplex=False)
        self.channel = ipc.Channel(name, self.commands, writer, heartbeat_interval_s=60)
        self.events: list[ipc.Event] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            while True:
                self.events.append(self.reader.recv())
        except (EOFError, OSError):
            pass

    def of(self, kind: str, count: int = 0, timeout: float = 5) -> list[ipc.Event]:
        deadline = time.monotonic() + timeout
        while True:
            got = [e for e in self.events if e.kind == kind]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.01)


# ------------------------------------------------------------------------------------------ spacing

def test_spacing_skips_inputs_closer_than_the_spacing_to_the_last_accepted_one():
    s = Spacing(10, 0, 0)
    got = [s.input_ok(t) for t in (100, 105, 109.99, 110, 115, 121, 50, 55, 60)]
    # 105, 109.99 skipped; 110 accepted (exactly the spacing); time going back (50) is accepted.
    assert got == [True, False, False, True, False, True, True, False, True]
    steps = Spacing(0, 2, 0)
    assert [steps.step_ok(t) for t in (0, 1, 1.9, 2.0, 3)] == [True, False, False, True, False]
    out = Spacing(0, 0, 30)
    assert [out.output_ok(t) for t in (0, 29, 30, 59, 61)] == [True, False, True, False, True]
    off = Spacing(0, 0, 0)
    assert all(off.input_ok(t) and off.step_ok(t) and off.output_ok(t) for t in (1, 1, 1))


def test_worker_applies_input_step_and_output_spacing(tmp_path):
    cfg = config.load(write_config(tmp_path, {"swarm": {
        "type": "swarm", "sensor": "hive_scale", "min_input_spacing": 60, "min_output_spacing": 3600,
        "drop_kg": 1.0, "window_s": 900, "smoothing": 1}}))
    sink = Sink("swarm")
    w = SwarmWorker(cfg, cfg.processors[0], sink.channel)
    t0 = 1_700_000_000.0
    for i in range(30):  # a reading every 10 s of data time: one in six passes min_input_spacing
        assert w.handle(ipc.Sample(sensor="hive_scale", values={"weight_kilograms": 40.0}, time=t0 + 10 * i))
    assert len(sink.of(ipc.SAMPLE, 5)) == 5 and w.skipped["input"] == 25
    assert len(w.detector.window) == 5

    # Two drops, each an alert; the second comes 20 min after the first: within min_output_spacing,
    # so it is not written as a record (but it is still an alert event).
    t = t0 + 400
    for kg in (38.0, 38.0, 36.0):
        w.handle(ipc.Sample(values={"weight_kilograms": kg}, time=t))
        t += 600
    assert len(sink.of(ipc.ALERT, 2)) == 2
    written = records(tmp_path / "spool/staging/swarm")
    assert len(written) == 1 and w.skipped["output"] == 1

    # min_step_spacing: a burst arriving faster than the processing spacing is skipped.
    cfg2 = config.load(write_config(tmp_path / "b", {"swarm": {"type": "swarm", "sensor": "hive_scale",
                                                               "min_step_spacing": 30}}))
    sink2 = Sink("swarm")
    w2 = SwarmWorker(cfg2, cfg2.processors[0], sink2.channel)
    for i in range(5):
        w2.handle(ipc.Sample(values={"weight_kilograms": 40.0}, time=t0 + 600 * i))
    assert w2.skipped["step"] == 4 and len(w2.detector.window) == 1

    # stop pauses, start resumes
    w2.handle(ipc.Stop())
    w2.spacing = Spacing(0, 0, 0)
    w2.handle(ipc.Sample(values={"weight_kilograms": 40.0}, time=t0 + 100))
    assert w2.skipped["paused"] == 1 and len(w2.detector.window) == 1
    w2.handle(ipc.Start())
    w2.handle(ipc.Sample(values={"weight_kilograms": 40.0}, time=t0 + 200))
    assert len(w2.detector.window) == 2
    assert w2.handle(ipc.Shutdown()) is False


# ------------------------------------------------------------------------------------------ audio

def tone(path: Path, hz: float, amplitude: float, rate: int = 8000, seconds: float = 3.0, noise: float = 0.0):
    t = np.arange(int(rate * seconds)) / rate
    x = amplitude * np.sin(2 * np.pi * hz * t) + noise * np.random.default_rng(1).standard_normal(len(t))
    soundfile.write(str(path), x, rate, subtype="PCM_16", format="FLAC")


def test_440_hz_tone_lands_in_the_300_600_band(tmp_path):
    path = tmp_path / "tone.flac"
    tone(path, 440, 0.5)
    got = band_power(path, [(100, 300), (300, 600), (600, 1000)], frame=4096)
    low, mid, high = got["band_power"]
    assert mid == pytest.approx(0.5 ** 2 / 2, rel=0.02)       # a sine's mean square is A^2/2
    assert low < 1e-4 * mid and high < 1e-4 * mid
    assert got["rms"] == pytest.approx(0.5 / math.sqrt(2), rel=0.01)
    assert got["rms_dbfs"] == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.1)
    # A file shorter than one frame is still analysed (zero-padded).
    short = tmp_path / "short.flac"
    tone(short, 250, 0.5, seconds=0.1)
    s = band_power(short, [(100, 300), (300, 600)], frame=4096)
    assert s["band_power"][0] > 10 * s["band_power"][1]


def test_audio_processor_writes_a_json_record_and_band_samples(tmp_path):
    cfg = config.load(write_config(tmp_path, {"bands": {
        "type": "audio_bands", "sensor": "hive_audio", "bands": ["100-300", "300-600", "600-1000"]}}))
    staged = tmp_path / "spool/staging/hive_audio"
    staged.mkdir(parents=True)
    meta = {"sensor": "hive_audio", "start": "2026-06-01T10:00:00.000Z", "end": "2026-06-01T10:00:03.000Z"}
    rec = write_record(staged, "seg.flac", meta,
                       data_writer=lambda f: soundfile.write(
                                   f, 0.5 * np.sin(2 * np.pi * 440 * np.arange(24000) / 8000), 8000, format="FLAC"))
    link = link_record(cfg.spool, "bands", rec)
    rec.unlink()  # the aggregator bundled the original: the processor's link still holds the data
    sidecar_of(rec).unlink()
    sink = Sink("bands")
    w = AudioBandsWorker(cfg, cfg.processors[0], sink.channel)
    w.handle(ipc.RecordReady(path=str(link), sensor="hive_audio"))
    assert not link.exists() and not sidecar_of(link).exists(), "the inbox link is consumed"
    out = records(tmp_path / "spool/staging/bands")
    assert len(out) == 1
    body = json.loads(out[0].read_text())
    assert body["source"] == "hive_audio" and body["start"] == meta["start"]
    assert max(body["result"]["bands"], key=body["result"]["bands"].get) == "300-600"
    ready = sink.of(ipc.READY_EVENT, 1)
    assert ready and ready[0].path == str(out[0])
    samples = sink.of(ipc.SAMPLE, 4)
    bands = {e.labels["band"]: e.values["audio_band_power_ratio"] for e in samples if e.labels is not None}
    assert set(bands) == {"100-300", "300-600", "600-1000"} and bands["300-600"] == pytest.approx(0.125, rel=0.02)


def test_a_damaged_record_is_reported_and_dropped_not_retried(tmp_path):
    cfg = config.load(write_config(tmp_path, {"bands": {"type": "audio_bands", "sensor": "hive_audio"}}))
    staged = tmp_path / "spool/staging/hive_audio"
    staged.mkdir(parents=True)
    rec = write_record(staged, "bad.flac", {"start": "2026-06-01T10:00:00Z"},
                       data_writer=lambda f: f.write(b"fLaC but not really"))
    link = link_record(cfg.spool, "bands", rec)
    sink = Sink("bands")
    w = AudioBandsWorker(cfg, cfg.processors[0], sink.channel)
    assert w.leftovers() == [link]  # what a restarted processor would pick up
    w.handle(ipc.RecordReady(path=str(link)))
    assert "cannot process bad.flac" in sink.of(ipc.ERROR, 1)[0].message
    assert w.leftovers() == []


# ------------------------------------------------------------------------------------------ swarm

def daily_weights(days: int = 3, seed: int = 7) -> list[tuple[float, float]]:
    """A minute-by-minute hive weight (s, kg) with the normal daily swing: foragers leave from 7:00 to
    10:00 (-0.9 kg), nectar comes in through the day (+0.6 kg), foragers return 17:00-20:00
    (+0.9 kg); sensor noise sigma 30 g and two single-reading spikes of -1.5 kg (a knock on the scale)."""
    rng = np.random.default_rng(seed)
    out = []
    base = 40.0
    for m in range(days * 1440):
        h = (m % 1440) / 60
        away = 0.9 * min(1, max(0, (h - 7) / 3)) - 0.9 * min(1, max(0, (h - 17) / 3))
        nectar = 0.6 * min(1, max(0, (h - 10) / 7)) + 0.6 * (m // 1440)
        kg = base + nectar - away + rng.normal(0, 0.03)
        if m in (600, 2000):
            kg -= 1.5
        out.append((m * 60.0, kg))
    return out


def test_swarm_detector_quiet_on_daily_swings_fires_once_on_a_swarm():
    quiet = SwarmDetector(drop_kg=1.0, window_s=900, smoothing=3)
    assert [a for t, kg in daily_weights() if (a := quiet.feed(t, kg))] == []

    series = daily_weights()
    start = 2 * 1440 + 11 * 60  # day 3, 11:00: 2 kg leave over 8 minutes and stay gone
    series = [(t, kg - 2.0 * min(1, max(0, (i - start) / 8))) for i, (t, kg) in enumerate(series)]
    d = SwarmDetector(drop_kg=1.0, window_s=900, smoothing=3)
    alerts = [(t, a) for t, kg in series if (a := d.feed(t, kg))]
    assert len(alerts) == 1, alerts
    t, a = alerts[0]
    assert start * 60 <= t <= (start + 8) * 60
    assert a["drop_kg"] > 1.0 and a["from_kg"] - a["to_kg"] == pytest.approx(a["drop_kg"], abs=0.01)


def test_swarm_alert_is_a_warning_an_event_and_a_record(tmp_path, caplog):
    cfg = config.load(write_config(tmp_path, {"swarm": {"type": "swarm", "sensor": "hive_scale", "drop_kg": 1.5}}))
    sink = Sink("swarm")
    w = SwarmWorker(cfg, cfg.processors[0], sink.channel)
    with caplog.at_level(logging.WARNING):
        for i, kg in enumerate([42.0] * 5 + [40.2] * 3):
            w.handle(ipc.Sample(sensor="hive_scale", values={"weight_kilograms": kg}, time=1_700_000_000 + 60 * i))
    assert "SWARM ALERT on hive_scale: weight fell 1.80 kg" in caplog.text
    alert = sink.of(ipc.ALERT, 1)[0]
    assert alert.sensor == "hive_scale" and alert.alert == "swarm"
    rec = json.loads(records(tmp_path / "spool/staging/swarm")[0].read_text())
    assert rec["result"]["alert"] == "swarm" and rec["result"]["drop_kg"] == pytest.approx(1.8)
    drops = [e.values["swarm_drop_kilograms"] for e in sink.of(ipc.SAMPLE, 8)]
    assert drops[:6] == [0.0] * 5 + [0.0] and max(drops) < 1.5  # median of 3 needs two low readings


def test_output_record_carries_its_metadata_under_metadata_like_the_seeds_json_archiver(tmp_path):
    cfg = config.load(write_config(tmp_path, {"swarm": {"type": "swarm", "sensor": "hive_scale", "drop_kg": 1.5}},
                                   archive_table={"default_metadata": {"apiary": "north", "source": "overridden"}}))
    w = SwarmWorker(cfg, cfg.processors[0], Sink("swarm").channel)
    for i, kg in enumerate([42.0] * 5 + [40.2] * 3):
        w.handle(ipc.Sample(values={"weight_kilograms": kg}, time=1_700_000_000 + 60 * i))
    [path] = records(tmp_path / "spool/staging/swarm")
    rec, sidecar = json.loads(path.read_text()), json.loads(sidecar_of(path).read_text())
    assert rec["metadata"] == sidecar, "the record holds its sidecar's metadata under 'metadata'"
    # default_metadata lies under the record's own keys; the fields the lab reads stay at the top
    assert sidecar["apiary"] == "north" and sidecar["source"] == "hive_scale"
    assert rec["source"] == "hive_scale" and rec["start"] == sidecar["start"] and rec["result"]["alert"] == "swarm"


def _swarm_alert(tmp_path: Path, max_retries: int):
    """A swarm worker whose staging directory refuses every write (a regular file stands in its place,
    so creating a record there fails with an OSError even as root), fed one swarm."""
    cfg = config.load(write_config(tmp_path, {"swarm": {"type": "swarm", "sensor": "hive_scale", "drop_kg": 1.5}},
                                   archive_table={"max_retries": max_retries}))
    sink = Sink("swarm")
    w = SwarmWorker(cfg, cfg.processors[0], sink.channel)
    w.staging.rmdir()
    w.staging.write_bytes(b"")
    for i, kg in enumerate([42.0] * 5 + [40.2] * 3):
        w.handle(ipc.Sample(values={"weight_kilograms": kg}, time=1_700_000_000 + 60 * i))
    assert "record write failed" in sink.of(ipc.ERROR, 1)[0].message
    return w, sink


def test_an_output_that_cannot_be_written_goes_to_failed_after_the_last_retry(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        w, _ = _swarm_alert(tmp_path, max_retries=1)
        # the data file lands before its sidecar, and the log line after both
        wait_for(lambda: "moved to" in caplog.text, 30, "the record moved to failed/")
        failed = records(tmp_path / "spool/failed/swarm")
    rec, sidecar = json.loads(failed[0].read_text()), json.loads(sidecar_of(failed[0]).read_text())
    assert rec["result"]["alert"] == "swarm" and "write_error" in sidecar
    assert "could not be written after 2 attempts" in caplog.text and "moved to" in caplog.text
    assert w.writer.pending() == 0 and w.writer.close(timeout=1) == 0


def test_an_output_write_that_fails_once_is_retried_into_staging(tmp_path):
    w, sink = _swarm_alert(tmp_path, max_retries=3)
    w.staging.unlink()  # the disk recovers: a retry (1, then 2 s later) stages the record
    w.staging.mkdir(exist_ok=True)  # a retry due at this very moment may create it first
    path = Path(wait_for(lambda: sink.of(ipc.READY_EVENT, 1, timeout=0), 10, "the retried record")[0].path)
    assert path.parent == w.staging and json.loads(path.read_text())["result"]["alert"] == "swarm"
    assert w.writer.close(timeout=1) == 0 and not (tmp_path / "spool/failed/swarm").exists()


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("proc, key, message", [
    ({"type": "swarm", "sensor": "nope"}, "processors.p.sensor", "'nope' is not a configured"),
    ({"type": "audio_bands", "sensor": "hive_scale"}, "processors.p.sensor", "audio_bands reads audio records"),
    ({"type": "audio_bands", "sensor": "hive_audio", "bands": ["300-100"]}, "processors.p.bands", "LOW < HIGH"),
    ({"type": "audio_bands", "sensor": "hive_audio", "bands": ["3000-5000"]}, "processors.p.bands", "Nyquist"),
    ({"type": "fft", "sensor": "hive_audio"}, "processors.p.type", "allowed: audio_bands, swarm"),
    ({"type": "swarm", "sensor": "hive_scale", "drop": 1}, "processors.p.drop", "unknown key"),
    ({"type": "swarm", "sensor": "hive_scale", "min_input_spacing": -1}, "processors.p.min_input_spacing", ">= 0"),
])
def test_processor_config_errors_name_the_key(tmp_path, proc, key, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(write_config(tmp_path, {"p": proc}))
    assert e.value.key == key and message in e.value.message


def test_processor_name_must_not_shadow_a_sensor(tmp_path):
    with pytest.raises(config.ConfigError, match="already taken"):
        config.load(write_config(tmp_path, {"hive_audio": {"type": "swarm", "sensor": "hive_scale"}}))


def test_leftover_links_are_processed_at_start_oldest_first(tmp_path):
    """A processor restarted after a crash (or after a backoff) finds what the orchestrator linked."""
    cfg = config.load(write_config(tmp_path, {"bands": {"type": "audio_bands", "sensor": "hive_audio"}}))
    staged = tmp_path / "spool/staging/hive_audio"
    staged.mkdir(parents=True)
    for i, hz in enumerate((250, 440)):
        meta = {"start": f"2026-06-01T10:00:0{i}.000Z", "end": f"2026-06-01T10:00:0{i + 1}.000Z"}
        rec = write_record(staged, f"seg{i}.flac", meta, data_writer=lambda f, hz=hz: soundfile.write(
            f, 0.5 * np.sin(2 * np.pi * hz * np.arange(8000) / 8000), 8000, format="FLAC"))
        link_record(cfg.spool, "bands", rec)
    sink = Sink("bands")
    sink.commands.put(ipc.Shutdown())
    AudioBandsWorker(cfg, cfg.processors[0], sink.channel).run()  # leftovers first, then the shutdown
    out = [json.loads(p.read_text())["result"] for p in records(tmp_path / "spool/staging/bands")]
    assert [max(r["bands"], key=r["bands"].get) for r in out] == ["100-300", "300-600"]
    assert list((tmp_path / "spool/processing/bands").iterdir()) == []


def test_spectrogram_png_shows_the_tone_at_its_height(tmp_path):
    import shutil
    import subprocess
    import zlib

    cfg = config.load(write_config(tmp_path, {"bands": {"type": "audio_bands", "sensor": "hive_audio",
                                                        "spectrogram": True, "spectrogram_max_hz": 1000}}))
    staged = tmp_path / "spool/staging/hive_audio"
    staged.mkdir(parents=True)
    rec = write_record(staged, "seg.flac", {"start": "2026-06-01T10:00:00.000Z", "end": "2026-06-01T10:00:10.000Z"},
                       data_writer=lambda f: soundfile.write(
                                   f, 0.5 * np.sin(2 * np.pi * 440 * np.arange(80000) / 8000), 8000, format="FLAC"))
    sink = Sink("bands")
    w = AudioBandsWorker(cfg, cfg.processors[0], sink.channel)
    w.handle(ipc.RecordReady(path=str(link_record(cfg.spool, "bands", rec))))
    png = next((tmp_path / "spool/staging/bands").glob("*.png"))
    assert json.loads(sidecar_of(png).read_text())["image"] == "spectrogram"
    assert len(sink.of(ipc.READY_EVENT, 2)) == 2, "the JSON and the PNG are both records"
    if shutil.which("file"):  # an independent reader of the header
        # (80000 - 4096) // 2048 + 1 = 38 whole frames, 64 frequency rows
        assert "PNG image data, 38 x 64, 8-bit grayscale" in subprocess.run(
            ["file", str(png)], capture_output=True, text=True).stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4: idat + 4 + int.from_bytes(data[idat - 4:idat], "big")])
    img = np.frombuffer(raw, np.uint8).reshape(height, width + 1)[:, 1:]
    brightest = int(np.argmax(img.mean(axis=1)))           # row 0 is the top: 1000 Hz
    assert brightest == 64 - 1 - int(440 / 1000 * 64)     # 440 Hz: row 28 from the bottom
    assert len(png.read_bytes()) < 10_000
