"""Crash-safety soak: SIGKILL the whole daemon (or cut its power) at random moments, restart it, then
account for every reading.

What it does
  Runs ``beemond run`` (the simulated hive of config/simulated.toml, sped up as in tests/conftest:
  the SHT3x emulator replaying UrBAN hive 3629 with replay resume on, the audio emulator in 10 s
  segments, age to a fresh key) uploading to a local pyftpdlib server (scripts/ftp_server.py). The
  climate record window is --record-window-s (5 s), so readings wait in the reading journal, not in
  records. --kills times: start the daemon in its own session, let it run a random 0.5..--max-gap s
  counted from the moment its climate worker started (so a slow, loaded machine still kills working
  daemons rather than Python start-ups), SIGKILL the process group (orchestrator, forkserver, every
  worker). With --power-cut the spool is on a loop-mounted ext4 (``LoopSpool``: data=writeback,
  commit=60) and each kill is a power cut: SIGSTOP the group, copy the image (what reached the disk),
  SIGKILL, unmount, put the copy back, e2fsck, mount; a control run first shows that the method
  loses an unsynced write and a rename without a directory fsync (``control_*=1``). What was durable
  is snapshotted every 0.25 s while it runs and right after the kill: every record file in
  ``spool/staging`` (its climate readings parsed), and every bundle in ``spool/outbox``. Then one
  graceful run (--final-s after its climate worker started, then SIGTERM) drains the spool.
What it checks
  Every bundle on the server and left in the outbox decrypts with the stock ``age`` CLI and matches
  its manifest (size and SHA-256 of every member), else it counts as ``corrupt``. Every record and
  every climate reading in a snapshot, and every outbox bundle, must be found in an uploaded bundle or
  still in the spool, else it counts as ``lost``. Replay resume (``replay_check``): the replayed rows
  (by the ``replay.rows`` of each record's metadata) must be one unbroken run from the first row,
  each with the UrBAN file's values (value for value; else ``corrupt``); a row missing counts as lost
  (``replay_missing``), a row in two records of different names as ``replay_twice``; the same record
  found twice (re-sealed under its idempotent name after a crash) is allowed and counted as
  ``resealed``. Audio (``audio_loss``): per cut, the seconds between the cut and the end of the last
  durable audio of that run (the salvaged segment); ``audio_cuts_over_2s`` must be 0.
Rows read in the last second before a kill may not be durable; the resumed replay serves them again
after the restart, so no row may be missing at all.

Reproduce (from the repo root):  .venv/bin/python bench/soak.py [--kills 50] [--seed 1] [--power-cut]
Ends with one line: mode= kills= lost= corrupt= duplicates= replay_rows= replay_missing= replay_twice=
resealed= audio_cuts= audio_loss_max_s= audio_cuts_over_2s= ... seconds=
Exit status 1 if lost, corrupt, replay_twice or audio_cuts_over_2s is not 0. Needs /usr/bin/age
(``apt-get install -y age``); --power-cut needs root (mount, losetup), mkfs.ext4 and e2fsck.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
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

from conftest import DATA, FtpServer, climate_rows, decrypt_with_age, make_config, urban_rows  # noqa: E402

from beemond.core import clock, fsio  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.sensors.replay import load_rows  # noqa: E402
from beemond.spool import META_SUFFIX, Spool, sidecar_of  # noqa: E402


def staged_records(spool: Path) -> dict[str, bytes]:
    """Record files durable in staging now: member name (``sensor/name``) -> contents."""
    out = {}
    staging = Spool(spool).staging
    for path in staging.rglob("*"):
        if path.is_file() and not fsio.is_internal(path.name) and not path.name.endswith(META_SUFFIX):
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
    """Until this run's log (from *offset*) says the climate worker is recording, or the daemon exited.
    Its own line, not the orchestrator's "started worker": on a loaded machine a worker takes seconds
    from spawn to its first reading, and a kill before that would test nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with open(log, "rb") as f:
            f.seek(offset)
            if b"hive_climate INFO recording every" in f.read():
                return
        time.sleep(0.05)


class LoopSpool:
    """The spool on ext4 in an image file through a loop device, mounted so that unsynced data and
    metadata stay in the page cache for up to a minute (``data=writeback,noauto_da_alloc,commit=60``).
    :meth:`cut` turns the daemon off as a power cut would: SIGSTOP every process, copy the image (what
    reached the "disk"), SIGKILL, unmount, put the copy in place, ``e2fsck -p``, mount again.
    What it cannot show: a disk's own volatile cache and torn sectors (../shared/TESTBED.md)."""

    OPTIONS = "loop,data=writeback,noauto_da_alloc,commit=60"

    def __init__(self, work: Path, mountpoint: Path, size: str = "256M"):
        self.image, self.mnt = work / "spool.img", mountpoint
        subprocess.run(["truncate", "-s", size, str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.mount()

    def mount(self) -> None:
        subprocess.run(["mount", "-o", self.OPTIONS, str(self.image), str(self.mnt)], check=True)

    def umount(self) -> None:
        for _ in range(50):
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", str(self.mnt)], check=True)

    def cut(self, pgid: int | None) -> None:
        if pgid is not None:
            _signal_group(pgid, signal.SIGSTOP)
        snap = self.image.with_suffix(".cut")
        subprocess.run(["cp", "--sparse=always", str(self.image), str(snap)], check=True)
        if pgid is not None:
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid)
        self.umount()
        os.replace(snap, self.image)
        fsck = subprocess.run(["e2fsck", "-p", str(self.image)], capture_output=True, text=True)
        if fsck.returncode not in (0, 1):   # 1: errors corrected
            raise RuntimeError(f"e2fsck exit {fsck.returncode}: {fsck.stdout}{fsck.stderr}")
        self.mount()

    def control(self) -> dict:
        """Show that a cut loses what was not synced: a file written without fsync, a rename without a
        directory fsync; and keeps what was."""
        d = self.mnt / "control"
        d.mkdir()
        (d / "old").write_bytes(b"old")
        fd = os.open(d / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"durable")
        os.fsync(fd)
        os.close(fd)
        fsio.fsync_dir(d)
        (d / "old").write_bytes(b"old")
        with open(d / "old", "rb") as f:
            os.fsync(f.fileno())
        fsio.fsync_dir(d)
        (d / "unsynced").write_bytes(b"x" * 4096)
        os.rename(d / "old", d / "renamed")
        self.cut(None)
        unsynced = (d / "unsynced").read_bytes() if (d / "unsynced").exists() else b""
        out = {"control_unsynced_write_lost": int(unsynced != b"x" * 4096),
               "control_unsynced_rename_lost": int(not (d / "renamed").exists()),
               "control_synced_kept": int((d / "synced").exists() and (d / "synced").read_bytes() == b"durable")}
        shutil.rmtree(d)
        return out

    def close(self) -> None:
        self.umount()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def bundle_records(bundle: Path, ident: Path) -> list[tuple[str, bytes, dict]]:
    """(member name, data, metadata) of every record in *bundle* (decrypted with the stock age CLI)."""
    got = decrypt_with_age(bundle, ident)
    meta = {r["path"]: r.get("metadata") or {} for r in got["manifest"]["records"]}
    return [(name, data, meta.get(name, {})) for name, data in got["members"].items()]


def staged_with_metadata(spool: Path) -> list[tuple[str, bytes, dict]]:
    out = []
    for name, data in staged_records(spool).items():
        try:
            meta = json.loads(sidecar_of(Spool(spool).staging / name).read_bytes())
        except (OSError, ValueError):
            meta = {}
        out.append((name, data, meta))
    return out


def replay_check(records: list[tuple[str, bytes, dict, str]], sensor: str = "hive_climate") -> dict:
    """Every replayed row of *sensor* accounted for: its values as in the UrBAN file (value for value),
    the row indices one unbroken run (a row missing = lost), a row in two records of different names
    = duplicated (the same record twice, re-sealed under its idempotent name, is allowed: ``resealed``).
    *records*: (member, data, metadata, place) with place ``server``, ``outbox`` or ``staging``."""
    rows = load_rows(DATA, "Date", {"temperature_c": "temperature", "humidity_rh": "humidity"}, "Tag number", "3629")
    by_index: dict[int, set[str]] = collections.defaultdict(set)
    places: dict[int, set[str]] = collections.defaultdict(set)
    wrong = copies = 0
    seen_members: set[str] = set()
    for member, data, meta, place in records:
        if not member.startswith(sensor + "/"):
            continue
        if member in seen_members:
            copies += 1
            continue
        seen_members.add(member)
        lines = data.decode().splitlines()[1:]
        indices = [i for a, b in (meta.get("replay") or {}).get("rows", []) for i in range(a, b + 1)]
        if len(indices) != len(lines):
            wrong += 1
            print(f"{member}: {len(lines)} rows but replay metadata names {len(indices)}", file=sys.stderr)
            continue
        for line, i in zip(lines, indices):
            _, t, rh = line.split(",")
            if (t, rh) != (f"{rows[i].temperature_c:.2f}", f"{rows[i].humidity_rh:.2f}"):
                wrong += 1
            by_index[i].add(member)
            places[i].add(place)
    first, last = (min(by_index), max(by_index)) if by_index else (0, -1)
    missing = [i for i in range(first, last + 1) if i not in by_index]
    twice = [i for i, members in by_index.items() if len(members) > 1]
    undelivered = [i for i, p in places.items() if "server" not in p]
    for what, items in (("row missing", missing), ("row in two records", twice)):
        for i in items[:10]:
            print(f"replay {what}: {i} {sorted(by_index.get(i, ()))}", file=sys.stderr)
    return {"replay_rows": len(by_index), "replay_first": first, "replay_missing": len(missing),
            "replay_twice": len(twice), "replay_wrong": wrong, "resealed": copies,
            "replay_not_on_server": len(undelivered)}


def audio_loss(records: list[tuple[str, bytes, dict, str]], runs: list[tuple[float, float]],
               sensor: str = "hive_audio") -> dict:
    """Per cut: seconds between the cut and the end of the last durable audio of that run (runs: (UTC
    start of the run, UTC time of the cut)). Runs in which no segment started are not counted."""
    spans = {(m["start"], m["end"]) for member, _, m, _ in records if member.startswith(sensor + "/") and "end" in m}
    spans = [(clock.parse_iso(a).timestamp(), clock.parse_iso(b).timestamp()) for a, b in spans]
    losses = []
    for began, cut in runs:
        ends = [e for s, e in spans if began <= s < cut]
        if ends:
            losses.append(max(0.0, cut - max(ends)))
    return {"audio_cuts": len(losses), "audio_loss_max_s": round(max(losses, default=0.0), 2),
            "audio_loss_mean_s": round(sum(losses) / len(losses), 2) if losses else 0.0,
            "audio_cuts_over_2s": sum(1 for x in losses if x > 2.0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-gap", type=float, default=4.0, help="longest run before a kill (s)")
    p.add_argument("--final-s", type=float, default=8.0, help="length of the last, graceful run (s)")
    p.add_argument("--power-cut", action="store_true",
                   help="cut power (spool on a loop-mounted ext4, see LoopSpool) instead of SIGKILL")
    p.add_argument("--record-window-s", type=float, default=5.0,
                   help="climate record window: readings wait in the journal this long")
    p.add_argument("--audio-segment-s", type=float, default=10.0)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args()
    if shutil.which("age") is None:
        print("soak: the age CLI is missing (apt-get install -y age)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="beemond-soak-"))
    ftp = loop = None
    control: dict = {}
    try:
        ident, rcpt, public = crypto.keygen(work / "keys")
        keys = {"identity": ident, "recipient": rcpt, "public": public}
        password = work / "ftp-password"
        password.write_text("soak\n")
        ftp = FtpServer(work / "ftp-root", password).start()
        cfg = make_config(work, keys, password, ftp.port, **{
            "bundle.max_duration_s": 1.5, "sensors.hive_climate.record_window_s": args.record_window_s,
            "sensors.hive_audio.segment_s": args.audio_segment_s,
            # Kills at start-up look like a crash loop to nobody: each start is a new orchestrator.
            "daemon.shutdown_timeout_s": 30})
        spool = work / "spool"
        if args.power_cut:
            loop = LoopSpool(work, spool)
            control = loop.control()
            print("control: " + " ".join(f"{k}={v}" for k, v in control.items()), flush=True)
        expected_records: dict[str, bytes] = {}
        expected_bundles: set[str] = set()
        runs: list[tuple[float, float]] = []
        log = work / "daemon.log"
        for i in range(args.kills):
            offset = log.stat().st_size if log.exists() else 0
            began = time.time()
            proc = start(cfg, log)
            _wait_worker_started(log, offset, proc)
            kill_at = time.monotonic() + rng.uniform(0.5, args.max_gap)
            while time.monotonic() < kill_at:  # what is durable while it runs must survive too
                expected_records.update(staged_records(spool))
                time.sleep(min(0.25, max(0.0, kill_at - time.monotonic())))
            cut = time.time()
            if loop is not None:
                loop.cut(proc.pid)
                proc.wait()
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                # The forkserver and workers are in the killed group too; wait until none holds the spool.
                _wait_group_gone(proc.pid)
            runs.append((began, cut))
            expected_records.update(staged_records(spool))
            expected_bundles.update(b.name for b in outbox_bundles(spool))
        offset = log.stat().st_size if log.exists() else 0
        proc = start(cfg, log)
        _wait_worker_started(log, offset, proc)
        time.sleep(args.final_s)   # counted from the climate worker's start (a loaded machine starts slowly)
        proc.send_signal(signal.SIGTERM)
        final_status = proc.wait(120)

        found: dict[str, list[bytes]] = collections.defaultdict(list)   # member -> copies
        everything: list[tuple[str, bytes, dict, str]] = []
        corrupt, bundles = 0, 0
        places = [*ftp.bundles(), *outbox_bundles(spool)]
        on_server = set(ftp.bundles())
        for bundle in places:
            bundles += 1
            try:
                got = bundle_records(bundle, ident)
            except Exception as e:  # noqa: BLE001 - any failure to read a bundle is the finding
                corrupt += 1
                print(f"corrupt bundle {bundle.name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            for name, data, meta in got:
                found[name].append(data)
                everything.append((name, data, meta, "server" if bundle in on_server else "outbox"))
        for name, data, meta in staged_with_metadata(spool):
            found[name].append(data)
            everything.append((name, data, meta, "staging"))

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
        replay = replay_check(everything)
        audio = audio_loss(everything, runs)
        lost = len(lost_bundles) + len(lost_records) + len(lost_rows) + replay["replay_missing"]
        corrupt += len(invented) + replay["replay_wrong"]
        for what, items in (("bundle", lost_bundles), ("record", lost_records), ("reading", lost_rows),
                            ("invented reading", invented)):
            for item in sorted(items)[:10]:
                print(f"{what} lost or wrong: {item}", file=sys.stderr)
        print(f"final graceful run exited {final_status}; {len(expected_records)} records and "
              f"{len(expected_bundles)} bundles were seen durable; {len(want_rows)} readings checked; "
              f"{len(ftp.bundles())} bundles uploaded, {len(outbox_bundles(spool))} left in the outbox")
        result = {"mode": "power-cut" if loop else "sigkill", "kills": args.kills, "lost": lost,
                  "corrupt": corrupt, "duplicates": duplicates, **replay, **audio, **control,
                  "bundles": bundles, "records": records, "readings": sum(have_rows.values()),
                  "final_status": final_status, "seconds": round(time.monotonic() - t0)}
        print(" ".join(f"{k}={v}" for k, v in result.items()))
        ok = (lost == 0 and corrupt == 0 and final_status == 0 and replay["replay_twice"] == 0
              and audio["audio_cuts_over_2s"] == 0)
        return 0 if ok else 1
    finally:
        if ftp is not None:
            ftp.stop()
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.close()
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
