"""The audio worker in-process, through the sounddevice-compatible simulated stream."""

from __future__ import annotations

import multiprocessing
import queue
import threading

import numpy as np
import soundfile

from audio_peers import AudioThread
from beemond import config, ipc
from beemond.sensors.audio.driver import AudioWorker
from conftest import make_config, wait_for


def test_segments_stop_start_and_spectrum(tmp_path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
        "sensors.hive_audio.segment_s": 0.5, "sensors.hive_audio.block_s": 0.05, "sensors.hive_audio.tone_hz": 440,
        "sensors.hive_audio.format": "wav", "sensors.hive_audio.subtype": "PCM_24"}))
    sensor = next(s for s in cfg.sensors if s.name == "hive_audio")
    commands: queue.Queue = queue.Queue()
    reader, writer = multiprocessing.Pipe(duplex=False)
    worker = AudioWorker(cfg, sensor, ipc.Channel("hive_audio", commands, writer, 0.2))
    t = threading.Thread(target=worker.run)
    t.start()
    staging = tmp_path / "spool" / "staging" / "hive_audio"
    try:
        wait_for(lambda: len(list(staging.glob("*.wav"))) >= 2, 10, "two segments")
        commands.put(ipc.Stop())
        wait_for(worker.blocks.empty, 5, "the writer to drain the stopped stream")
        stopped_with = len(list(staging.glob("*.wav")))
        commands.put(ipc.Start())
        wait_for(lambda: len(list(staging.glob("*.wav"))) >= stopped_with + 2, 10, "segments after start")
    finally:
        commands.put(ipc.Shutdown())
        t.join(20)
    assert not t.is_alive()
    files = sorted(staging.glob("*.wav"))
    lengths = []
    for f in files:
        data, rate = soundfile.read(f, dtype="float64")
        assert rate == 8000 and soundfile.info(f).subtype == "PCM_24"
        lengths.append(len(data))
        if len(data) == 4000:
            spectrum = np.abs(np.fft.rfft(data * np.hanning(len(data))))
            assert abs(np.argmax(spectrum) * rate / len(data) - 440) <= 2, "the 440 Hz hum is the peak"
    assert lengths.count(4000) >= 3, lengths
    assert all(0 < n <= 4000 for n in lengths)
    events = []
    while reader.poll():
        events.append(reader.recv())
    ready = [e for e in events if e.kind == ipc.READY_EVENT]
    assert len(ready) == len(files), "one record-ready event per segment"


def test_input_overflows_are_counted_per_segment(tmp_path, keys, password_file):
    # The PortAudio input_overflow flag on every 5th block: 10 blocks per 0.5 s segment -> 2 each.
    with AudioThread(make_config(tmp_path, keys, password_file, 21, **{
            "sensors.hive_audio.segment_s": 0.5, "sensors.hive_audio.block_s": 0.05,
            "sensors.hive_audio.overflow_every": 5})) as run:
        wait_for(lambda: len(run.metadata()) >= 2, 10, "two segments")
    metas = run.metadata()
    full = [m for m in metas if m["frames"] == 4000]
    assert full and all(m["overflows"] == 2 for m in full), [(m["frames"], m["overflows"]) for m in metas]
    assert run.worker.overflows_total == sum(m["overflows"] for m in metas)
