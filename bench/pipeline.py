"""Bundle+encrypt throughput: beemond's sealing code next to the stock ``age`` CLI.

What is measured
  ours: ``beemond.sealer.seal()`` on N staged records of random bytes (default 20 x 10 MB) written
        with ``beemond.spool.write_record`` into ``staging/<sensor>/<name>`` + sidecar. One call reads
        every record once, SHA-256s it, streams the tar (+ manifest) through pyrage into the outbox,
        fsyncs the bundle, renames it and fsyncs the directory.
  age:  ``age -r RECIPIENT -o OUT TAR`` (Debian's /usr/bin/age) on a plain uncompressed tar of the same
        records, built beforehand (not timed), followed by an fsync of OUT (timed separately, so the
        durability cost matches ours; age alone is printed as well).
Both read warm records (one warm-up read of every record and of the tar before timing); runs
alternate ours/age, each after an ``os.sync()`` so that neither pays for the other's dirty pages.
MB = 1e6 bytes of record data for both. The median of --repeat runs is reported, and the ratio ours/age.
  pyrage ceiling: ``pyrage.encrypt_io`` of the same tar from memory into a file, fsynced: the best any
        design on pyrage can do, to tell our pipeline's cost from the library's.
Once, the stock ``age -d -i identity.txt`` decrypts our bundle and ``tar -t`` must list every record
plus manifest.json.

Reproduce (from the repo root):  .venv/bin/python bench/pipeline.py [--mb 200] [--repeat 5]
Exit 2 if /usr/bin/age is missing (``apt-get install -y age``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyrage

from beemond.core import clock, names
from beemond.bundle import crypto, format as bundle_format, sealer
from beemond.spool import Spool, write_record

AGE = shutil.which("age") or "/usr/bin/age"
FILE_MB = 10
SENSORS = ("mic_a", "mic_b")


def make_records(staging: Path, total_mb: int) -> list[sealer.Record]:
    n = max(1, round(total_mb / FILE_MB))
    t0 = datetime(2021, 6, 19, tzinfo=timezone.utc)
    records = []
    for i in range(n):
        sensor = SENSORS[i % len(SENSORS)]
        start, end = t0 + timedelta(seconds=60 * i), t0 + timedelta(seconds=60 * (i + 1))
        name = f"{sensor}_{names.utc_stamp(start)}_{names.utc_stamp(end)}.bin"
        meta = {"sensor": sensor, "start": clock.utc_iso(start), "end": clock.utc_iso(end), "bench": True}

        def writer(f):
            for _ in range(FILE_MB):
                f.write(os.urandom(1_000_000))

        path = write_record(staging / sensor, name, meta, data_writer=writer)
        records.append(sealer.Record(path, sensor, f"{sensor}/{name}", path.stat().st_size, meta))
    return records


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=200, help="MB of record data (files of 10 MB)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if not os.access(AGE, os.X_OK):
        print(f"stock age CLI not found at {AGE}: apt-get install -y age", file=sys.stderr)
        return 2
    age_version = subprocess.run([AGE, "--version"], capture_output=True, text=True).stdout.strip()

    tmp = Path(tempfile.mkdtemp(prefix="beemond-bench-pipeline-"))
    try:
        identity = pyrage.x25519.Identity.generate()
        public = str(identity.to_public())
        (tmp / "identity.txt").write_text(f"{identity}\n")
        recipients = crypto.load_recipients([public])
        staging, outbox = Spool(tmp).staging, Spool(tmp).outbox
        outbox.mkdir()

        t = time.monotonic()
        records = make_records(staging, args.mb)
        data_bytes = sum(r.size for r in records)
        mb = data_bytes / 1e6
        print(f"records: {len(records)} x {FILE_MB} MB = {mb:.0f} MB in {tmp} ({time.monotonic() - t:.1f} s to write)")

        plain_tar = tmp / "plain.tar"
        with tarfile.open(plain_tar, "w", format=tarfile.PAX_FORMAT) as tar:
            for r in records:
                tar.add(r.path, arcname=r.member)
        print(f"plain tar for age: {plain_tar.stat().st_size / 1e6:.1f} MB; {age_version and 'age ' + age_version}")

        warm([r.path for r in records] + [plain_tar])

        ours, theirs, theirs_nosync, ceiling = [], [], [], []
        plain = plain_tar.read_bytes()  # for pyrage's own ceiling: the tar already in memory
        ceiling_out = tmp / "ceiling.age"
        age_out = tmp / "plain.tar.age"
        for i in range(args.repeat):  # interleaved, each run after os.sync(): no one pays the other's writeback
            for old in outbox.iterdir():
                old.unlink()
            os.sync()
            t = time.perf_counter()
            bundle, manifest, _size = sealer.seal(records, outbox, recipients, "bench-hive", "all")
            dt = time.perf_counter() - t
            ours.append(dt)
            print(f"ours  run {i + 1}: {dt:6.2f} s  {mb / dt:7.1f} MB/s  ({bundle.stat().st_size / 1e6:.1f} MB bundle)")

            age_out.unlink(missing_ok=True)
            os.sync()
            t = time.perf_counter()
            subprocess.run([AGE, "-r", public, "-o", str(age_out), str(plain_tar)], check=True)
            t_age = time.perf_counter() - t
            fsync_file(age_out)
            dt = time.perf_counter() - t
            theirs.append(dt)
            theirs_nosync.append(t_age)
            print(f"age   run {i + 1}: {dt:6.2f} s  {mb / dt:7.1f} MB/s  (age alone {t_age:.2f} s, "
                  f"{mb / t_age:.1f} MB/s; fsync {dt - t_age:.2f} s)")

            # pyrage's ceiling: encrypt_io from memory to a file, fsynced; no tar, no hashing, no reads.
            ceiling_out.unlink(missing_ok=True)
            os.sync()
            t = time.perf_counter()
            with open(ceiling_out, "wb", buffering=0) as f:
                pyrage.encrypt_io(io.BytesIO(plain), f, recipients)
                os.fsync(f.fileno())
            dt = time.perf_counter() - t
            ceiling.append(dt)
            print(f"pyrage ceiling run {i + 1}: {dt:6.2f} s  {mb / dt:7.1f} MB/s")

        # Correctness, once: the stock CLI decrypts our bundle and tar lists every member.
        out_tar = tmp / "decrypted.tar"
        subprocess.run([AGE, "-d", "-i", str(tmp / "identity.txt"), "-o", str(out_tar), str(bundle)], check=True)
        listed = subprocess.run(["tar", "-tf", str(out_tar)], check=True, capture_output=True, text=True).stdout.split()
        expected = sorted([r.member for r in records] + [bundle_format.MANIFEST])
        ok = sorted(listed) == expected and len(manifest["records"]) == len(records)
        print(f"verify: age -d of our bundle + tar -t lists {len(listed)} member(s): {'OK' if ok else 'MISMATCH'}")
        if not ok:
            print(f"expected {expected}\ngot {sorted(listed)}", file=sys.stderr)
            return 1

        ours_mb_s = mb / statistics.median(ours)
        age_mb_s = mb / statistics.median(theirs)
        age_nosync_mb_s = mb / statistics.median(theirs_nosync)
        ceiling_mb_s = mb / statistics.median(ceiling)
        print(f"median: ours {ours_mb_s:.1f} MB/s, age {age_mb_s:.1f} MB/s (without fsync {age_nosync_mb_s:.1f} MB/s), "
              f"pyrage alone {ceiling_mb_s:.1f} MB/s")
        print(f"records_mb={mb:.0f} ours_mb_s={ours_mb_s:.1f} age_mb_s={age_mb_s:.1f} "
              f"age_nofsync_mb_s={age_nosync_mb_s:.1f} pyrage_ceiling_mb_s={ceiling_mb_s:.1f} "
              f"ratio_vs_pyrage_ceiling={ours_mb_s / ceiling_mb_s:.2f} encrypt_ratio_vs_age={ours_mb_s / age_mb_s:.2f}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
