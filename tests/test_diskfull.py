"""Disk full, the one space policy ([daemon] spool_max_bytes, spool_min_free_bytes, drop_oldest_when_full,
enforced by the uploader, the only process that deletes from the outbox):
with drop_oldest_when_full the oldest bundles go and the newest stay; without it no un-uploaded bundle is
ever deleted, one error says the spool is full, and all resumes when space returns; on a real 4 MB tmpfs,
ENOSPC is survived and recording resumes when space returns."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import av
import pytest

from beemond import ipc
from beemond.spool import Spool
from conftest import FtpServer, free_port, make_config, wait_for

pytestmark = pytest.mark.slow

# Loud audio (noise compresses badly): about 80 KB of FLAC a second, a bundle a second.
LOUD = {"sensors.hive_audio.sample_rate_hz": 48000, "sensors.hive_audio.noise": 0.9,
        "bundle.max_duration_s": 1, "upload.backoff_initial_s": 0.5, "upload.backoff_max_s": 1}


def outbox(spool: Path) -> list[Path]:
    return sorted(p for p in (spool / "outbox").glob("*.tar.age") if not p.name.startswith("."))


def sealed(log: str) -> list[str]:
    return re.findall(r"sealed (\S+\.tar\.age):", log)


def test_spool_quota_drops_the_oldest_bundles_and_keeps_running(tmp_path, keys, password_file, daemons):
    quota = 600_000
    port = free_port()  # nothing listens: every upload fails, the outbox grows
    cfg = make_config(tmp_path, keys, password_file, port, **LOUD, **{"daemon.spool_max_bytes": quota,
                                                                      "daemon.drop_oldest_when_full": True})
    spool = tmp_path / "spool"
    d = daemons(cfg, tmp_path / "daemon.log")
    first = {p.name for p in wait_for(lambda: outbox(spool), 30, "a first bundle")}
    d.wait_log(r"spool full \(\d+ bytes used of spool_max_bytes %d, .*\): dropped the oldest un-uploaded bundle"
               % quota, timeout=40)
    dropped = re.findall(r"dropped the oldest un-uploaded bundle (\S+)", d.log())
    # The oldest goes first: never a bundle newer than the first ones seen (the aggregator renames the
    # bundles of one window into the outbox one by one, so the first look may catch a later one alone).
    assert dropped[0].split("_")[1] <= min(n.split("_")[1] for n in first), (dropped[0], first)
    d.wait_log(r"dropped the oldest un-uploaded bundle", count=3, timeout=30)
    kept = outbox(spool)
    assert kept and not first & {p.name for p in kept}
    # The newest bundles stay: every kept one is newer than every dropped one.
    assert min(p.name.split("_")[1] for p in kept) >= max(n.split("_")[1] for n in dropped[:2])
    # Within the quota, give or take the one bundle sealed since the last check.
    used = sum(p.stat().st_blocks * 512 for p in spool.rglob("*") if p.is_file())
    biggest = max(p.stat().st_size for p in kept)
    assert used <= quota + 2 * biggest + 64 * 1024, (used, quota, biggest)
    log = d.log()
    assert len(re.findall(r"started worker aggregator", log)) == 1, "the aggregator never restarted"
    assert len(re.findall(r"started worker uploader", log)) == 1, "the uploader never restarted"
    assert "Traceback" not in log
    assert d.proc.poll() is None
    assert d.terminate() == 0, d.log()
    assert not list((spool / "outbox").glob("*.sig")), "no signature outlives its bundle"


def test_full_spool_without_drop_keeps_every_bundle_and_resumes(tmp_path, keys, password_file, daemons):
    quota = 400_000
    port = free_port()  # nothing listens yet: the outbox grows past the quota
    cfg = make_config(tmp_path, keys, password_file, port, **LOUD, **{"daemon.spool_max_bytes": quota})
    spool = tmp_path / "spool"
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"spool full \(.*\): no uploaded copy left to delete and un-uploaded data is kept", timeout=40)
    mark = len(d.log())
    wait_for(lambda: len(sealed(d.log()[mark:])) >= 2, 20, "recording and sealing go on while full")
    ftp = FtpServer(tmp_path / "ftp-root", password_file, port=port).start()
    try:
        d.wait_log(r"spool space returned", timeout=40)
        mark = len(d.log())
        after = wait_for(lambda: sealed(d.log()[mark:]), 20, "a bundle sealed after space returned")
        wait_for(lambda: after[0] in {p.name for p in ftp.bundles()}, 30, "its upload")
        assert d.proc.poll() is None
        assert d.terminate() == 0, d.log()
    finally:
        ftp.stop()
    log = d.log()
    assert len(re.findall(r"spool full", log)) == 1, "one error for the whole episode, not one per check"
    assert "dropped" not in log
    # Every bundle ever sealed is on the server or still in the outbox: none was deleted for space.
    everything = sealed(log)
    assert len(everything) >= 5
    assert set(everything) <= {p.name for p in outbox(spool)} | {p.name for p in ftp.bundles()}
    assert len(re.findall(r"started worker aggregator", log)) == 1, "the aggregator never restarted"
    assert "Traceback" not in log


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs; return why not if the machine forbids it."""
    where.mkdir(parents=True)
    if shutil.which("mount") is None:
        return "no mount command"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else f"mount -t tmpfs failed: {res.stderr.strip()}"


def test_tiny_tmpfs_spool_survives_enospc_and_resumes(tmp_path, keys, password_file, daemons):
    mnt = tmp_path / "tiny"
    why = _mount_tmpfs(mnt, "4m")
    if why:
        print(f"skipping the tmpfs variant: {why}")
        pytest.skip(why)
    ftp = None
    try:
        port = free_port()
        cfg = make_config(tmp_path, keys, password_file, port, **LOUD, **{
            "daemon.spool_dir": str(mnt / "spool"), "daemon.spool_min_free_bytes": 700_000,
            "daemon.drop_oldest_when_full": True, "daemon.crash_loop_limit": 100})
        spool = mnt / "spool"
        d = daemons(cfg, tmp_path / "daemon.log")
        # 4 MB, 700 KB kept free: usually the quota starts dropping bundles before ENOSPC. Under load the
        # aggregator lags, staged records pile up, and a seal can meet ENOSPC first while the only bundle
        # is the newest (kept by design): either way the daemon must be at its limits here.
        d.wait_log(r"dropped the oldest un-uploaded bundle|with only the newest bundle left|No space left on device",
                   timeout=40)
        # Now take (almost) all of the rest: writes fail with ENOSPC.
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\xff" * 4096):
                pass
        except OSError:  # ENOSPC: the file system is full
            pass
        finally:
            os.close(fd)
        n_log = len(d.log())
        wait_for(lambda: re.search(r"No space left on device|spool full \(.*\) with only the newest bundle left|"
                                   r"no space for audio|skipped: no space", d.log()[n_log:]), 30,
                 "the daemon noticing the full disk")
        assert d.proc.poll() is None
        filler.unlink()
        mark = len(d.log())
        wait_for(lambda: "sealed " in d.log()[mark:], 30, "a bundle sealed after space returned")
        # The link comes back too: the backlog is uploaded.
        ftp = FtpServer(tmp_path / "ftp-root", password_file, port=port).start()
        wait_for(ftp.bundles, 40, "an upload after space and link returned")
        log = d.log()
        assert len(re.findall(r"started worker aggregator", log)) == 1, "the aggregator never restarted"
        assert not re.search(r"worker \S+ exited", log), "no worker crashed on the full disk"
        assert not re.search(r"SIGSEGV", log)
        assert d.proc.poll() is None
        assert d.terminate() == 0, d.log()
    finally:
        if ftp is not None:
            ftp.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def tiny(tmp_path):
    """A 3 MB tmpfs at tmp_path/tiny (skipped where mount is not allowed), unmounted afterwards."""
    mnt = tmp_path / "tiny"
    why = _mount_tmpfs(mnt, "3m")
    if why:
        pytest.skip(why)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path, leave: int = 0) -> None:
    """Write *path* until its file system has about *leave* bytes free (0: until ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            st = os.statvfs(path)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            os.write(fd, b"\xff" * min(room, 65536))
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


def temporaries(d: Path) -> list[Path]:
    return [p for p in d.glob(".*") if p.is_file()]


def test_camera_clip_on_a_full_disk_is_skipped_not_a_crash(tmp_path, keys, password_file, tiny):
    """The simulated camera's clip path died with SIGSEGV three times in 60 s on a full tmpfs: PyAV
    flushed the encoder into a container whose write had failed. Now a clip is not started without
    room for it, a write that fails mid-clip is reported and its temporary file removed at once, and
    neither counts as a camera fault; the next clip after space returns is recorded."""
    from test_camera import Rig

    rig = Rig(tmp_path, keys, password_file, width=320, height=240, framerate_fps=25, clip_s=3.0,
              on_capture_now="clip", bitrate_bps=1_000_000)
    rig.cfg = dataclasses.replace(rig.cfg, daemon=dataclasses.replace(
        rig.cfg.daemon, spool_dir=tiny / "spool", spool_min_free_bytes=0))
    rig.worker = type(rig.worker)(rig.cfg, rig.sensor, rig.channel, backend=rig.backend)
    rig.staging = Spool(tiny / "spool").staging_dir("cam")
    rig.start()
    filler = tiny / "filler"
    try:
        # 1. full before the clip: refused before the encoder is involved, several times in a row
        fill(filler)
        for n in range(1, 7):   # more than MAX_CONSECUTIVE_FAILURES
            rig.commands.put(ipc.CaptureNow(reason="test"))
            wait_for(lambda: sum("camera clip skipped" in getattr(e, "message", "") for e in rig.drain()
                                 if e.kind == ipc.ERROR) >= n, 20, f"skip {n}")
        assert rig.thread.is_alive() and rig.error is None
        assert not rig.backend.cameras or all(c.calls.count("start_recording") == 0 for c in rig.backend.cameras)
        # 2. room at the start (the check passes), the disk fills while the clip is written
        filler.unlink()
        rig.commands.put(ipc.CaptureNow(reason="test"))
        wait_for(lambda: temporaries(rig.staging), 20, "the clip's temporary file")
        fill(filler)
        wait_for(lambda: any("writing the clip failed" in getattr(e, "message", "") for e in rig.drain()
                             if e.kind == ipc.ERROR), 20, "the failed clip reported")
        assert temporaries(rig.staging) == [], "removed at once, not at the next start"
        assert rig.thread.is_alive() and rig.error is None
        # 3. space returns: the next clip is recorded
        filler.unlink()
        rig.commands.put(ipc.CaptureNow(reason="test"))
        wait_for(lambda: rig.records("*.mp4"), 30, "a clip after space returned")
    finally:
        rig.stop()
    assert rig.error is None
    clip = rig.records("*.mp4")[0]
    with av.open(str(clip)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) >= 50


def test_audio_on_a_full_disk_drops_segments_at_once_and_resumes_within_seconds(tmp_path, keys, password_file,
                                                                                   tiny):
    """No crash and no backoff: while the spool's file system is full the audio worker keeps its
    stream, discards the failed segment's temporary file at once, and records again within about a
    second of space returning; the first segment after says how much audio was lost."""
    from audio_peers import AudioThread

    cfg = make_config(tmp_path, keys, password_file, 21, **{
        "daemon.spool_dir": str(tiny / "spool"), "sensors.hive_audio.segment_s": 0.5,
        "sensors.hive_audio.block_s": 0.05, "sensors.hive_audio.sample_rate_hz": 48000,
        "sensors.hive_audio.noise": 0.9})
    filler = tiny / "filler"
    with AudioThread(cfg) as run:
        wait_for(lambda: len(run.records()) >= 2, 20, "two segments")
        fill(filler)
        wait_for(lambda: any(e.kind == ipc.ERROR and "no space for audio" in e.message
                             for e in drain(run)), 20, "the full disk reported")
        n_full = len(run.records())
        # every failed segment's temporary file goes at once: none accumulate while the disk is full
        for _ in range(10):   # the open segment's header (.open.json) rides with it: not a second one
            open_now = [p for p in temporaries(run.staging) if not p.name.endswith(".open.json")]
            assert len(open_now) <= 1, temporaries(run.staging)
            time.sleep(0.2)
        assert run.thread.is_alive() and run.error is None
        filler.unlink()
        returned = time.monotonic()
        wait_for(lambda: len(run.records()) > n_full, 10, "a segment after space returned")
        resumed_in = time.monotonic() - returned
    assert run.error is None
    assert resumed_in < 5, f"recording resumed {resumed_in:.1f} s after space returned"
    lost = [m["lost_to_full_disk_s"] for m in run.metadata() if "lost_to_full_disk_s" in m]
    assert len(lost) == 1 and lost[0] >= 1.0, lost
    assert temporaries(run.staging) == []
    errors = [e for e in run.events if e.kind == ipc.ERROR]
    assert len(errors) == 1, errors   # one report for the whole episode


def drain(run) -> list:
    while run.reader.poll():
        run.events.append(run.reader.recv())
    return run.events


def test_a_record_write_that_meets_a_full_disk_leaves_nothing_behind(tiny):
    from beemond.core import fsio
    from beemond.spool import write_record

    staging = tiny / "staging"
    staging.mkdir()
    fill(tiny / "filler", leave=64 * 1024)
    # Buffered data that does not fit: the failed flush and the close after it both raise ENOSPC.
    with pytest.raises(OSError) as e:
        write_record(staging, "big.csv", {"rows": 1}, data_writer=lambda f: f.write(b"x" * 1_000_000))
    assert e.value.errno == errno.ENOSPC
    assert list(staging.iterdir()) == [], "the temporary file is removed at once"
    # A stream written beforehand (an audio segment): the data fits, its sidecar no longer does. No
    # sidecar-less record is left (it would never be bundled); the caller gets its temporary file back.
    tmp = fsio.temp_name(staging, "segment")
    tmp.write_bytes(b"y" * 1000)
    fill(tiny / "filler")
    with pytest.raises(OSError):
        write_record(staging, "seg.flac", {"frames": 1}, tmp=tmp)
    assert sorted(p.name for p in staging.iterdir()) == [tmp.name]


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_an_open_audio_segment_met_by_a_full_disk_at_start_is_salvaged_later_not_set_aside(tmp_path, fmt):
    # A power cut on a full disk: the salvage at the next start cannot write the sidecar (ENOSPC). The
    # segment is sound: it must wait for space, not go to failed/ (never bundled, deleted by a human).
    from beemond import config
    from polled_peers import Harness, write_config
    from test_durability import kill, run_child

    why = _mount_tmpfs(tmp_path / "spool", "8m")
    if why:
        pytest.skip(why)
    try:
        sensor = {"type": "audio", "backend": "simulated", "sample_rate_hz": 8000, "segment_s": 60, "format": fmt,
                  "subtype": "PCM_16", "tone_hz": 440, "block_s": 0.05}
        cfg_path = write_config(tmp_path, "hive_audio", sensor)
        sp = Spool(config.load(cfg_path).spool)
        child = run_child(cfg_path)
        try:
            wait_for(lambda: sp.open_segments("hive_audio") and sp.open_segments("hive_audio")[0].stat().st_size > 30_000,
                     30, "audio in the open segment")
        finally:
            kill(child)
        fill(tmp_path / "spool" / "filler")
        h = Harness(tmp_path, "hive_audio")
        h.worker.salvage()
        assert not list(sp.failed_dir("hive_audio").glob("*")), "a sound segment set aside for a full disk"
        assert sp.open_segments("hive_audio"), "the segment waits for space"
        (tmp_path / "spool" / "filler").unlink()
        Harness(tmp_path, "hive_audio").worker.salvage()
        records = list(sp.staging_dir("hive_audio").glob(f"*.{fmt}"))
        assert len(records) == 1 and not sp.open_segments("hive_audio")
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "spool")], capture_output=True)
