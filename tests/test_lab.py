"""The lab side at fleet scale: hostile bundles (built with GNU tar and the stock age CLI, signed with the
device's key), the SQLite ledger and incremental runs, --jobs, the host check, gaps, the Parquet mirror
(read back by DuckDB), the progress bar, and the data tree's README."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pty
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from beemond import spool
from beemond.bundle import crypto, sealer
from beemond.lab import ingest
from conftest import AGE, mount_loop_ext4

CLI = [sys.executable, "-m", "beemond"]
TAR = shutil.which("tar")
needs_age = pytest.mark.skipif(AGE is None or TAR is None, reason="needs the stock age CLI and GNU tar")


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lab(tmp_path, keys):
    """A lab: identity, and the trusted-devices directory holding hive-07.pub, hive-08.pub, hive-09.pub."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    devices = {}
    for host in ("hive-07", "hive-08", "hive-09"):
        priv, pub, _line = crypto.device_keygen(tmp_path / "devices" / host, comment=host)
        shutil.copy(pub, trusted / f"{host}.pub")
        devices[host] = crypto.load_signing_key(priv)
    return {"identity": keys["identity"], "public": keys["public"], "recipient": keys["recipient"],
            "trusted": trusted, "devices": devices, "upload": tmp_path / "upload", "out": tmp_path / "data"}


def seal(tmp_path, lab, host, records, signer=None, outbox=None):
    """Seal *records* [(sensor, name, body bytes, start, end, metadata)] as *host*, signed by *signer*'s key
    (default: the host's own). Returns the bundle's path."""
    staging = tmp_path / "staging"
    recs = []
    for sensor, name, body, start, end, meta in records:
        m = {"sensor": sensor, "start": start, "end": end, **meta}
        path = spool.write_record(staging / sensor, name, m, data_writer=lambda f, b=body: f.write(b))
        recs.append(sealer.Record(path, sensor, f"{sensor}/{name}", len(body), m))
    path, _m, _n = sealer.seal(recs, outbox or lab["upload"] / host, crypto.load_recipients([lab["public"]]),
                                   host, "all", signing_key=lab["devices"][signer or host])
    for r in recs:
        r.path.unlink()
        spool.sidecar_of(r.path).unlink()
    return path


def climate(times, temps) -> bytes:
    return ("time,temperature_c,humidity_rh\n" + "".join(f"{t},{v:.2f},55.00\n" for t, v in zip(times, temps))).encode()


def minutes(day: str, hhmm: list[str]) -> list[str]:
    return [f"{day}T{x}:00.000Z" for x in hhmm]


def run_ingest(lab, *extra):
    return cli("ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"],
               "--out", lab["out"], *extra)


def written_bytes(root: Path, skip=("rejected",)) -> int:
    """Disk blocks used under *root* by data files (not the ledger, README, lock or rejected/)."""
    total = 0
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip and not rel.name.startswith((ingest.LEDGER, "README", ".ingest")):
            total += p.stat().st_blocks * 512
    return total


# ------------------------------------------------------------------------------------------ hostile bundles

def _manifest(records: list[dict]) -> bytes:
    return json.dumps({"format": "beemond-bundle/1", "host": "hive-07", "name": "x", "start": "2021-06-19T00:00:00.000Z",
                       "end": "2021-06-19T00:10:00.000Z", "records": records}).encode()


def hostile_tar(kind: str, d: Path) -> Path:
    """The plaintext tar of one hostile bundle (GNU tar for sparse members, tarfile for the rest)."""
    d.mkdir(parents=True)
    tar = d / "bundle.tar"
    if kind in ("sparse-member-gnu", "sparse-member-pax", "sparse-manifest"):
        src = d / "src"
        (src / "s").mkdir(parents=True)
        if kind == "sparse-manifest":
            (src / "s" / "a.csv").write_bytes(b"time,x\n")
            with open(src / "manifest.json", "wb") as f:
                f.truncate(2 << 30)  # 2 GiB of holes
            names = ["s/a.csv", "manifest.json"]
        else:
            with open(src / "s" / "big.bin", "wb") as f:
                f.truncate(1 << 30)  # 1 GiB of holes
            (src / "manifest.json").write_bytes(_manifest([{"path": "s/big.bin", "sensor": "s", "size": 1 << 30,
                                                            "sha256": "0" * 64, "metadata": {}}]))
            names = ["s/big.bin", "manifest.json"]
        fmt = "gnu" if kind == "sparse-member-gnu" else "posix"
        subprocess.run([TAR, "--sparse", f"--format={fmt}", "-cf", str(tar), "-C", str(src), *names], check=True)
        return tar
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if kind == "deep-path":
            name = "s/" + "a/" * 2000 + "x.csv"
            add(name, b"x\n")
            add("manifest.json", _manifest([{"path": name, "sensor": "s", "size": 2,
                                             "sha256": hashlib.sha256(b"x\n").hexdigest(), "metadata": {}}]))
        elif kind == "deep-json":
            add("s/a.csv", b"x\n")
            add("manifest.json", b"[" * 200_000 + b"]" * 200_000)
        elif kind == "over-cap":
            body = os.urandom(300_000)
            add("s/big.bin", body)
            add("manifest.json", _manifest([{"path": "s/big.bin", "sensor": "s", "size": len(body),
                                             "sha256": hashlib.sha256(body).hexdigest(), "metadata": {}}]))
        elif kind in LINKS:  # a member that is no plain file, or names a place outside the bundle's tree
            info = tarfile.TarInfo(LINKS[kind][0])
            info.type, info.linkname = LINKS[kind][1], "/etc/passwd"
            t.addfile(info)
            add("manifest.json", _manifest([]))
        elif kind == "duplicate-member":
            add("s/a.csv", b"x\n")
            add("s/a.csv", b"y\n")
            add("manifest.json", _manifest([]))
        elif kind == "file-and-dir":  # unpacking the second needs the first to be a directory
            add("s/a", b"x\n")
            add("s/a/b.csv", b"y\n")
            add("manifest.json", _manifest([]))
        elif kind == "after-manifest":
            add("manifest.json", _manifest([]))
            add("s/a.csv", b"x\n")
    if kind == "lying-header":  # a header claiming 1 GiB, followed by 10 KB: more than the bundle can hold
        info = tarfile.TarInfo("s/big.bin")
        info.size = 1 << 30
        tar.write_bytes(info.tobuf(tarfile.PAX_FORMAT) + os.urandom(10_000))
    return tar


LINKS = {"symlink": ("s/a.csv", tarfile.SYMTYPE), "hardlink": ("s/a.csv", tarfile.LNKTYPE),
         "device": ("s/a.csv", tarfile.CHRTYPE), "fifo": ("s/a.csv", tarfile.FIFOTYPE),
         "dot-dot": ("s/../../ledger.sqlite", tarfile.REGTYPE), "absolute": ("/tmp/ledger.sqlite", tarfile.REGTYPE),
         "hidden": ("s/.ingest.lock", tarfile.REGTYPE)}

HOSTILE = {  # kind: (reason, words in the one-line message)
    "symlink": ("unsafe", "only plain files"),
    "hardlink": ("unsafe", "only plain files"),
    "device": ("unsafe", "only plain files"),
    "fifo": ("unsafe", "only plain files"),
    "dot-dot": ("unsafe", "unsafe member name"),
    "absolute": ("unsafe", "unsafe member name"),
    "hidden": ("unsafe", "unsafe member name"),
    "duplicate-member": ("manifest", "duplicate member"),
    "after-manifest": ("unsafe", "after the manifest"),
    "file-and-dir": ("unsafe", "both a file and a directory"),
    "sparse-member-gnu": ("unsafe", "only plain files"),
    "sparse-member-pax": ("unsafe", "only plain files"),
    "sparse-manifest": ("unsafe", "only plain files"),
    "deep-path": ("unsafe", "deeper or longer than any record"),
    "deep-json": ("manifest", "manifest.json is not JSON"),
    "over-cap": ("oversize", "limit 200000 each"),
    "lying-header": ("oversize", "more than the bundle can hold"),
}


def forge(kind: str, tmp_path: Path, lab, dest: Path) -> Path:
    """Encrypt the hostile tar with the stock age CLI and sign it with hive-07's key."""
    tar = hostile_tar(kind, tmp_path / "forge" / kind)
    bundle = dest / f"hive-07_20210619T000000Z_{kind}_000000000000.tar.age"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([AGE, "-R", str(lab["recipient"]), "-o", str(bundle), str(tar)], check=True, timeout=60)
    data = bundle.read_bytes()
    sig = crypto.sign_digest(lab["devices"]["hive-07"], hashlib.sha512(data).digest(), len(data))
    bundle.with_name(bundle.name + ".sig").write_bytes(sig)
    return bundle


@needs_age
def test_hostile_bundles_are_rejected_by_decrypt_and_ingest_writing_nothing(tmp_path, lab):
    bundles = {kind: forge(kind, tmp_path, lab, lab["upload"] / "hive-07") for kind in HOSTILE}
    # small files holding 1 and 2 GiB members
    assert all(bundles[k].stat().st_size < 64 * 1024 for k in HOSTILE if k.startswith("sparse"))
    good = seal(tmp_path, lab, "hive-07", [("hive_climate", "c.csv", climate(minutes("2021-06-19", ["00:00", "00:01"]),
                                                                             [30.0, 30.1]), "2021-06-19T00:00:00.000Z",
                                            "2021-06-19T00:01:00.000Z", {})])
    for kind, b in bundles.items():
        reason, words = HOSTILE[kind]
        dec = tmp_path / "dec" / kind
        r = cli("decrypt", b, "--identity", lab["identity"], "--out", dec, "--device-key", lab["trusted"],
                "--max-record-bytes", 200_000)
        assert r.returncode == 65, (kind, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and words in r.stderr, (kind, r.stderr)
        assert f"({reason})" in r.stderr, (kind, r.stderr)
        assert not [p for p in dec.rglob("*") if p.is_file()], kind
    r = run_ingest(lab, "--max-record-bytes", 200_000)
    assert r.returncode == 65 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "ingested 1 bundle(s)" in r.stdout and f"{len(HOSTILE)} rejected" in r.stdout, r.stdout
    for kind, b in bundles.items():
        reason, words = HOSTILE[kind]
        text = (lab["out"] / "rejected" / (b.name + ".reason")).read_text()
        assert text.startswith(f"reason: {reason}\n") and words in text, (kind, text)
    assert (lab["out"] / "hive-07" / "2021-06-19" / "hive_climate" / good.name.replace(good.name, "c.csv")).exists()
    # Only the good bundle's few files were written: no hostile member reached the disk, not even in part.
    assert written_bytes(lab["out"]) < 64 * 1024, sorted(lab["out"].rglob("*"))


# ------------------------------------------------------------------------------------------ ledger, incremental

def test_rerun_reads_no_bundle_and_a_changed_file_is_read_again(tmp_path, lab):
    b1 = seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes("2021-06-19", ["00:00", "00:01"]),
                                                                          [30.0, 30.1]), "2021-06-19T00:00:00.000Z",
                                          "2021-06-19T00:01:00.000Z", {})])
    first = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert len(first.ingested) == 1 and (lab["out"] / ingest.LEDGER).exists()
    # Overwrite the bundle with garbage of the same size and put its mtime back: a rerun that read or
    # hashed it would reject it; the ledger's (path, size, mtime, .sig) says it is known, so it is skipped.
    st = b1.stat()
    b1.write_bytes(os.urandom(st.st_size))
    os.utime(b1, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert len(again.skipped) == 1 and not again.rejected and again.bytes == 0
    # A new mtime: read again, and the altered file is caught.
    os.utime(b1, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert [r[1] for r in third.rejected] == ["mismatch"]


def test_ingested_json_is_migrated_once(tmp_path, lab):
    b = seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes("2021-06-19", ["00:00", "00:01"]),
                                                                         [30.0, 30.1]), "2021-06-19T00:00:00.000Z",
                                         "2021-06-19T00:01:00.000Z", {})])
    digest = hashlib.sha512(b.read_bytes()).hexdigest()
    lab["out"].mkdir()
    (lab["out"] / "ingested.json").write_text(json.dumps({digest: {"name": b.name, "host": "hive-07", "records": 1,
                                                                   "signer": "x", "ingested": "2021-06-20T00:00:00Z"},
                                                          "f" * 128: {"name": "old", "host": "hive-07"}}))
    lines = []
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lines.append)
    assert "ledger: migrated 2 entries from ingested.json" in lines
    assert not report.ingested and report.skipped == [b.name]  # known by its digest from the old ledger
    assert not (lab["out"] / "ingested.json").exists() and (lab["out"] / "ingested.json.migrated").exists()
    led = ingest.Ledger(lab["out"] / ingest.LEDGER)
    assert led.count() == 2 and led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    led.close()


def test_host_must_be_the_trusted_devices_name(tmp_path, lab):
    forged = seal(tmp_path, lab, "hive-08", [("hive_climate", "a.csv", climate(minutes("2021-06-19", ["00:00"]), [1.0]),
                                              "2021-06-19T00:00:00.000Z", "2021-06-19T00:00:00.000Z", {})],
                  signer="hive-07", outbox=lab["upload"] / "hive-07")
    r = run_ingest(lab)
    assert r.returncode == 65 and f"rejected {forged.name}: the manifest says host 'hive-08'" in r.stdout, r.stdout
    assert (lab["out"] / "rejected" / (forged.name + ".reason")).read_text().startswith("reason: host\n")
    assert not (lab["out"] / "hive-08").exists()


def _fleet(tmp_path, lab):
    for i, host in enumerate(("hive-07", "hive-08", "hive-09")):
        for k in range(4):
            hhmm = [f"{10 + k:02d}:{m:02d}" for m in range(0, 10, 2)]
            seal(tmp_path, lab, host, [("hive_climate", f"c{k}.csv", climate(minutes("2021-06-19", hhmm),
                                                                             [20 + i + k / 10 + m / 100 for m in range(5)]),
                                        minutes("2021-06-19", hhmm)[0], minutes("2021-06-19", hhmm)[-1], {})])


def test_jobs_2_gives_the_same_tree_as_jobs_1(tmp_path, lab):
    _fleet(tmp_path, lab)
    one = ingest.run(lab["upload"], lab["identity"], lab["trusted"], tmp_path / "one", print=lambda _: None)
    two = ingest.run(lab["upload"], lab["identity"], lab["trusted"], tmp_path / "two", print=lambda _: None, jobs=2)
    assert len(one.ingested) == len(two.ingested) == 12 and one.rows == two.rows == 60

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and not p.name.startswith((ingest.LEDGER, ".")) and not p.name.endswith(".meta.json")}
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    again = ingest.run(lab["upload"], lab["identity"], lab["trusted"], tmp_path / "two", print=lambda _: None, jobs=2)
    assert len(again.skipped) == 12 and not again.ingested
    # one host per process: each partition holds whole hosts
    items = ingest.scan(lab["upload"], tmp_path / "x", ingest.Ledger(tmp_path / "empty.sqlite"), ingest.Report(),
                        print=lambda _: None)
    parts = ingest.partition(items, 2)
    hosts = [{Path(c.path).parent.name for c in p} for p in parts]
    assert len(parts) == 2 and not hosts[0] & hosts[1]


# ------------------------------------------------------------------------------------------ gaps, README, parquet

def test_gaps_from_metadata_and_from_timestamps(tmp_path, lab):
    times = minutes("2021-06-19", ["00:00", "00:01", "00:02", "00:03", "00:20", "00:21", "00:22"])
    seal(tmp_path, lab, "hive-07", [
        ("hive_climate", "a.csv", climate(times[:4], [30.0, 30.1, 30.2, 30.3]), times[0], times[3], {}),
        ("hive_climate", "b.csv", climate(times[4:], [31.0, 31.1, 31.2]), times[4], times[6],
         {"after_restart": True, "gap_s": 1020})])
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert len(report.ingested) == 1
    gaps = list(csv.reader(open(lab["out"] / "hive-07" / "2021-06-19" / "hive_climate" / "gaps.csv")))
    assert gaps == [["start", "end", "duration_s", "source"],
                    ["2021-06-19T00:03:00.000Z", "2021-06-19T00:20:00.000Z", "1020", "after_restart"],
                    ["2021-06-19T00:03:00.000Z", "2021-06-19T00:20:00.000Z", "1020", "timestamps"]]
    readme = (lab["out"] / "README.md").read_text()
    for words in ("Data and file overview", "Time zone: every time", "UTC", "Licence:", "degrees Celsius", "gaps.csv"):
        assert words in readme


def test_parquet_mirror_read_back_by_duckdb(tmp_path, lab):
    import duckdb  # beemond[lab], in the test extra: scripts/setup installs it
    _fleet(tmp_path, lab)
    r = run_ingest(lab, "--parquet", "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    con = duckdb.connect()
    got = con.execute(f"SELECT host, sensor, CAST(date AS VARCHAR), strftime(time, '%Y-%m-%dT%H:%M:%S.000Z'), "
                      f"temperature_c, humidity_rh FROM read_parquet('{lab['out']}/parquet/**/*.parquet', "
                      f"hive_partitioning=true) ORDER BY host, time").fetchall()
    want = []
    for p in sorted(lab["out"].glob("hive-*/*/hive_climate/hive-*@*.csv")):
        host, date = p.name[:-4].split("@")
        for row in list(csv.reader(open(p)))[1:]:
            want.append((host, "hive_climate", date, row[0], float(row[1]), float(row[2])))
    assert len(want) == 60 and got == sorted(want, key=lambda w: (w[0], w[3]))


def test_progress_bar_on_a_terminal_and_quiet_under_cron(tmp_path, lab):
    _fleet(tmp_path, lab)
    args = [*CLI, "ingest", str(lab["upload"]), "--identity", str(lab["identity"]), "--trusted-devices",
            str(lab["trusted"]), "--out"]
    quiet = subprocess.run([*args, str(tmp_path / "cron")], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    master, slave = pty.openpty()
    p = subprocess.Popen([*args, str(tmp_path / "tty")], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    p.wait(timeout=120)
    os.close(master)
    text = seen.decode()
    assert p.returncode == 0 and "12/12 files" in text and "MB" in text and "files/s" in text and "ETA" in text, text


def test_the_lab_side_imports_no_device_side_worker():
    code = ("import sys, beemond.lab.ingest, beemond.lab.report, beemond.bundle.format; "
            "print(sorted(m for m in sys.modules if m.startswith('beemond')))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for device_side in ("beemond.aggregator", "beemond.sensors", "beemond.upload", "beemond.supervisor",
                        "beemond.processors", "beemond.ipc", "beemond.config", "beemond.records"):
        assert f"'{device_side}" not in got, got
    # Only the bundle package and neutral modules: names, clock, spool (crash-safe writes), errors.
    loaded = {m.strip(" '") for m in got.strip("[]\n").split(",")}
    assert {m for m in loaded if not m.startswith(("beemond.bundle", "beemond.lab"))} <= \
        {"beemond", "beemond.core.names", "beemond.core.clock", "beemond.core", "beemond.core.fsio", "beemond.spool", "beemond.errors"}, loaded


# ------------------------------------------------------------------------------------------ review (issue 15)

def test_a_record_named_like_the_daily_csv_or_gaps_cannot_replace_them(tmp_path, lab):
    day = "2021-06-19"
    seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes(day, ["00:00", "00:01"]), [30.0, 30.1]),
                                     f"{day}T00:00:00.000Z", f"{day}T00:01:00.000Z", {})])
    first = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert len(first.ingested) == 1
    folder = lab["out"] / "hive-07" / day / "hive_climate"
    daily = folder / f"hive-07@{day}.csv"
    before = daily.read_bytes()
    # A trusted device's bundle whose records are named like the lab's own files of that folder.
    for name in (f"hive-07@{day}.csv", "gaps.csv"):
        seal(tmp_path, lab, "hive-07", [("hive_climate", name, b"time,temperature_c\n", f"{day}T00:05:00.000Z",
                                         f"{day}T00:05:00.000Z", {})])
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert sorted(r[1] for r in report.rejected) == ["unsafe", "unsafe"], report.rejected
    assert daily.read_bytes() == before  # the readings of the first bundle are still there
    assert not (folder / "gaps.csv").exists()


def forge_signed(tmp_path, lab, kind: str, members: list[tuple[str, bytes]], manifest: dict) -> Path:
    """A bundle of *members* and *manifest* (with hive-07's signing key named), encrypted with the stock age
    CLI and signed with hive-07's key: what a device that went wrong, or whose key was stolen, could send."""
    d = tmp_path / "forge" / kind
    d.mkdir(parents=True)
    manifest = {**manifest, "signing_key": crypto.fingerprint(lab["devices"]["hive-07"].public_key())}
    with tarfile.open(d / "bundle.tar", "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in [*members, ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    bundle = lab["upload"] / "hive-07" / f"hive-07_20210619T000000Z_{kind}_000000000000.tar.age"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([AGE, "-R", str(lab["recipient"]), "-o", str(bundle), str(d / "bundle.tar")], check=True, timeout=60)
    data = bundle.read_bytes()
    bundle.with_name(bundle.name + ".sig").write_bytes(
        crypto.sign_digest(lab["devices"]["hive-07"], hashlib.sha512(data).digest(), len(data)))
    return bundle


def test_a_manifest_listing_a_record_twice_is_rejected_before_anything_is_published(tmp_path, lab):
    body = climate(minutes("2021-06-19", ["00:00"]), [30.0])
    rec = {"path": "s/a.csv", "sensor": "s", "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
           "start": "2021-06-19T00:00:00.000Z", "metadata": {}}
    forge_signed(tmp_path, lab, "dup", [("s/a.csv", body)], json.loads(_manifest([rec, rec])))
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert [r[1] for r in report.rejected] == ["manifest"], report.rejected
    assert not (lab["out"] / "hive-07").exists()


def test_decrypt_of_a_manifest_without_times_ends_in_its_summary_line(tmp_path, lab):
    body = b"x\n"
    rec = {"path": "s/a.bin", "sensor": "s", "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    b = forge_signed(tmp_path, lab, "no-times", [("s/a.bin", body)],
                     {"format": "beemond-bundle/1", "host": "hive-07", "records": [rec]})
    r = cli("decrypt", b, "--identity", lab["identity"], "--out", tmp_path / "dec", "--device-key", lab["trusted"])
    assert r.returncode == 0 and "1 record(s) from hive-07" in r.stdout and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "dec" / "s" / "a.bin").read_bytes() == body


def test_a_bundle_that_is_no_regular_file_is_rejected_without_hanging(tmp_path, lab):
    # Anyone who may upload can copy a device's public .sig beside a symlink to /dev/zero or a FIFO:
    # reading either never ends (or never starts).
    good = seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes("2021-06-19", ["00:00"]), [30.0]),
                                            "2021-06-19T00:00:00.000Z", "2021-06-19T00:00:00.000Z", {})],
                outbox=tmp_path / "elsewhere")
    folder = lab["upload"] / "hive-07"
    folder.mkdir(parents=True)
    zero, fifo = folder / "hive-07_a_zero.tar.age", folder / "hive-07_b_fifo.tar.age"
    zero.symlink_to("/dev/zero")
    os.mkfifo(fifo)
    for b in (zero, fifo):
        sig = good.with_name(good.name + ".sig").read_text()
        b.with_name(b.name + ".sig").write_text(sig.split("Size:")[0])  # the size line is not signed
        r = cli("decrypt", b, "--identity", lab["identity"], "--out", tmp_path / "dec", "--device-key", lab["trusted"],
                timeout=30)
        assert r.returncode == 65 and "(unsafe)" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_ingest(lab)
    assert r.returncode == 65 and "2 rejected" in r.stdout, r.stdout + r.stderr
    for b in (zero, fifo):
        assert (lab["out"] / "rejected" / (b.name + ".reason")).read_text().startswith("reason: unsafe\n")


def test_jobs_keep_a_host_with_two_keys_in_one_process(tmp_path, lab):
    # A device whose key was replaced: hive-07.pub holds the old key and the new one, and the upload
    # tree bundles signed by each. Both write hive-07's daily CSV, so both belong to one process.
    priv, pub, line = crypto.device_keygen(tmp_path / "devices" / "hive-07-new", comment="hive-07")
    with open(lab["trusted"] / "hive-07.pub", "a") as f:
        f.write(line + "\n")
    old, lab["devices"]["hive-07"] = lab["devices"]["hive-07"], crypto.load_signing_key(priv)
    for k, key in enumerate((old, lab["devices"]["hive-07"])):
        lab["devices"]["hive-07"] = key
        for n in range(2):
            hhmm = [f"{10 + 2 * k + n:02d}:00"]
            seal(tmp_path, lab, "hive-07", [("hive_climate", f"c{k}{n}.csv", climate(minutes("2021-06-19", hhmm), [20.0]),
                                             minutes("2021-06-19", hhmm)[0], minutes("2021-06-19", hhmm)[0], {})])
    items = ingest.scan(lab["upload"], tmp_path / "x", ingest.Ledger(tmp_path / "empty.sqlite"), ingest.Report(),
                        print=lambda _: None)
    assert len(items) == 4
    parts = ingest.partition(items, 2, ingest.device_names(lab["trusted"]))
    assert len(parts) == 1, [[Path(c.path).name for c in p] for p in parts]
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None, jobs=2)
    assert len(report.ingested) == 4 and report.rows == 4, report


@pytest.fixture
def cut_disk(tmp_path):
    """An ext4 image on a loop device where unsynced data and metadata stay in the page cache
    (TESTBED.md, power cuts). Yields (mount point, cut): ``cut()`` keeps only what reached the image
    (after a journal commit forced by an unrelated fsync, as any other writer on the disk would cause),
    then fsck and mount again."""
    opts = "loop,data=writeback,noauto_da_alloc,commit=60"
    img, mnt = mount_loop_ext4(tmp_path, 64, opts)

    def cut():
        other = mnt / "other"
        with open(other, "wb") as f:
            f.write(b"x")
            os.fsync(f.fileno())
        subprocess.run(["cp", "--sparse=always", str(img), str(img) + ".cut"], check=True)
        subprocess.run(["umount", str(mnt)], check=True)
        os.replace(str(img) + ".cut", img)
        subprocess.run(["e2fsck", "-p", "-f", str(img)], capture_output=True)
        subprocess.run(["mount", "-o", opts, str(img), str(mnt)], check=True)

    yield mnt, cut
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup)")
def test_a_power_cut_before_the_batch_is_synced_loses_no_earlier_reading(tmp_path, lab, cut_disk):
    mnt, cut = cut_disk
    lab["out"] = mnt / "data"
    day = "2021-06-19"
    seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes(day, ["00:00", "00:01"]), [30.0, 30.1]),
                                     f"{day}T00:00:00.000Z", f"{day}T00:01:00.000Z", {})])
    assert run_ingest(lab).returncode == 0
    subprocess.run(["sync"], check=True)  # the first run is on the disk, ledger included
    seal(tmp_path, lab, "hive-07", [("hive_climate", "b.csv", climate(minutes(day, ["00:02"]), [30.2]),
                                     f"{day}T00:02:00.000Z", f"{day}T00:02:00.000Z", {})])
    # The power goes as the second run asks for its batch to be made durable (its first sync()).
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=sync",
                        "-e", "inject=sync:signal=SIGKILL:error=ENOSYS", *CLI, "ingest", str(lab["upload"]),
                        "--identity", str(lab["identity"]), "--trusted-devices", str(lab["trusted"]),
                        "--out", str(lab["out"])], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    cut()
    assert run_ingest(lab).returncode == 0
    rows = list(csv.reader(open(lab["out"] / "hive-07" / day / "hive_climate" / f"hive-07@{day}.csv")))
    assert [row[0] for row in rows] == ["time", *minutes(day, ["00:00", "00:01", "00:02"])], rows


def test_decrypt_onto_a_full_disk_ends_in_one_line_not_a_traceback(tmp_path, lab):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    body = os.urandom(600_000)
    b = seal(tmp_path, lab, "hive-07", [("mic", "a.bin", body, "2021-06-19T00:00:00.000Z", "2021-06-19T00:00:10.000Z", {})])
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], check=True)
    try:
        r = cli("decrypt", b, "--identity", lab["identity"], "--out", full / "out", "--device-key", lab["trusted"])
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert "No space left on device" in r.stderr, r.stderr
        assert not [p for p in (full / "out").rglob("*")]  # the partial record went with the work directory
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_bundle_with_odd_fields_or_an_unreadable_csv_does_not_stop_the_run(tmp_path, lab):
    day = "2021-06-19"
    good = seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes(day, ["00:00"]), [30.0]),
                                            f"{day}T00:00:00.000Z", f"{day}T00:00:00.000Z", {})])
    # a start that is no string: the bundle's own start dates it
    odd = seal(tmp_path, lab, "hive-07", [("hive_climate", "b.csv", climate(minutes(day, ["00:01"]), [30.1]),
                                           None, None, {"gap_s": 60})])
    far = seal(tmp_path, lab, "hive-07", [("hive_climate", "c.csv", b"time,temperature_c,humidity_rh\n",  # a gap
                                           f"{day}T00:01:00.000Z", f"{day}T00:01:00.000Z", {"gap_s": 1e20})])  # < year 1
    bad = {kind: seal(tmp_path, lab, "hive-08", [("hive_climate", f"{kind}.csv", body, f"{day}T00:02:00.000Z",
                                                  f"{day}T00:02:00.000Z", {})])
           for kind, body in (("latin1", "time,t\n2021-06-19T00:02:00.000Z,\xe9\n".encode("latin-1")),
                              ("huge-field", b"time,t\n2021-06-19T00:02:00.000Z," + b"9" * 200_000 + b"\n"))}
    r = run_ingest(lab)
    assert r.returncode == 65 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "ingested 3 bundle(s)" in r.stdout and "2 rejected" in r.stdout, r.stdout
    rows = list(csv.reader(open(lab["out"] / "hive-07" / day / "hive_climate" / f"hive-07@{day}.csv")))
    assert [row[0] for row in rows[1:]] == minutes(day, ["00:00", "00:01"]), (good, odd, far, rows)
    for b in bad.values():
        assert (lab["out"] / "rejected" / (b.name + ".reason")).read_text().startswith("reason: csv\n")
    assert not (lab["out"] / "hive-08").exists()  # nothing of a rejected bundle is published


def test_parquet_mirror_of_a_column_that_turns_to_text_late_in_the_day(tmp_path, lab):
    import duckdb
    day = "2021-06-19"
    times = [f"{day}T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z" for i in range(21_001)]
    body = "time,state\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times[:-1])) + f"{times[-1]},swarming\n"
    seal(tmp_path, lab, "hive-07", [("hive_state", "s.csv", body.encode(), times[0], times[-1], {})])
    r = run_ingest(lab, "--parquet")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    got = duckdb.connect().execute(f"SELECT count(*), max(CASE WHEN state = 'swarming' THEN 1 ELSE 0 END) FROM "
                                   f"read_parquet('{lab['out']}/parquet/**/*.parquet')").fetchone()
    assert got == (21_001, 1)


def test_a_signature_that_is_no_regular_file_is_rejected_without_hanging(tmp_path, lab):
    import resource

    def capped():  # a regression would read /dev/zero into memory: fail with MemoryError, not take the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    folder = lab["upload"] / "hive-07"
    bundles = []
    for kind in ("zero", "fifo"):
        b = seal(tmp_path, lab, "hive-07", [("hive_climate", f"{kind}.csv", climate(minutes("2021-06-19", ["00:00"]),
                                                                                   [30.0]),
                                             "2021-06-19T00:00:00.000Z", "2021-06-19T00:00:00.000Z", {})])
        sig = b.with_name(b.name + ".sig")
        sig.unlink()
        sig.symlink_to("/dev/zero") if kind == "zero" else os.mkfifo(sig)
        bundles.append(b)
        r = subprocess.run([*CLI, "decrypt", str(b), "--identity", str(lab["identity"]), "--out", str(tmp_path / "dec"),
                            "--device-key", str(lab["trusted"])], capture_output=True, text=True, timeout=30,
                           preexec_fn=capped)
        assert r.returncode == 65 and "(malformed)" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = subprocess.run([*CLI, "ingest", str(lab["upload"]), "--identity", str(lab["identity"]), "--trusted-devices",
                        str(lab["trusted"]), "--out", str(lab["out"])], capture_output=True, text=True, timeout=30,
                       preexec_fn=capped)
    assert r.returncode == 65 and "2 rejected" in r.stdout, r.stdout + r.stderr
    assert folder.exists()


def test_a_bundle_gone_or_dangling_during_the_scan_does_not_stop_the_run(tmp_path, lab):
    good = seal(tmp_path, lab, "hive-07", [("hive_climate", "a.csv", climate(minutes("2021-06-19", ["00:00"]), [30.0]),
                                            "2021-06-19T00:00:00.000Z", "2021-06-19T00:00:00.000Z", {})])
    (good.parent / "hive-07_0_gone.tar.age").symlink_to(tmp_path / "nowhere")  # as if removed after the listing
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert report.ingested == [good.name]


def test_a_record_name_seen_before_with_other_content_keeps_both_records(tmp_path, lab):
    # After the device's clock stepped back (NTP), a new record can get the name of one ingested before.
    day = "2021-06-19"
    first, second = b"RIFF first recording", b"RIFF second recording, another hour"
    for body in (first, second):
        seal(tmp_path, lab, "hive-07", [("mic", "r.wav", body, f"{day}T10:00:00.000Z", f"{day}T10:01:00.000Z", {})])
        report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
        assert len(report.ingested) == 1
    folder = lab["out"] / "hive-07" / day / "mic"
    records = sorted(p for p in folder.iterdir() if not p.name.endswith(spool.META_SUFFIX))
    assert sorted(p.read_bytes() for p in records) == sorted([first, second]), records
    for p in records:  # each beside its own manifest entry
        assert json.loads(spool.sidecar_of(p).read_text())["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    # a rerun over the same bundles (the ledger lost) adds no third copy
    (lab["out"] / ingest.LEDGER).unlink()
    for p in lab["out"].glob(ingest.LEDGER + "-*"):
        p.unlink()
    ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert len(list(folder.iterdir())) == 4


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup)")
def test_jobs_killed_before_their_commit_fail_the_run_and_the_next_run_completes_it(tmp_path, lab):
    _fleet(tmp_path, lab)
    # Each job process is killed as it asks for its first batch to be made durable (CSVs written, no commit).
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=sync",
                        "-e", "inject=sync:signal=SIGKILL:error=ENOSYS", *CLI, "ingest", str(lab["upload"]),
                        "--identity", str(lab["identity"]), "--trusted-devices", str(lab["trusted"]),
                        "--out", str(lab["out"]), "--jobs", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ingest job(s) failed" in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
    again = run_ingest(lab, "--jobs", "2")
    assert again.returncode == 0 and "ingested 12 bundle(s)" in again.stdout, again.stdout + again.stderr
    for daily in lab["out"].glob("hive-*/*/hive_climate/hive-*@*.csv"):
        rows = list(csv.reader(open(daily)))[1:]
        assert len(rows) == 20 and len(set(map(tuple, rows))) == 20, daily
    third = run_ingest(lab, "--jobs", "2")
    assert "ingested 0 bundle(s)" in third.stdout and "12 already ingested" in third.stdout, third.stdout


def test_a_record_whose_folder_is_an_earlier_record_is_rejected_before_anything_is_published(tmp_path, lab):
    day = "2021-06-19"
    seal(tmp_path, lab, "hive-07", [("s", "a", b"x\n", f"{day}T00:00:00.000Z", f"{day}T00:00:00.000Z", {})])
    assert len(ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None).ingested) == 1
    body = climate(minutes(day, ["00:05"]), [30.0])
    b = forge_signed(tmp_path, lab, "through-a-file", [("s/b.csv", body), ("s/a/c.bin", b"y\n")],
                     json.loads(_manifest([{"path": "s/b.csv", "sensor": "s", "size": len(body), "start": f"{day}T00:05:00.000Z",
                                            "sha256": hashlib.sha256(body).hexdigest(), "metadata": {}},
                                           {"path": "s/a/c.bin", "sensor": "s", "size": 2, "start": f"{day}T00:05:00.000Z",
                                            "sha256": hashlib.sha256(b"y\n").hexdigest(), "metadata": {}}])))
    report = ingest.run(lab["upload"], lab["identity"], lab["trusted"], lab["out"], print=lambda _: None)
    assert [r[:2] for r in report.rejected] == [(b.name, "unsafe")], report.rejected
    assert not (lab["out"] / "hive-07" / day / "s" / "b.csv").exists()
