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

from beemond import aggregator, archive, crypto
from beemond.lab import ingest
from conftest import AGE

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
        path = archive.write_record(staging / sensor, name, m, data_writer=lambda f, b=body: f.write(b))
        recs.append(aggregator.Record(path, sensor, f"{sensor}/{name}", len(body), m))
    path, _m, _n = aggregator.seal(recs, outbox or lab["upload"] / host, crypto.load_recipients([lab["public"]]),
                                   host, "all", signing_key=lab["devices"][signer or host])
    for r in recs:
        r.path.unlink()
        archive.sidecar_of(r.path).unlink()
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
    if kind == "lying-header":  # a header claiming 1 GiB, followed by 10 KB: more than the bundle can hold
        info = tarfile.TarInfo("s/big.bin")
        info.size = 1 << 30
        tar.write_bytes(info.tobuf(tarfile.PAX_FORMAT) + os.urandom(10_000))
    return tar


HOSTILE = {  # kind: (reason, words in the one-line message)
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
    code = ("import sys, beemond.lab.ingest, beemond.lab.report, beemond.bundle_format; "
            "print(sorted(m for m in sys.modules if m.startswith('beemond')))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for device_side in ("beemond.aggregator", "beemond.sensors", "beemond.upload", "beemond.orchestrator",
                        "beemond.processors", "beemond.ipc"):
        assert f"'{device_side}" not in got, got
