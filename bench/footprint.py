"""Memory and CPU footprint of the running daemon (the real ``beemond run``, simulated sensors).

What is measured
  Phase "busy": ``.venv/bin/beemond run`` with config/simulated.toml (SHT3x replaying UrBAN rows every
  0.5 s + continuous simulated audio to FLAC, bundles every 15 s, uploads to the project's FTP server
  ``scripts/ftp_server.py`` on 127.0.0.1), with its own spool, a fresh key and an absolute replay path.
  Phase "idle": the same, but only the SHT3x, measuring every 30 s into 60 s records (no audio: it
  records continuously and is never idle).
  In each phase, after a warm-up (default 15 s), every second: the daemon's whole process tree (main
  pid + all descendants via /proc/PID/task/*/children, so the forkserver, the resource tracker and the
  workers) -> PSS summed from /proc/PID/smaps_rollup, and utime+stime from /proc/PID/stat. CPU over the
  window = sum over processes of (last ticks - ticks at the window start, or 0 if born inside it),
  in percent of one core. Processes that die inside the window count up to their last sample.
  The FTP server is not part of the daemon tree and is not counted.
  At the end the daemon gets SIGTERM; its exit status and shutdown time are printed, with any
  WARNING/ERROR lines of its log.

--as-installed runs the daemon as scripts/install.sh installs it (bytecode compiled, no editable-install
hook; see daemon_command): the numbers a Pi would see, less this machine's dev-venv overhead.

Reproduce (from the repo root):  .venv/bin/python bench/footprint.py [--seconds 60] [--idle-seconds 30] [--as-installed]
Goals (from the product card; issue 12 for a Pi Zero 2 W): pss_mb <= 120, idle_pss_mb <= 60, idle_cpu_percent <= 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

from beemond.spool import Spool

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "simulated.toml"
BEEMOND = REPO / ".venv" / "bin" / "beemond"
PYTHON = REPO / ".venv" / "bin" / "python"
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ /proc

def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids


def stat(pid: int) -> tuple[int, int] | None:
    """(start time, utime+stime) in clock ticks; the start time tells a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 on; comm may hold spaces
    return int(fields[19]), int(fields[11]) + int(fields[12])  # 22: starttime, 14: utime, 15: stime


def pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = " ".join(a.decode(errors="replace") for a in args if a)
        return text or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------ config

def derive_config(tmp: Path, name: str, recipient: Path, upload: dict, idle: bool) -> Path:
    """config/simulated.toml with its own spool and key, absolute paths, and *upload* settings."""
    cfg = tomllib.loads(CONFIG.read_text())
    spool = tmp / name / "spool"
    cfg["daemon"]["spool_dir"] = str(spool)
    cfg["bundle"]["recipients"] = [str(recipient)]
    cfg["upload"].update(upload)
    for sensor in cfg["sensors"].values():
        replay = sensor.get("replay")
        if replay and "file" in replay:
            replay["file"] = str((CONFIG.parent / replay["file"]).resolve())
    if idle:
        cfg["sensors"] = {k: v for k, v in cfg["sensors"].items() if v["type"] == "sht3x"}
        cfg.pop("processors", None)  # they read the audio and the scale, which are gone
        for sensor in cfg["sensors"].values():
            sensor["interval_s"] = 30
            sensor["record_window_s"] = 60
    path = tmp / name / "beemond.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(cfg))
    return path


def start_ftp(tmp: Path) -> tuple[subprocess.Popen, dict]:
    pw = tmp / "ftp-password"
    pw.write_text("bench-secret\n")
    proc = subprocess.Popen([str(PYTHON), str(REPO / "scripts" / "ftp_server.py"), "--root", str(tmp / "ftp"),
                             "--port", "0", "--password-file", str(pw)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()  # "ready PORT"; the server prints it once it listens
    if len(line) != 2 or line[0] != "ready":
        proc.kill()
        raise SystemExit(f"FTP server did not start: {line!r}")
    return proc, {"protocol": "ftp", "host": "127.0.0.1", "port": int(line[1]), "user": "beemond",
                  "password_file": str(pw)}


# ------------------------------------------------------------------------------------------ a phase

def daemon_command(as_installed: bool, tmp: Path) -> tuple[list[str], dict | None]:
    """The command line and environment of ``beemond run``. Two costs of the dev venv that an
    installed daemon (scripts/install.sh: a regular ``pip install``) does not pay:
    - the editable install's .pth import hook (scripts/setup: ``pip install -e``), about 1.9 MB PSS in
      each fresh interpreter: the orchestrator, the forkserver and the resource tracker;
    - no bytecode for beemond's own modules where ``PYTHONDONTWRITEBYTECODE`` is set (as in this
      project's sessions): each process compiles them from source at import, and the compiler's freed
      memory stays in its heap (``beemond.config``: 4 MB; pip compiles on install).
    *as_installed* removes both: a copy of the package in *tmp*, compiled there, run with ``python -S``
    (no site; the flag carries over to the forkserver and the tracker) and the copy and the venv's
    site-packages on PYTHONPATH. That understates an installed daemon by the site module itself, about
    0.2 MB per interpreter."""
    if not as_installed:
        return [str(BEEMOND)], None
    lib = tmp / "lib"
    if not lib.exists():
        shutil.copytree(REPO / "beemond", lib / "beemond", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(lib)], check=True)
    site = subprocess.run([str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    return [str(PYTHON), "-S", "-m", "beemond"], {**os.environ, "PYTHONPATH": f"{lib}:{site}"}


def measure(label: str, cfg: Path, warmup: float, seconds: float, as_installed: bool = False) -> dict:
    log_path = cfg.parent / "daemon.log"
    with open(log_path, "w") as log:
        # --duration well past the window: the stop below is a SIGTERM, as from systemd.
        command, env = daemon_command(as_installed, cfg.parent)
        daemon = subprocess.Popen([*command, "run", "--config", str(cfg), "--duration", str(warmup + seconds + 120)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[{label}] daemon pid {daemon.pid}, config {cfg}; warm-up {warmup:g} s, then {seconds:g} s of samples")
    try:
        time.sleep(warmup)
        base: dict[tuple[int, int], int] = {}    # (pid, start) -> ticks at the window start
        last: dict[tuple[int, int], int] = {}    # (pid, start) -> last ticks seen
        peak: dict[tuple[int, int], int] = {}    # PSS kB
        totals, counts = [], []
        for pid in tree(daemon.pid):
            s = stat(pid)
            if s:
                base[(pid, s[0])] = s[1]
        t0 = time.monotonic()
        next_at = t0
        while True:
            total_kb = 0
            live = tree(daemon.pid)
            for pid in live:
                s, kb = stat(pid), pss_kb(pid)
                if s is None:
                    continue
                key = (pid, s[0])
                last[key] = s[1]
                if kb is not None:
                    total_kb += kb
                    peak[key] = max(peak.get(key, 0), kb)
            totals.append(total_kb)
            counts.append(len(live))
            next_at += 1.0
            if next_at - t0 > seconds + 1e-6:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
        window = time.monotonic() - t0
        cpu_ticks = sum(v - base.get(k, 0) for k, v in last.items())
        breakdown = []
        for key in sorted(last, key=lambda k: k[1]):
            breakdown.append((key[0], peak.get(key, 0) / 1024, (last[key] - base.get(key, 0)) / TICK / window * 100))
        names = worker_names(log_path, daemon.pid)
        print(f"[{label}] {'pid':>7} {'PSS max MB':>10} {'CPU %':>6}  process")
        for pid, mb, cpu in breakdown:
            print(f"[{label}] {pid:>7} {mb:>10.1f} {cpu:>6.2f}  {names.get(pid) or cmdline(pid)[:90]}")
    finally:
        t_stop = time.monotonic()
        early = daemon.poll()
        if early is None:
            daemon.send_signal(signal.SIGTERM)
        else:
            print(f"[{label}] the daemon exited on its own before the end of the window (status {early})")
        try:
            status = daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            status = daemon.wait()
            print(f"[{label}] daemon did not stop within 120 s of SIGTERM: killed")
        stop_s = time.monotonic() - t_stop
    problem = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
    problems = [line for line in log_path.read_text().splitlines() if problem.search(line)]
    print(f"[{label}] SIGTERM -> exit status {status} (expected 0) in {stop_s:.1f} s; "
          f"{len(problems)} WARNING/ERROR line(s) in the daemon log")
    for line in problems[:20]:
        print(f"[{label}]   {line}")
    spool = Spool(cfg.parent / "spool")
    left = [p.name for p in spool.bundles()]
    staged = [p for p in spool.staging.rglob("*") if p.is_file()]
    print(f"[{label}] after stop: {len(left)} bundle(s) in the outbox, {len(staged)} file(s) in staging")
    return {"pss_mean_mb": statistics.mean(totals) / 1024, "pss_max_mb": max(totals) / 1024,
            "processes": max(counts), "cpu_percent": cpu_ticks / TICK / window * 100, "status": status,
            "stop_s": stop_s}


def worker_names(log_path: Path, main_pid: int) -> dict[int, str]:
    """pid -> worker name, from the orchestrator's "started worker NAME (ROLE, pid N)" lines."""
    names = {main_pid: "orchestrator (beemond run)"}
    for m in re.finditer(r"started worker (\S+) \((\w+), pid (\d+)\)", log_path.read_text()):
        names[int(m[3])] = f"worker {m[1]} ({m[2]})"
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="busy measurement window")
    p.add_argument("--idle-seconds", type=float, default=30, help="idle measurement window")
    p.add_argument("--warmup", type=float, default=15)
    p.add_argument("--upload", choices=("ftp", "none"), default="ftp")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, daemon logs, spools)")
    p.add_argument("--as-installed", action="store_true",
                   help="as scripts/install.sh installs it: precompiled bytecode, no editable-install hook")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="beemond-bench-footprint-"))
    ftp = None
    try:
        subprocess.run([str(BEEMOND), "keygen", "--out", str(tmp / "keys")], check=True, stdout=subprocess.DEVNULL)
        recipient = tmp / "keys" / "recipient.txt"
        if args.upload == "ftp":
            ftp, upload = start_ftp(tmp)
            print(f"FTP server pid {ftp.pid} on 127.0.0.1:{upload['port']}")
        else:
            upload = {"protocol": "none"}
        busy = measure("busy", derive_config(tmp, "busy", recipient, upload, idle=False), args.warmup, args.seconds,
                       args.as_installed)
        uploaded = len(list((tmp / "ftp").rglob("*.tar.age"))) if ftp else 0
        print(f"[busy] bundles on the FTP server: {uploaded}")
        idle = measure("idle", derive_config(tmp, "idle", recipient, upload, idle=True), args.warmup, args.idle_seconds,
                       args.as_installed)
        print(f"busy: {busy['processes']} processes, PSS mean {busy['pss_mean_mb']:.1f} MB max {busy['pss_max_mb']:.1f} MB, "
              f"CPU {busy['cpu_percent']:.2f} % of a core; idle: PSS {idle['pss_mean_mb']:.1f} MB, "
              f"CPU {idle['cpu_percent']:.2f} %")
        print(f"processes={busy['processes']} pss_mb={busy['pss_mean_mb']:.1f} pss_max_mb={busy['pss_max_mb']:.1f} "
              f"cpu_percent={busy['cpu_percent']:.2f} idle_processes={idle['processes']} "
              f"idle_pss_mb={idle['pss_mean_mb']:.1f} idle_cpu_percent={idle['cpu_percent']:.2f} "
              f"exit_status={busy['status']} idle_exit_status={idle['status']}")
        return 0
    finally:
        if ftp is not None:
            ftp.terminate()
            try:
                ftp.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ftp.kill()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
