"""Disk full, the one space policy ([daemon] spool_max_bytes, spool_min_free_bytes, drop_oldest_when_full,
enforced by the uploader, the only process that deletes from the outbox):
with drop_oldest_when_full the oldest bundles go and the newest stay; without it no un-uploaded bundle is
ever deleted, one error says the spool is full, and all resumes when space returns; on a real 4 MB tmpfs,
ENOSPC is survived and recording resumes when space returns."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
    assert dropped[0] in first, "the oldest bundle goes first"
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
        wait_for(lambda: re.search(r"No space left on device|spool full \(.*\) with only the newest bundle left", d.log()[n_log:]), 30,
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
        assert not re.search(r"worker (aggregator|uploader) exited", log)
        assert d.proc.poll() is None
        assert d.terminate() == 0, d.log()
    finally:
        if ftp is not None:
            ftp.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
