"""beemond.bundle.crypto (age via pyrage) against the stock age CLI, and bundles sealed by the aggregator."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pyrage
import pytest

from beemond import spool
from beemond.bundle import crypto, format as bundle_format, sealer

AGE = shutil.which("age")
AGE_KEYGEN = shutil.which("age-keygen")
needs_age = pytest.mark.skipif(AGE is None, reason="the stock `age` CLI is not installed (apt-get install age)")
# a failed decryption: beemond's own crypto.DecryptError where it exists, else pyrage's
DECRYPT_ERRORS = tuple({pyrage.DecryptError, getattr(crypto, "DecryptError", pyrage.DecryptError)})


@pytest.fixture
def keys(tmp_path: Path):
    ident, rcpt, public = crypto.keygen(tmp_path / "keys")
    return ident, rcpt, public


# ------------------------------------------------------------------------------------------ keygen

def test_keygen_writes_private_identity_and_recipient(keys):
    ident, rcpt, public = keys
    assert ident.name == "identity.txt" and rcpt.name == "recipient.txt"
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    assert public.startswith("age1")
    assert rcpt.read_text() == public + "\n"
    text = ident.read_text()
    assert f"# public key: {public}" in text
    secret = [line for line in text.splitlines() if line.startswith("AGE-SECRET-KEY-1")]
    assert len(secret) == 1
    # the identity belongs to the recipient
    ids = crypto.load_identities(ident)
    assert [str(i.to_public()) for i in ids] == [public]


def test_keygen_refuses_to_overwrite(keys):
    ident, rcpt, public = keys
    before = ident.read_bytes(), rcpt.read_bytes()
    with pytest.raises(FileExistsError):
        crypto.keygen(ident.parent)
    assert (ident.read_bytes(), rcpt.read_bytes()) == before
    assert sorted(p.name for p in ident.parent.iterdir()) == ["identity.txt", "recipient.txt"]


def test_cli_keygen_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "lab"
    first = subprocess.run([sys.executable, "-m", "beemond", "keygen", "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    public = (out / "recipient.txt").read_text().strip()
    assert first.stdout.splitlines()[-1] == public
    second = subprocess.run([sys.executable, "-m", "beemond", "keygen", "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "refusing to overwrite" in second.stderr
    assert (out / "recipient.txt").read_text().strip() == public


# ------------------------------------------------------------------------------------------ age interop

PAYLOAD = os.urandom(200_000) + b"end of a multi-chunk payload"   # > 64 KiB: several STREAM chunks


@needs_age
def test_stock_age_decrypts_our_encryption(tmp_path: Path, keys):
    ident, rcpt, _public = keys
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(PAYLOAD), out, crypto.load_recipients([str(rcpt)]))
    enc = tmp_path / "payload.age"
    enc.write_bytes(out.getvalue())
    assert out.getvalue().startswith(b"age-encryption.org/v1\n")
    r = subprocess.run([AGE, "-d", "-i", str(ident), str(enc)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == PAYLOAD


@needs_age
def test_we_decrypt_stock_age_encryption(tmp_path: Path, keys):
    ident, _rcpt, public = keys
    src, enc = tmp_path / "payload", tmp_path / "payload.age"
    src.write_bytes(PAYLOAD)
    r = subprocess.run([AGE, "-r", public, "-o", str(enc), str(src)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    out = io.BytesIO()
    with open(enc, "rb") as f:
        crypto.decrypt_stream(f, out, crypto.load_identities(ident))
    assert out.getvalue() == PAYLOAD


@pytest.mark.skipif(AGE_KEYGEN is None, reason="the stock `age-keygen` CLI is not installed")
def test_age_keygen_identity_files_load(tmp_path: Path):
    ident = tmp_path / "lab.txt"
    r = subprocess.run([AGE_KEYGEN, "-o", str(ident)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    public = next(line.split(": ", 1)[1] for line in ident.read_text().splitlines() if "public key" in line)
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(b"hello hive"), out, crypto.load_recipients([public]))
    back = io.BytesIO()
    crypto.decrypt_stream(io.BytesIO(out.getvalue()), back, crypto.load_identities(ident))
    assert back.getvalue() == b"hello hive"


def test_wrong_identity_cannot_decrypt(tmp_path: Path, keys):
    _ident, rcpt, _public = keys
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(b"secret"), out, crypto.load_recipients([str(rcpt)]))
    other, _, _ = crypto.keygen(tmp_path / "other")
    with pytest.raises(DECRYPT_ERRORS):
        crypto.decrypt_stream(io.BytesIO(out.getvalue()), io.BytesIO(), crypto.load_identities(other))


def _encrypted_payload(rcpt: Path) -> bytes:
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(PAYLOAD), out, crypto.load_recipients([str(rcpt)]))
    return out.getvalue()


@pytest.mark.parametrize("damage", ["flip-header-byte", "truncated-after-header"])
def test_decrypt_stream_damaged_header_raises_decrypt_error(keys, damage):
    ident, rcpt, _public = keys
    bad = DAMAGE[damage](_encrypted_payload(rcpt))
    with pytest.raises(DECRYPT_ERRORS):
        crypto.decrypt_stream(io.BytesIO(bad), io.BytesIO(), crypto.load_identities(ident))


# pyrage.decrypt_io itself reports a failed payload chunk as a bare OSError("decryption error");
# crypto.decrypt_stream must turn it into a decrypt error like a header failure
@pytest.mark.parametrize("damage", ["flip-first-payload-chunk", "flip-last-byte", "truncated-half"])
def test_decrypt_stream_damaged_payload_raises_decrypt_error(keys, damage):
    ident, rcpt, _public = keys
    bad = DAMAGE[damage](_encrypted_payload(rcpt))
    with pytest.raises(DECRYPT_ERRORS):
        crypto.decrypt_stream(io.BytesIO(bad), io.BytesIO(), crypto.load_identities(ident))


# ------------------------------------------------------------------------------------------ recipients

def _public_keys(n: int) -> list[str]:
    return [str(pyrage.x25519.Identity.generate().to_public()) for _ in range(n)]


def test_load_recipients_file_with_comments(tmp_path: Path):
    a, b = _public_keys(2)
    f = tmp_path / "lab-recipients.txt"
    f.write_text(f"# lab keys\n\n{a}\n   # indented comment\n  {b}  \r\n\n")
    got = crypto.load_recipients([f.name], base=tmp_path)
    assert len(got) == 2
    # mixing a file and an inline key
    c = _public_keys(1)[0]
    assert len(crypto.load_recipients([str(f), c])) == 3
    # both keys of the file became recipients: one X25519 stanza each
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(b"x"), out, got)
    assert out.getvalue().count(b"-> X25519 ") == 2


@pytest.mark.parametrize("content", [
    "hello world\n",
    "age1notakeyatall\n",
    "# only a comment\n\n",
    "",
    "ssh-ed25519 AAAAnot-base64\n",
    "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
], ids=["words", "bad-bech32", "comments-only", "empty", "bad-ssh", "secret-key"])
def test_load_recipients_rejects_garbage_files(tmp_path: Path, content):
    f = tmp_path / "r.txt"
    f.write_text(content)
    with pytest.raises(crypto.RecipientError):
        crypto.load_recipients([str(f)])


@pytest.mark.parametrize("item", ["age1notakeyatall", "ssh-ed25519 AAAA", "no-such-file.txt", "."])
def test_load_recipients_rejects_bad_items(tmp_path: Path, item):
    with pytest.raises(crypto.RecipientError):
        crypto.load_recipients([item], base=tmp_path)


def test_load_recipients_rejects_an_empty_list():
    with pytest.raises(crypto.RecipientError):
        crypto.load_recipients([])


@pytest.mark.parametrize("content", ["", "# no key\n", "AGE-SECRET-KEY-1NOTVALID\n"])
def test_load_identities_rejects_garbage(tmp_path: Path, content):
    f = tmp_path / "id.txt"
    f.write_text(content)
    with pytest.raises(crypto.IdentityError):
        crypto.load_identities(f)
    with pytest.raises(crypto.IdentityError):
        crypto.load_identities(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------ bundles

def make_records(staging: Path) -> list[sealer.Record]:
    """Three records of two sensors, written the way the sensor workers write them."""
    specs = [("hive_climate", "hive_climate_20210619T000458Z_20210619T001458Z.csv",
              b"time,temperature_c,humidity_rh\n2021-06-19T00:04:58.000Z,26.24,35.45\n", "2021-06-19T00:04:58.000Z"),
             ("hive_climate", "hive_climate_20210619T001958Z_20210619T002958Z.csv",
              b"time,temperature_c,humidity_rh\n2021-06-19T00:19:58.000Z,26.01,35.92\n", "2021-06-19T00:19:58.000Z"),
             ("hive_audio", "sub/hive_audio_20210619T000500Z.flac", os.urandom(150_000), "2021-06-19T00:05:00.000Z")]
    records = []
    for sensor, rel, body, start in specs:
        meta = {"sensor": sensor, "start": start, "end": start, "rows": 1}
        path = spool.write_record(staging / sensor, rel, meta, data_writer=lambda f, b=body: f.write(b))
        stored = json.loads(spool.sidecar_of(path).read_bytes())
        records.append(sealer.Record(path, sensor, path.relative_to(staging).as_posix(),
                                         path.stat().st_size, stored))
    return records


@pytest.fixture
def sealed(tmp_path: Path, keys):
    ident, rcpt, _public = keys
    staging = tmp_path / "spool" / "staging"
    records = make_records(staging)
    outbox = tmp_path / "spool" / "outbox"
    outbox.mkdir(parents=True)
    path, manifest, size = sealer.seal(records, outbox, crypto.load_recipients([str(rcpt)]), "test-hive", "all")
    assert size == path.stat().st_size
    return path, manifest, records, crypto.load_identities(ident)


@pytest.mark.parametrize("sizes", [[1000, 1024, 700], [0, 5, 512], [512, 512, 512, 3]])
def test_records_of_whole_tar_blocks_are_all_bundled(tmp_path: Path, keys, sizes):
    """Regression: a record whose size is a multiple of 512 needs no padding; an empty padding chunk
    once read as end of input, sealing a bundle without its later records and manifest."""
    ident, rcpt, _public = keys
    staging = tmp_path / "staging"
    records = []
    for n, size in enumerate(sizes):
        meta = {"start": f"2021-06-19T00:00:0{n}.000Z", "end": f"2021-06-19T00:00:0{n}.000Z"}
        path = spool.write_record(staging / "s", f"r{n}.bin", meta, data_writer=lambda f, k=size: f.write(os.urandom(k)))
        records.append(sealer.Record(path, "s", f"s/r{n}.bin", size, meta))
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    path, manifest, _ = sealer.seal(records, outbox, crypto.load_recipients([str(rcpt)]), "h", "all")
    got = bundle_format.extract_bundle(path, crypto.load_identities(ident), tmp_path / "out")
    assert [r["size"] for r in got["records"]] == sizes
    assert files_under(tmp_path / "out" / "s") == [f"r{n}.bin" for n in range(len(sizes))]


def files_under(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_bundle_round_trip(tmp_path: Path, sealed):
    path, manifest, records, ids = sealed
    assert path.parent.name == "outbox" and spool.BUNDLE_RE.match(path.name)
    assert path.name.startswith("test-hive_20210619T000458Z_all_")
    assert sorted(os.listdir(path.parent)) == [path.name]   # no temp file left in the outbox
    out = tmp_path / "out"
    got = bundle_format.extract_bundle(path, ids, out)
    assert got == manifest
    assert got["format"] == bundle_format.FORMAT and got["host"] == "test-hive"
    assert got["start"] == "2021-06-19T00:04:58.000Z" and got["end"] == "2021-06-19T00:19:58.000Z"
    assert files_under(out) == sorted(["manifest.json", *(r.member for r in records)])
    listed = {e["path"]: e for e in got["records"]}
    assert set(listed) == {r.member for r in records}
    for rec in records:
        data = (out / rec.member).read_bytes()
        assert data == rec.path.read_bytes()
        assert listed[rec.member]["sha256"] == hashlib.sha256(data).hexdigest()
        assert listed[rec.member]["size"] == len(data) == rec.size
        assert listed[rec.member]["sensor"] == rec.sensor
        assert listed[rec.member]["metadata"] == rec.metadata
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not any(p.name.startswith(".beemond-extract-") for p in out.iterdir())


def test_same_records_make_the_same_bundle_name(tmp_path: Path, sealed):
    path, _manifest, records, _ids = sealed
    other = tmp_path / "outbox2"
    other.mkdir()
    again, *_ = sealer.seal(list(reversed(records)), other,
                               crypto.load_recipients([str(tmp_path / "keys" / "recipient.txt")]), "test-hive", "all")
    assert again.name == path.name


@needs_age
def test_bundle_is_plain_age_and_tar(tmp_path: Path, sealed):
    path, manifest, records, _ids = sealed
    r = subprocess.run([AGE, "-d", "-i", str(tmp_path / "keys" / "identity.txt"), str(path)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:") as tar:
        names = tar.getnames()
        assert names[-1] == "manifest.json"
        assert json.loads(tar.extractfile("manifest.json").read()) == manifest
    assert sorted(names[:-1]) == sorted(r.member for r in records)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


DAMAGE = {
    "flip-header-byte": lambda d: _flip(d, 40),
    "flip-first-payload-chunk": lambda d: _flip(d, d.index(b"\n---") + 200),
    "flip-last-byte": lambda d: _flip(d, len(d) - 1),
    "truncated-half": lambda d: d[:len(d) // 2],
    "truncated-last-16": lambda d: d[:-16],
    "truncated-after-header": lambda d: d[:d.index(b"\n---") + 60],
}


@pytest.mark.parametrize("damage", [*DAMAGE, "wrong-identity"])
def test_damaged_bundle_raises_and_extracts_nothing(tmp_path: Path, sealed, damage):
    path, _manifest, _records, ids = sealed
    bad = tmp_path / "bad.tar.age"
    if damage == "wrong-identity":
        bad.write_bytes(path.read_bytes())
        ids = crypto.load_identities(crypto.keygen(tmp_path / "other")[0])
    else:
        bad.write_bytes(DAMAGE[damage](path.read_bytes()))
    out = tmp_path / "out"
    # the decryption failure is the cause, and must not be masked by the tar reader's
    # "empty file" / "unexpected end of data" that follows from it
    with pytest.raises((*DECRYPT_ERRORS, bundle_format.BundleError)):
        bundle_format.extract_bundle(bad, ids, out)
    assert list(out.iterdir()) == [], "nothing may be extracted from a damaged bundle"


def test_cli_decrypt_good_and_damaged_bundle(tmp_path: Path, sealed):
    path, manifest, records, _ids = sealed
    ident = tmp_path / "keys" / "identity.txt"

    def decrypt(bundle: Path, out: Path):
        return subprocess.run([sys.executable, "-m", "beemond", "decrypt", str(bundle), "--identity", str(ident),
                               "--out", str(out)], capture_output=True, text=True, timeout=60)

    ok = decrypt(path, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert f"{len(records)} record(s) from test-hive" in ok.stdout
    assert files_under(tmp_path / "ok") == sorted(["manifest.json", *(r.member for r in records)])
    bad = tmp_path / "bad.tar.age"
    bad.write_bytes(DAMAGE["flip-first-payload-chunk"](path.read_bytes()))
    r = decrypt(bad, tmp_path / "bad")
    assert r.returncode == 65, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert "cannot decrypt" in r.stderr
    assert list((tmp_path / "bad").iterdir()) == []


def _encrypted_tar(tmp_path: Path, members, manifest: dict | None) -> Path:
    """A bundle built by hand (valid age, chosen tar content) to exercise manifest verification.
    *members* is a dict or a list of (name, data) pairs; data ``("symlink", target)`` makes a link."""
    items = list(members.items()) if isinstance(members, dict) else list(members)
    if manifest:
        items.append(("manifest.json", json.dumps(manifest).encode()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(buf.getvalue()), out,
                          crypto.load_recipients([str(tmp_path / "keys" / "recipient.txt")]))
    path = tmp_path / "forged.tar.age"
    path.write_bytes(out.getvalue())
    return path


def _manifest_for(members: dict[str, bytes]) -> dict:
    return {"format": bundle_format.FORMAT, "host": "h", "records": [
        {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in members.items()
        if isinstance(d, bytes)]}


@pytest.mark.parametrize("case", ["hash-mismatch", "missing-member", "extra-member", "no-manifest",
                                  "unsafe-name", "unsafe-name-early-in-a-big-bundle", "symlink-member",
                                  "duplicate-member", "unknown-format"])
def test_bundle_failing_verification_extracts_nothing(tmp_path: Path, keys, case):
    ident = keys[0]
    members = {"s/a.csv": b"a,1\n", "s/b.csv": b"b,2\n"}
    manifest = _manifest_for(members)
    if case == "hash-mismatch":
        members = {**members, "s/b.csv": b"b,3\n"}
    elif case == "missing-member":
        members = {"s/a.csv": members["s/a.csv"]}
    elif case == "extra-member":
        members = {**members, "s/c.csv": b"c\n"}
    elif case == "no-manifest":
        manifest = None
    elif case == "unsafe-name":
        members = {**members, "../escape.csv": b"x\n"}
    elif case == "unsafe-name-early-in-a-big-bundle":
        # the tar reader stops at once while the decrypting thread still has megabytes to write
        members = {"../escape.csv": b"x\n", "s/big.bin": os.urandom(3_000_000), **members}
        manifest = _manifest_for(members)
    elif case == "symlink-member":
        members = {**members, "s/link": ("symlink", "/etc/passwd")}
    elif case == "duplicate-member":
        members = [("s/a.csv", b"a,1\n"), ("s/b.csv", b"b,2\n"), ("s/a.csv", b"a,1\n")]
    elif case == "unknown-format":
        manifest["format"] = "something-else/9"
    bundle = _encrypted_tar(tmp_path, members, manifest)
    out = tmp_path / "out"
    with pytest.raises(bundle_format.BundleError):
        bundle_format.extract_bundle(bundle, crypto.load_identities(ident), out)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "escape.csv").exists()


def test_hand_made_valid_bundle_extracts(tmp_path: Path, keys):
    """Control for the cases above: the same helper with an honest manifest verifies."""
    members = {"s/a.csv": b"a,1\n", "s/b.csv": b"b,2\n"}
    bundle = _encrypted_tar(tmp_path, members, _manifest_for(members))
    out = tmp_path / "out"
    manifest = bundle_format.extract_bundle(bundle, crypto.load_identities(keys[0]), out)
    assert [r["path"] for r in manifest["records"]] == ["s/a.csv", "s/b.csv"]
    assert {m: (out / m).read_bytes() for m in members} == members


def test_the_bundle_package_and_its_format_load_no_pyrage_until_a_bundle_is_read():
    """The names and bounds of the format (FORMAT, MANIFEST, Limits, BundleError) cost no pyrage; the
    package itself imports nothing; reading a bundle is what loads it."""
    code = ("import sys, beemond.bundle, beemond.bundle.format as f; f.Limits(); "
            "print('pyrage' in sys.modules, 'beemond.bundle.crypto' in sys.modules)")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert got == ["False", "False"]
