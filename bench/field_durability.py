"""Power cuts and SD-card wear: what the reading journal and the durable audio segment cost, and what
a kill loses. A part of bench/field.py (``add_arguments(parser)``, ``measure(args) -> dict``).

write_amplification, fsyncs_per_hour
  The full simulated hive (config/simulated.toml as tests/conftest.make_config builds it, with the
  audio at 48 kHz PCM_24 FLAC in 10 s segments and the climate sensor at its own 0.5 s / 10 s)
  runs for --durability-seconds, uploading to a local FTP server, then stops gracefully.
  ``write_amplification`` = bytes the daemon's processes wrote (``write_bytes`` of /proc/PID/io: bytes
  sent, or to be sent, to the block device, counted when a page is dirtied, so an fdatasync'ed
  100-byte append costs a 4 KiB page) divided by the bytes of the bundles that reached the server.
  The whole process tree is counted exactly: the daemon runs under a small wrapper that is a child
  subreaper (PR_SET_CHILD_SUBREAPER), so every process of the tree, orphans included, is reaped into
  the wrapper, whose own /proc/self/io then holds the sum (Linux adds a reaped child's counts to its
  parent's). The work directory is on the disk (/var/tmp), not a tmpfs.
  ``fsyncs_per_hour`` counts fsync and fdatasync calls with ``strace -f --seccomp-bpf`` (only those
  two are traced, so the daemon runs at nearly full speed), scaled to an hour. Per worker (pid ->
  worker name from the daemon's log): ``fsyncs_per_hour_<worker>`` and ``write_bytes_per_hour_<worker>``
  (the last /proc/PID/io seen, polled every 0.25 s).
lost_readings
  bench/soak.py with --durability-kills SIGKILLs (and --durability-power-cut for power cuts on a
  loop-mounted ext4): climate readings recorded at a kill and missing afterwards, plus replayed rows
  missing from the one unbroken run of rows the resumed replay must give.

--durability-baseline DIR measures write_amplification and fsyncs_per_hour of another checkout
(e.g. /work/main) the same way, for comparison.

Reproduce:  .venv/bin/python bench/field.py --part durability [--durability-seconds 60]
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Runs the command as a child subreaper; every descendant ends up reaped here, so /proc/self/io
# holds the whole tree's counts. Prints "write_bytes=N" to the file named first.
WRAPPER = r"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
proc = subprocess.Popen(sys.argv[2:])
status = None
while True:
    try:
        pid, st = os.wait()
    except ChildProcessError:
        break
    if pid == proc.pid:
        status = os.waitstatus_to_exitcode(st)
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
open(sys.argv[1], "w").write(f"write_bytes={io['write_bytes']}\n")
sys.exit(status or 0)
"""


def add_arguments(parser) -> None:
    g = parser.add_argument_group("durability")
    g.add_argument("--durability-seconds", type=float, default=60.0, help="length of the write-cost run (s)")
    g.add_argument("--durability-kills", type=int, default=10, help="SIGKILLs for lost_readings (0: skip)")
    g.add_argument("--durability-power-cut", action="store_true", help="power cuts instead of SIGKILLs")
    g.add_argument("--durability-baseline", type=Path, default=None,
                   help="also measure the write cost of this checkout (e.g. /work/main)")


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.append(k)
            todo.append(k)
    return out


def _write_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# Keys this branch added to config/simulated.toml, dropped when an older checkout is measured.
NEW_KEYS = ("sensors.hive_climate.replay.timezone", "sensors.hive_climate.replay.resume")


def write_cost(seconds: float, source: Path | None = None) -> dict:
    """Run the full simulated hive for *seconds* under the wrapper and strace; see the module docstring."""
    from conftest import FtpServer, make_config

    from beemond.bundle import crypto

    work = Path(tempfile.mkdtemp(prefix="beemond-field-durability-", dir="/var/tmp"))
    ftp = None
    try:
        ident, rcpt, public = crypto.keygen(work / "keys")
        password = work / "ftp-password"
        password.write_text("field\n")
        ftp = FtpServer(work / "ftp-root", password).start()
        cfg = make_config(work, {"identity": ident, "recipient": rcpt, "public": public}, password, ftp.port, **{
            "sensors.hive_audio.sample_rate_hz": 48000, "sensors.hive_audio.subtype": "PCM_24",
            "sensors.hive_audio.segment_s": 10, "sensors.hive_climate.interval_s": 0.5,
            "sensors.hive_climate.record_window_s": 10, "daemon.log_level": "info",
            **({k: None for k in NEW_KEYS} if source is not None else {})})
        log, trace, io_out = work / "daemon.log", work / "strace.txt", work / "io.txt"
        # The simulated DS18B20's stand-in for sysfs goes to a temporary directory: on a Pi sysfs is
        # not the SD card, so it is kept off the disk here too (only the spool's writes count).
        env = dict(os.environ, TMPDIR="/dev/shm")
        if source is not None:
            env["PYTHONPATH"] = str(source)
        cmd = [sys.executable, "-c", WRAPPER, str(io_out), "strace", "-f", "--seccomp-bpf", "-qq",
               "-e", "trace=fsync,fdatasync", "-o", str(trace),
               sys.executable, "-m", "beemond", "run", "--config", str(cfg)]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=source or ROOT, env=env,
                                    start_new_session=True)
        t0 = time.monotonic()
        last: dict[int, int] = {}
        thread_of: dict[int, int] = {}   # strace names the thread (TID) that called; a worker is a process
        while time.monotonic() - t0 < seconds:
            for pid in _descendants(proc.pid):
                wb = _write_bytes(pid)
                if wb is not None:
                    last[pid] = wb
                try:
                    thread_of.update((int(t), pid) for t in os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    pass
            time.sleep(0.25)
        # SIGTERM the daemon (strace's child), not strace: a graceful stop seals and uploads the rest.
        daemon = [p for p in _descendants(proc.pid) if b"beemond" in Path(f"/proc/{p}/cmdline").read_bytes()
                  and b"strace" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        if not daemon:
            raise RuntimeError("the daemon is not running: " + log.read_text()[-2000:])
        os.kill(min(daemon), signal.SIGTERM)
        proc.wait(180)
        elapsed = time.monotonic() - t0
        total = int(io_out.read_text().split("=")[1])
        delivered = sum(p.stat().st_size for p in ftp.bundles())
        names = {int(pid): name for name, pid in re.findall(r"started worker (\S+) \(\S+, pid (\d+)\)", log.read_text())}
        calls = collections.Counter()
        for line in trace.read_text().splitlines():
            m = re.match(r"(\d+)\s+(fsync|fdatasync)\(", line)
            if m:
                calls[int(m.group(1))] += 1
        per_hour = 3600.0 / elapsed
        out = {"write_amplification": round(total / delivered, 3) if delivered else "inf",
               "fsyncs_per_hour": round(sum(calls.values()) * per_hour),
               "written_bytes": total, "delivered_bytes": delivered, "run_s": round(elapsed, 1)}
        by_worker_f, by_worker_b = collections.Counter(), collections.Counter()
        for tid, n in calls.items():
            by_worker_f[names.get(thread_of.get(tid, tid), "orchestrator/other")] += n
        for pid, wb in last.items():
            if pid in names:
                by_worker_b[names[pid]] += wb
        for name in sorted(set(by_worker_f) | set(by_worker_b)):
            out[f"fsyncs_per_hour_{name}"] = round(by_worker_f[name] * per_hour)
            if name in by_worker_b:
                out[f"write_bytes_per_hour_{name}"] = round(by_worker_b[name] * per_hour)
        return out
    finally:
        if ftp is not None:
            ftp.stop()
        shutil.rmtree(work, ignore_errors=True)


def lost_readings(kills: int, power_cut: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--kills", str(kills)]
    if power_cut:
        cmd.append("--power-cut")
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    last = dict(kv.split("=", 1) for kv in run.stdout.strip().splitlines()[-1].split())
    return {"lost_readings": int(last["lost"]), "soak_kills": kills, "soak_mode": last["mode"],
            "soak_replay_twice": int(last["replay_twice"]), "soak_audio_loss_max_s": float(last["audio_loss_max_s"])}


def measure(args) -> dict:
    out: dict = {}
    if args.durability_kills:
        out.update(lost_readings(args.durability_kills, args.durability_power_cut))
    out.update(write_cost(args.durability_seconds))
    if args.durability_baseline is not None:
        base = write_cost(args.durability_seconds, args.durability_baseline)
        out["baseline_write_amplification"] = base["write_amplification"]
        out["baseline_fsyncs_per_hour"] = base["fsyncs_per_hour"]
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    got = measure(ap.parse_args())
    print(" ".join(f"{k}={v}" for k, v in got.items()))
