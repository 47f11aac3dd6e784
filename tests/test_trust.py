"""Bundles a lab can trust: device keys, signed bundles checked by stock OpenSSH and age, tamper
detection, several recipients, and `beemond ingest` into a data tree (idempotent)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyrage
import pytest

from beemond import aggregator, config, ipc, spool
from beemond.bundle import crypto, sealer
from beemond.lab import ingest
from conftest import AGE, FtpServer, climate_rows, decrypt_with_age, make_config, urban_rows, wait_for

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="ssh-keygen (openssh-client) is not installed")
CLI = [sys.executable, "-m", "beemond"]


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def device(tmp_path):
    priv, pub, line = crypto.device_keygen(tmp_path / "device", comment="hive-07")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(pub, trusted / "hive-07.pub")
    return {"key": priv, "pub": pub, "line": line, "trusted": trusted}


def climate_csv(rows: list[tuple[str, float, float]]) -> bytes:
    return ("time,temperature_c,humidity_rh\n" + "".join(f"{t},{a:.2f},{b:.2f}\n" for t, a, b in rows)).encode()


def stage_record(staging: Path, sensor: str, name: str, body: bytes, start: str, end: str) -> sealer.Record:
    meta = {"sensor": sensor, "start": start, "end": end}
    path = spool.write_record(staging / sensor, name, meta, data_writer=lambda f: f.write(body))
    return sealer.Record(path, sensor, f"{sensor}/{name}", len(body), meta)


def seal_one(tmp_path: Path, keys, device, rows, name="c.csv", host="hive-07", outbox=None, signing=True):
    """Seal one climate CSV record of *rows* into a signed bundle; returns its path."""
    staging = tmp_path / "staging"
    rec = stage_record(staging, "hive_climate", name, climate_csv(rows), rows[0][0], rows[-1][0])
    key = crypto.load_signing_key(device["key"]) if signing else None
    path, _m, _n = sealer.seal([rec], outbox or tmp_path / "outbox", crypto.load_recipients([keys["public"]]),
                                   host, "all", signing_key=key)
    return path


ROWS_A = [("2021-06-19T23:58:00.000Z", 30.1, 55.0), ("2021-06-19T23:59:00.000Z", 30.2, 55.1),
          ("2021-06-20T00:00:00.000Z", 30.3, 55.2)]
ROWS_B = [("2021-06-20T00:00:00.000Z", 30.3, 55.2), ("2021-06-20T00:01:00.000Z", 30.4, 55.3)]


# ------------------------------------------------------------------------------------------ device key

@needs_ssh_keygen
def test_device_keygen_cli_files_modes_and_refusal(tmp_path):
    out = tmp_path / "dev"
    first = cli("keygen", "--device", "--out", out)
    assert first.returncode == 0, first.stderr
    priv, pub = out / "device_ed25519", out / "device_ed25519.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    line = pub.read_text().strip()
    assert first.stdout.splitlines()[-1] == line and line.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5")
    # OpenSSH reads both files and agrees on the fingerprint the manifest will carry.
    listed = subprocess.run([SSH_KEYGEN, "-l", "-f", str(pub)], capture_output=True, text=True, check=True).stdout
    derived = subprocess.run([SSH_KEYGEN, "-y", "-f", str(priv)], capture_output=True, text=True, check=True).stdout
    assert derived.split()[:2] == line.split()[:2]
    assert listed.split()[1] == crypto.fingerprint(crypto.load_signing_key(priv).public_key())
    before = priv.read_bytes()
    second = cli("keygen", "--device", "--out", out)
    assert second.returncode == 1 and "refusing to overwrite" in second.stderr
    assert priv.read_bytes() == before


def test_config_signing_key_checked_at_load(tmp_path, keys, password_file, device, monkeypatch):
    ok = config.load(make_config(tmp_path, keys, password_file, 21, **{"bundle.signing_key": str(device["key"])}))
    assert ok.bundle.signing_key_path() == device["key"]
    assert "signed by SHA256:" in config.summary(ok)
    with pytest.raises(config.ConfigError, match=r"bundle\.signing_key: .*not an unencrypted OpenSSH or PEM"):
        config.load(make_config(tmp_path, keys, password_file, 21, **{"bundle.signing_key": str(device["pub"])}))
    with pytest.raises(config.ConfigError, match=r"bundle\.signing_key: cannot read"):
        config.load(make_config(tmp_path, keys, password_file, 21, **{"bundle.signing_key": str(tmp_path / "nope")}))
    # from a systemd credential (LoadCredential=device-key:...), as the upload password
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(device["key"].parent))
    cred = config.load(make_config(tmp_path, keys, password_file, 21,
                                   **{"bundle.signing_key_credential": device["key"].name}))
    assert cred.bundle.signing_key_path() == device["key"]
    with pytest.raises(config.ConfigError, match=r"bundle\.signing_key_credential: set signing_key or"):
        config.load(make_config(tmp_path, keys, password_file, 21, **{
            "bundle.signing_key_credential": "x", "bundle.signing_key": str(device["key"])}))


# ------------------------------------------------------------------------------------------ sealing

@needs_ssh_keygen
def test_signed_bundle_verifies_with_stock_openssh_and_age(tmp_path, keys, device):
    bundle = seal_one(tmp_path, keys, device, ROWS_A)
    sig = bundle.with_name(bundle.name + ".sig")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'hive-07 namespaces="beemond-bundle" {device["line"]}\n')
    with open(bundle, "rb") as f:
        r = subprocess.run([SSH_KEYGEN, "-Y", "verify", "-f", str(allowed), "-I", "hive-07", "-n", "beemond-bundle",
                            "-s", str(sig)], stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'Good "beemond-bundle" signature for hive-07' in r.stdout
    got = decrypt_with_age(bundle, keys["identity"])
    assert got["manifest"]["signing_key"] == crypto.fingerprint(crypto.load_signing_key(device["key"]).public_key())
    v = cli("verify", bundle, "--device-key", device["pub"])
    assert v.returncode == 0 and "good signature by hive-07" in v.stdout, v.stderr
    d = cli("decrypt", bundle, "--identity", keys["identity"], "--out", tmp_path / "dec", "--device-key", device["pub"])
    assert d.returncode == 0, d.stderr
    assert (tmp_path / "dec" / "hive_climate" / "c.csv").read_bytes() == climate_csv(ROWS_A)


def test_signature_is_renamed_into_the_outbox_before_the_bundle(tmp_path, keys, device):
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    arrived: list[str] = []

    class Handler(FileSystemEventHandler):
        def on_moved(self, event):
            arrived.append(Path(event.dest_path).name)

    obs = Observer()
    obs.schedule(Handler(), str(outbox))
    obs.start()
    try:
        bundle = seal_one(tmp_path, keys, device, ROWS_A, outbox=outbox)
        wait_for(lambda: bundle.name in arrived, 10, "the bundle's rename event")
    finally:
        obs.stop()
        obs.join()
    assert arrived == [bundle.name + ".sig", bundle.name]


def test_unsigned_when_no_key_and_ssh_keygen_signatures_are_accepted(tmp_path, keys, device):
    bundle = seal_one(tmp_path, keys, device, ROWS_A, signing=False)
    assert not bundle.with_name(bundle.name + ".sig").exists()
    assert "signing_key" not in decrypt_with_age(bundle, keys["identity"])["manifest"]
    r = cli("verify", bundle, "--device-key", device["trusted"])
    assert r.returncode == 65 and "(unsigned)" in r.stderr
    if SSH_KEYGEN:  # a signature made by stock ssh-keygen over the same file is a valid beemond signature
        subprocess.run([SSH_KEYGEN, "-Y", "sign", "-f", str(device["key"]), "-n", "beemond-bundle", str(bundle)],
                       check=True, capture_output=True, timeout=60)
        assert cli("verify", bundle, "--device-key", device["trusted"]).returncode == 0


# ------------------------------------------------------------------------------------------ tampering

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_signature_byte(sig: Path) -> None:
    lines = sig.read_text().splitlines()
    end = lines.index("-----END SSH SIGNATURE-----")
    blob = bytearray(base64.b64decode("".join(lines[1:end])))
    blob[-1] ^= 0x01  # the last byte of the Ed25519 signature itself
    b64 = base64.b64encode(bytes(blob)).decode()
    sig.write_text("\n".join([lines[0], *(b64[i:i + 76] for i in range(0, len(b64), 76)), *lines[end:]]) + "\n")


def _modify_record_and_reseal(bundle: Path, keys, device) -> None:
    """Change one reading in the tar, re-encrypt it to the recipient with stock age and re-sign it with
    the device's own key (stock ssh-keygen): only the manifest's SHA-256 can catch it."""
    plain = subprocess.run([AGE, "-d", "-i", str(keys["identity"]), str(bundle)], check=True,
                           capture_output=True).stdout
    needle = b"30.20,55.10"
    assert plain.count(needle) == 1
    plain = plain.replace(needle, b"31.20,55.10")  # same length: the tar stays well-formed
    with tarfile.open(fileobj=io.BytesIO(plain)) as t:
        assert "manifest.json" in t.getnames()
    subprocess.run([AGE, "-r", keys["public"], "-o", str(bundle)], input=plain, check=True, capture_output=True)
    bundle.with_name(bundle.name + ".sig").unlink()
    subprocess.run([SSH_KEYGEN, "-Y", "sign", "-f", str(device["key"]), "-n", "beemond-bundle", str(bundle)],
                   check=True, capture_output=True, timeout=60)


def _tamper(kind: str, bundle: Path, keys, device, tmp_path: Path) -> None:
    sig = bundle.with_name(bundle.name + ".sig")
    if kind == "ciphertext":
        _flip(bundle, bundle.stat().st_size // 2)
    elif kind == "signature":
        _flip_signature_byte(sig)
    elif kind == "record":
        _modify_record_and_reseal(bundle, keys, device)
    elif kind == "truncated":
        os.truncate(bundle, bundle.stat().st_size - 100)
    elif kind == "untrusted":
        other, _pub, _line = crypto.device_keygen(tmp_path / "intruder")
        data = bundle.read_bytes()
        sig.write_bytes(crypto.sign_digest(crypto.load_signing_key(other), hashlib.sha512(data).digest(), len(data)))
    elif kind == "unsigned":
        sig.unlink()
    elif kind == "resigned":  # another trusted device signs this device's bundle: the manifest disagrees
        other, other_pub, _line = crypto.device_keygen(tmp_path / "other-device")
        shutil.copy(other_pub, device["trusted"] / "hive-08.pub")
        data = bundle.read_bytes()
        sig.write_bytes(crypto.sign_digest(crypto.load_signing_key(other), hashlib.sha512(data).digest(), len(data)))
    elif kind == "undecryptable":  # signed by the device, but for somebody else's key
        bundle.unlink()
        sig.unlink()
        stranger = str(pyrage.x25519.Identity.generate().to_public())
        fresh = seal_one(tmp_path / "other", {"public": stranger}, device, ROWS_A)
        shutil.move(fresh, bundle)
        shutil.move(fresh.with_name(fresh.name + ".sig"), sig)


# each tampering -> (reason code, words of its message)
TAMPERING = {
    "ciphertext": ("mismatch", "does not match the file: altered after signing"),
    "signature": ("mismatch", "does not match the file"),
    "record": ("manifest", "does not match the manifest"),
    "truncated": ("truncated", "truncated:"),
    "untrusted": ("untrusted", "untrusted device key SHA256:"),
    "unsigned": ("unsigned", "no signature"),
    "resigned": ("signer", "the manifest names signing key"),
    "undecryptable": ("undecryptable", "cannot decrypt"),
}


@pytest.mark.skipif(AGE is None or SSH_KEYGEN is None, reason="needs the stock age and ssh-keygen")
@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampered_bundle_rejected_with_its_own_reason(tmp_path, keys, device, kind):
    upload = tmp_path / "upload" / "hive-07" / "2021-06-19"
    good = seal_one(tmp_path, keys, device, ROWS_B, name="good.csv", outbox=upload)
    bad = seal_one(tmp_path, keys, device, ROWS_A, name="bad.csv", outbox=upload)
    _tamper(kind, bad, keys, device, tmp_path)
    reason, words = TAMPERING[kind]
    out = tmp_path / "data"
    r = cli("ingest", tmp_path / "upload", "--identity", keys["identity"], "--trusted-devices", device["trusted"],
            "--out", out)
    assert r.returncode == 65, r.stdout + r.stderr
    assert f"rejected {bad.name}: " in r.stdout and words in r.stdout, r.stdout
    assert "ingested 1 bundle(s)" in r.stdout
    # Moved aside with its reason; the run went on with the good bundle; nothing of the bad one is in the data.
    assert not bad.exists() and (out / "rejected" / bad.name).exists()
    assert (out / "rejected" / (bad.name + ".reason")).read_text().startswith(f"reason: {reason}\n")
    assert not list(out.rglob("bad.csv"))
    assert (out / "hive-07" / "2021-06-20" / "hive_climate" / "good.csv").exists()
    if kind == "resigned":  # the signature is good; decrypt --device-key refuses on the manifest, leaving nothing
        shutil.move(out / "rejected" / bad.name, bad)
        shutil.move(out / "rejected" / (bad.name + ".sig"), bad.with_name(bad.name + ".sig"))
        assert cli("verify", bad, "--device-key", device["trusted"]).returncode == 0
        d = cli("decrypt", bad, "--identity", keys["identity"], "--out", tmp_path / "dec", "--device-key",
                device["trusted"])
        assert d.returncode == 65 and "the manifest names signing key" in d.stderr, d.stderr
        assert not [p for p in (tmp_path / "dec").rglob("*") if p.is_file()]
    if kind not in ("record", "undecryptable", "unsigned", "resigned"):
        # beemond verify says the same, and decrypt --device-key refuses before decrypting
        shutil.move(out / "rejected" / bad.name, bad)
        if (out / "rejected" / (bad.name + ".sig")).exists():
            shutil.move(out / "rejected" / (bad.name + ".sig"), bad.with_name(bad.name + ".sig"))
        v = cli("verify", bad, "--device-key", device["trusted"])
        assert v.returncode == 65 and f"({reason})" in v.stderr and words in v.stderr, v.stderr
        d = cli("decrypt", bad, "--identity", keys["identity"], "--out", tmp_path / "dec", "--device-key",
                device["pub"])
        assert d.returncode == 65 and "signature check failed" in d.stderr
        assert not list((tmp_path / "dec").rglob("*"))  # nothing published, not even a work directory


# ------------------------------------------------------------------------------------------ ingest

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_merges_days_and_is_idempotent(tmp_path, keys, device):
    upload = tmp_path / "upload"
    seal_one(tmp_path, keys, device, ROWS_A, name="a.csv", outbox=upload / "hive-07" / "2021-06-19")
    seal_one(tmp_path, keys, device, ROWS_B, name="b.csv", outbox=upload / "hive-07" / "2021-06-20")
    out = tmp_path / "data"
    lines: list[str] = []
    report = ingest.run(upload, keys["identity"], device["trusted"], out, print=lines.append)
    assert len(report.ingested) == 2 and not report.rejected and report.records == 2
    day1 = out / "hive-07" / "2021-06-19" / "hive_climate"
    day2 = out / "hive-07" / "2021-06-20" / "hive_climate"
    assert (day1 / "a.csv").read_bytes() == climate_csv(ROWS_A)  # the record as sealed, in its start's day
    meta = json.loads((day1 / "a.csv.meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(climate_csv(ROWS_A)).hexdigest() and meta["signing_key"].startswith("SHA256:")
    # one CSV per host, sensor and day: rows in the day of their own time, sorted, the shared row once
    assert (day1 / "hive-07@2021-06-19.csv").read_text().splitlines() == [
        "time,temperature_c,humidity_rh", "2021-06-19T23:58:00.000Z,30.10,55.00", "2021-06-19T23:59:00.000Z,30.20,55.10"]
    assert (day2 / "hive-07@2021-06-20.csv").read_text().splitlines() == [
        "time,temperature_c,humidity_rh", "2021-06-20T00:00:00.000Z,30.30,55.20", "2021-06-20T00:01:00.000Z,30.40,55.30"]
    assert report.rows == 4
    before = _tree(out)

    again = ingest.run(upload, keys["identity"], device["trusted"], out, print=lines.append)
    assert not again.ingested and len(again.skipped) == 2 and again.rows == 0
    assert _tree(out) == before

    # Even without the ledger (a crash before its commit), a rerun adds no row and no file.
    for p in out.glob(ingest.LEDGER + "*"):
        p.unlink()
    third = ingest.run(upload, keys["identity"], device["trusted"], out, print=lines.append)
    assert len(third.ingested) == 2 and third.rows == 0
    after = _tree(out)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if not k.startswith(ingest.LEDGER) and not k.endswith(".meta.json")} == \
        {k: v for k, v in before.items() if not k.startswith(ingest.LEDGER) and not k.endswith(".meta.json")}


CHATTR = shutil.which("chattr")


@pytest.mark.skipif(CHATTR is None, reason="chattr (e2fsprogs) is not installed")
def test_ingest_goes_on_when_the_upload_tree_is_read_only(tmp_path, keys, device):
    """The lab's ingest user may only read the FTP server's tree: a rejected bundle stays in place,
    is reported with its reason, the good one is ingested; a rerun reports it again from the ledger
    (without reading it) and adds nothing."""
    upload = tmp_path / "upload" / "hive-07"
    good = seal_one(tmp_path, keys, device, ROWS_B, name="good.csv", outbox=upload)
    bad = seal_one(tmp_path, keys, device, ROWS_A, name="bad.csv", outbox=upload)
    bad.with_name(bad.name + ".sig").unlink()
    if subprocess.run([CHATTR, "+i", str(upload)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        out = tmp_path / "data"
        runs = [cli("ingest", tmp_path / "upload", "--identity", keys["identity"], "--trusted-devices",
                    device["trusted"], "--out", out, "-v") for _ in range(2)]
    finally:
        subprocess.run([CHATTR, "-i", str(upload)], check=True)
    assert all(r.returncode == 65 for r in runs), [r.stdout + r.stderr for r in runs]
    assert f"rejected {bad.name}: no signature" in runs[0].stdout and f"{bad.name} left in place" in runs[0].stdout
    assert f"rejected {bad.name}: unsigned (unchanged since an earlier run" in runs[1].stdout, runs[1].stdout
    assert f"ok {good.name}" in runs[0].stdout and f"skip {good.name}" in runs[1].stdout
    assert bad.exists() and good.exists()
    assert sorted(p.name for p in (out / "rejected").iterdir()) == [bad.name + ".reason"]
    assert (out / "rejected" / (bad.name + ".reason")).read_text().startswith("reason: unsigned\n")
    assert (out / "hive-07" / "2021-06-20" / "hive_climate" / "good.csv").exists()


def test_a_second_ingest_on_the_same_data_tree_stops_before_touching_it(tmp_path, keys, device):
    """A cron job overlapping a long run: the second ingest finds the lock held, exits 75 and leaves the
    first run's work directory and the tree alone; once the lock is free the bundle is ingested."""
    import fcntl

    upload, out = tmp_path / "upload", tmp_path / "data"
    seal_one(tmp_path, keys, device, ROWS_A, outbox=upload)
    out.mkdir()
    work = out / ".ingest-inflight"  # the first run's work directory
    work.mkdir()
    args = ("ingest", upload, "--identity", keys["identity"], "--trusted-devices", device["trusted"], "--out", out)
    with open(out / ingest.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = cli(*args)
        assert r.returncode == 75 and "another beemond ingest is running" in r.stderr, r.stdout + r.stderr
        assert work.is_dir() and sorted(p.name for p in out.iterdir()) == sorted([ingest.LOCK, work.name])
    r = cli(*args)
    assert r.returncode == 0 and "ingested 1 bundle(s)" in r.stdout, r.stdout + r.stderr
    assert not work.exists()  # a crashed run's leftovers go once nobody holds the lock


def test_ingest_csv_merge_joins_a_new_column(tmp_path, keys, device):
    upload = tmp_path / "upload"
    seal_one(tmp_path, keys, device, ROWS_B, name="a.csv", outbox=upload)
    staging = tmp_path / "staging"
    body = b"time,temperature_c,humidity_rh,pressure_hpa\n2021-06-20T00:02:00.000Z,30.50,55.40,1013.20\n"
    rec = stage_record(staging, "hive_climate", "p.csv", body, "2021-06-20T00:02:00.000Z", "2021-06-20T00:02:00.000Z")
    sealer.seal([rec], upload, crypto.load_recipients([keys["public"]]), "hive-07", "all",
                    signing_key=crypto.load_signing_key(device["key"]))
    out = tmp_path / "data"
    ingest.run(upload, keys["identity"], device["trusted"], out, print=lambda _: None)
    with open(out / "hive-07" / "2021-06-20" / "hive_climate" / "hive-07@2021-06-20.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["time", "temperature_c", "humidity_rh", "pressure_hpa"],
                    ["2021-06-20T00:00:00.000Z", "30.30", "55.20", ""],
                    ["2021-06-20T00:01:00.000Z", "30.40", "55.30", ""],
                    ["2021-06-20T00:02:00.000Z", "30.50", "55.40", "1013.20"]]


# ------------------------------------------------------------------------------------------ recipients

@pytest.mark.skipif(AGE is None, reason="needs the stock age CLI")
def test_several_recipients_and_a_change_applies_after_restart(tmp_path, keys, password_file, device):
    lab, backup = crypto.keygen(tmp_path / "lab"), crypto.keygen(tmp_path / "backup")
    third = crypto.keygen(tmp_path / "third")
    rfile = tmp_path / "recipients.txt"
    rfile.write_text(f"# lab\n{lab[2]}\n# backup\n{backup[2]}\n")

    def aggregator_for(recipients):
        cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
            "bundle.recipients": recipients, "bundle.signing_key": str(device["key"])}))
        _r, w = multiprocessing.Pipe(duplex=False)
        return aggregator.Aggregator(cfg, ipc.Channel("aggregator", queue.Queue(), w, 1.0))

    def seal_with(a, name):
        stage_record(a.staging, "hive_climate", name, climate_csv(ROWS_A), ROWS_A[0][0], ROWS_A[-1][0])
        a.rescan(final=True)
        a.seal_all(force=True)
        return next(p for p in a.outbox.glob("*.tar.age") if p.stat().st_size and p not in done)

    done: list[Path] = []
    first = seal_with(aggregator_for([str(rfile), third[2]]), "one.csv")
    done.append(first)
    for ident in (lab[0], backup[0], third[0]):  # the stock age CLI decrypts with any one of them
        assert [r["path"] for r in decrypt_with_age(first, ident)["manifest"]["records"]] == ["hive_climate/one.csv"]
    # The recipients change; the restarted aggregator (a reload restarts it) seals for the new list only.
    rfile.write_text(f"{backup[2]}\n")
    second = seal_with(aggregator_for([str(rfile)]), "two.csv")
    decrypt_with_age(second, backup[0])
    for ident in (lab[0], third[0]):
        r = subprocess.run([AGE, "-d", "-i", str(ident), str(second)], capture_output=True)
        assert r.returncode != 0 and b"no identity matched" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(AGE is None, reason="needs the stock age CLI")
def test_edited_recipients_file_applies_to_bundles_sealed_after_sighup(tmp_path, keys, password_file, daemons):
    """The Pi's config names a recipients file; the lab edits only that file and reloads: the config text
    is unchanged, yet every bundle the restarted aggregator seals is for the new recipients only."""
    backup = crypto.keygen(tmp_path / "backup")
    rfile = tmp_path / "recipients.txt"
    rfile.write_text(f"# lab\n{keys['public']}\n")
    cfg = make_config(tmp_path, keys, password_file, 21, **{
        "bundle.recipients": [str(rfile)], "upload.protocol": "none", "sensors.hive_audio.enabled": False,
        "processors": None})
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"aggregator INFO sealed ", timeout=60)
    rfile.write_text(f"# backup only\n{backup[2]}\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"SIGHUP: config \S+ reloaded: restarting aggregator;")
    restarted = d.wait_log(r"started worker aggregator ", count=2)[1].end()
    wait_for(lambda: re.search(r"aggregator INFO sealed ", d.log()[restarted:]), 60, "a bundle sealed after the reload")
    assert d.terminate() == 0, d.log()
    log_text = d.log()
    before = re.findall(r"aggregator INFO sealed (\S+):", log_text[:log_text.index("SIGHUP: config")])
    after = re.findall(r"aggregator INFO sealed (\S+):", log_text[restarted:])
    assert before and after
    outbox = tmp_path / "spool" / "outbox"
    for name in before:
        decrypt_with_age(outbox / name, keys["identity"])
    for name in after:
        decrypt_with_age(outbox / name, backup[0])
        r = subprocess.run([AGE, "-d", "-i", str(keys["identity"]), str(outbox / name)], capture_output=True)
        assert r.returncode != 0 and b"no identity matched" in r.stderr


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.skipif(AGE is None, reason="needs the stock age CLI")
def test_daemon_bundles_round_trip_through_age_and_ingest(tmp_path, keys, password_file, device, daemons):
    ftp = FtpServer(tmp_path / "ftp-root", password_file).start()
    try:
        cfg = make_config(tmp_path, keys, password_file, ftp.port,
                          **{"bundle.signing_key": str(device["key"]), "sensors.hive_audio.enabled": False,
                             "processors": None})  # hive_bands reads the disabled hive_audio
        d = daemons(cfg, tmp_path / "daemon.log")
        d.wait_log(r"aggregator INFO sealed ", count=2, timeout=60)
        assert d.terminate() == 0, d.log()
        wait_for(lambda: ftp.bundles(), 10, "bundles on the server")
    finally:
        ftp.stop()
    bundles = ftp.bundles()
    assert bundles and all(b.with_name(b.name + ".sig").exists() for b in bundles), sorted(ftp.root.rglob("*"))
    rows = []
    for b in bundles:
        rows += climate_rows(decrypt_with_age(b, keys["identity"])["members"])
    out = tmp_path / "data"
    shutil.copy(device["pub"], device["trusted"] / "demo-hive.pub")  # the host the config names
    (device["trusted"] / "hive-07.pub").unlink()
    r = cli("ingest", ftp.root, "--identity", keys["identity"], "--trusted-devices", device["trusted"], "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ingested {len(bundles)} bundle(s)" in r.stdout
    merged = []
    for day in sorted(out.glob("demo-hive/*/hive_climate/demo-hive@*.csv")):
        merged += [tuple(line.split(",")) for line in day.read_text().splitlines()[1:]]
    assert merged == sorted(set(rows)) and len(merged) >= 5
    assert [(t, h) for _, t, h in merged] == urban_rows()[: len(merged)]
    again = cli("ingest", ftp.root, "--identity", keys["identity"], "--trusted-devices", device["trusted"], "--out", out)
    assert again.returncode == 0 and f"{len(bundles)} already ingested" in again.stdout
