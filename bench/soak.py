"""Crash-safety soak: SIGKILL the whole daemon at random moments, restart it, then account for every
reading.

What it does
  Runs ``beemond run`` (the simulated hive of config/simulated.toml, sped up as in tests/conftest:
  the SHT3x emulator replaying UrBAN hive 3629, the audio emulator, age to a fresh key) uploading to a
  local pyftpdlib server (scripts/ftp_server.py). --kills times: start the daemon in its own session,
  let it run a random 0.5..--max-gap s counted from the moment its climate worker started (so a slow,
  loaded machine still kills working daemons rather than Python start-ups), SIGKILL the process group (orchestrator, forkserver, every
  worker). What was durable is snapshotted every 0.25 s while it runs and right after the kill: every
  record file in ``spool/staging`` (its climate readings parsed), and every bundle in ``spool/outbox``. Then one graceful run (--final-s, SIGTERM)
  drains the spool.
What it checks
  Every bundle on the server and left in the outbox decrypts with the stock ``age`` CLI and matches
  its manifest (size and SHA-256 of every member), else it counts as ``corrupt``. Every record and
  every climate reading in a snapshot, and every outbox bundle, must be found in an uploaded bundle or
  still in the spool, else it counts as ``lost``. A reading must be a real UrBAN row (values as
  replayed), else ``corrupt``. ``duplicates``: readings found in more than one place (allowed after a
  crash by the design: a record re-sealed under its idempotent name).
Readings held in a worker's memory when it is killed were never recorded and are not counted: the
promise is about what was written.

Reproduce (from the repo root):  .venv/bin/python bench/soak.py [--kills 50] [--seed 1]
Ends with one line: kills= lost= corrupt= duplicates= bundles= records= readings= seconds=
Exit status 1 if lost or corrupt is not 0. Needs /usr/bin/age (``apt-get install -y age``).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FtpServer, climate_rows, decrypt_with_age, make_config, urban_rows  # noqa: E402

from beemond import archive, crypto  # noqa: E402
from beemond.spool import Spool  # noqa: E402


def staged_records(spool: Path) -> dict[str, bytes]:
    """Record files durable in staging now: member name (``sensor/name``) -> contents."""
    out = {}
    staging = Spool(spool).staging
    for path in staging.rglob("*"):
        if path.is_file() and not archive.is_internal(path.name) and not path.name.endswith(archive.META_SUFFIX):
            try:
                out[str(path.relative_to(staging))] = path.read_bytes()
            except FileNotFoundError:  # bundled and removed while we looked (the daemon is running)
                pass
    return out


def outbox_bundles(spool: Path) -> list[Path]:
    return sorted(Spool(spool).bundles())


def start(cfg: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "beemond", "run", "--config", str(cfg)], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def _wait_worker_started(log: Path, offset: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until this run's log (from *offset*) says the climate worker started, or the daemon exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log, "rb") as f:
            f.seek(offset)
            if b"started worker hive_climate" in f.read():
                return
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-gap", type=float, default=4.0, help="longest run before a kill (s)")
    p.add_argument("--final-s", type=float, default=6.0, help="length of the last, graceful run (s)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args()
    if shutil.which("age") is None:
        print("soak: the age CLI is missing (apt-get install -y age)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="beemond-soak-"))
    ftp = None
    try:
        ident, rcpt, public = crypto.keygen(work / "keys")
        keys = {"identity": ident, "recipient": rcpt, "public": public}
        password = work / "ftp-password"
        password.write_text("soak\n")
        ftp = FtpServer(work / "ftp-root", password).start()
        cfg = make_config(work, keys, password, ftp.port, **{
            "bundle.max_duration_s": 1.5, "sensors.hive_climate.record_window_s": 0.6,
            # Kills at start-up look like a crash loop to nobody: each start is a new orchestrator.
            "daemon.shutdown_timeout_s": 30})
        spool = work / "spool"
        expected_records: dict[str, bytes] = {}
        expected_bundles: set[str] = set()
        log = work / "daemon.log"
        for i in range(args.kills):
            offset = log.stat().st_size if log.exists() else 0
            proc = start(cfg, log)
            _wait_worker_started(log, offset, proc)
            kill_at = time.monotonic() + rng.uniform(0.5, args.max_gap)
            while time.monotonic() < kill_at:  # what is durable while it runs must survive too
                expected_records.update(staged_records(spool))
                time.sleep(min(0.25, max(0.0, kill_at - time.monotonic())))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # The forkserver and workers are in the killed group too; wait until none holds the spool.
            _wait_group_gone(proc.pid)
            expected_records.update(staged_records(spool))
            expected_bundles.update(b.name for b in outbox_bundles(spool))
        proc = start(cfg, work / "daemon.log")
        time.sleep(args.final_s)
        proc.send_signal(signal.SIGTERM)
        final_status = proc.wait(120)

        found: dict[str, list[bytes]] = collections.defaultdict(list)   # member -> copies
        corrupt, bundles = 0, 0
        places = [*ftp.bundles(), *outbox_bundles(spool)]
        for bundle in places:
            bundles += 1
            try:
                got = decrypt_with_age(bundle, ident)
            except Exception as e:  # noqa: BLE001 - any failure to read a bundle is the finding
                corrupt += 1
                print(f"corrupt bundle {bundle.name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            for name, data in got["members"].items():
                found[name].append(data)
        for name, data in staged_records(spool).items():
            found[name].append(data)

        server_or_outbox = {b.name for b in places}
        lost_bundles = expected_bundles - server_or_outbox
        lost_records = [n for n in expected_records if n not in found]
        # Readings: every climate row recorded at a kill must be somewhere now.
        have_rows = collections.Counter(climate_rows({f"{n}#{i}": d for n, copies in found.items()
                                                      for i, d in enumerate(copies)}))
        want_rows = set(climate_rows(expected_records))
        lost_rows = [r for r in want_rows if r not in have_rows]
        real = set(urban_rows())
        invented = [r for r in have_rows if (r[1], r[2]) not in real]
        duplicates = sum(c - 1 for c in have_rows.values() if c > 1)
        records = len(found)
        lost = len(lost_bundles) + len(lost_records) + len(lost_rows)
        corrupt += len(invented)
        for what, items in (("bundle", lost_bundles), ("record", lost_records), ("reading", lost_rows),
                            ("invented reading", invented)):
            for item in sorted(items)[:10]:
                print(f"{what} lost or wrong: {item}", file=sys.stderr)
        print(f"final graceful run exited {final_status}; {len(expected_records)} records and "
              f"{len(expected_bundles)} bundles were seen durable; {len(want_rows)} readings checked; "
              f"{len(ftp.bundles())} bundles uploaded, {len(outbox_bundles(spool))} left in the outbox")
        print(f"kills={args.kills} lost={lost} corrupt={corrupt} duplicates={duplicates} bundles={bundles} "
              f"records={records} readings={sum(have_rows.values())} final_status={final_status} "
              f"seconds={time.monotonic() - t0:.0f}")
        return 0 if lost == 0 and corrupt == 0 and final_status == 0 else 1
    finally:
        if ftp is not None:
            ftp.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(main())
