"""beemond.spool: the one owner of the spool's layout, locks, names, bundle listing and usage."""

from __future__ import annotations

import ast
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beemond import spool as spool_mod
from beemond.core import fsio
from beemond.spool import BUNDLE_RE, LOCK, WORKERS_LOCK, Spool, SpoolBusy
from conftest import ROOT

NAMES = {spool_mod.TELEMETRY, spool_mod.STAGING, spool_mod.STATE, spool_mod.OUTBOX, spool_mod.UPLOADED, spool_mod.QUARANTINE,
         spool_mod.FAILED, spool_mod.PROCESSING}
PATH_CALLS = {"Path", "PurePath", "PurePosixPath", "join", "joinpath", "glob", "rglob", "with_name", "open",
              "mkdir", "makedirs", "listdir", "scandir", "walk"}


def _spool_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that build a path to a spool directory: an operand of ``/``, an argument of a
    path call (``Path(..)``, ``os.path.join``, ``joinpath``, ...), or a relative path starting with one
    (``"outbox/x"``, also inside an f-string). Worker states ("failed"), event kinds ("outbox") and
    status keys ("uploaded") are not paths and pass."""
    found = []

    def name_of(s: str) -> str | None:
        head = s.split("/", 1)[0]
        return head if head in NAMES and (s == head or s.startswith(head + "/")) else None

    def flag(node, why):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and name_of(node.value):
            found.append((node.lineno, f"{why}: {node.value!r}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            flag(node.left, "path /")
            flag(node.right, "path /")
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in PATH_CALLS:
                for arg in node.args:
                    flag(arg, f"{called}()")
        elif isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and "/" in part.value \
                        and name_of(part.value.lstrip("/")):
                    found.append((node.lineno, f"f-string path: {part.value!r}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
            flag(node, "relative path")
    return found


def test_no_module_but_spool_spells_a_spool_directory():
    offenders = []
    for path in sorted([*(ROOT / "beemond").rglob("*.py"), *(ROOT / "bench").glob("*.py")]):
        if path.name == "spool.py" and path.parent.name == "beemond":
            continue
        for line, what in _spool_literals(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "spool directory names belong to beemond/spool.py:\n" + "\n".join(offenders)


def test_the_scan_catches_what_it_looks_for():
    """The scan itself must be able to fail: each way of spelling a spool path is found."""
    code = '''
p = Path(cfg.spool) / "outbox"
q = os.path.join(root, "staging", name)
r = spool.joinpath("quarantine")
s = root / "failed/hive"
t = f"{root}/processing/{name}"
ok = w.state in ("failed", "stopped")
kind = "outbox"
'''
    hits = _spool_literals(ast.parse(code))
    assert sorted({line for line, _ in hits}) == [2, 3, 4, 5, 6], hits


def test_layout(tmp_path):
    s = Spool(tmp_path)
    assert s.staging == tmp_path / "staging" and s.staging_dir("hive_audio") == tmp_path / "staging" / "hive_audio"
    assert s.outbox == tmp_path / "outbox" and s.uploaded == tmp_path / "uploaded"
    assert s.quarantine == tmp_path / "quarantine"
    assert s.failed_dir() == tmp_path / "failed" and s.failed_dir("swarm") == tmp_path / "failed" / "swarm"
    assert s.processing_dir("bands") == tmp_path / "processing" / "bands"
    assert s.state_dir("hive_climate") == tmp_path / "state" / "hive_climate"
    assert s.journal_path("hive_climate").parent == s.state_dir("hive_climate")
    assert s.telemetry == tmp_path / "telemetry"
    assert list(tmp_path.iterdir()) == [], "building a Spool and asking for paths creates nothing"


def test_import_is_light():
    """The orchestrator imports it: no jinja2, pyrage, numpy or watchdog come along."""
    code = ("import sys, beemond.spool; heavy = [m for m in ('jinja2', 'pyrage', 'numpy', 'watchdog', 'beemond.records') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def _bundle(directory: Path, stamp: str, digest: str, mtime: float | None = None, sig: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / spool_mod.bundle_filename("hive", stamp, "all", digest)
    p.write_bytes(b"x" * 100)
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    if sig:
        spool_mod.signature_of(p).write_bytes(b"s")
    return p


def test_bundles_oldest_first_signatures_and_strangers_left_out(tmp_path):
    s = Spool(tmp_path)
    assert s.bundles() == [], "no outbox yet: no bundles"
    now = time.time()
    late = _bundle(s.outbox, "20210619T001000Z", "a" * 12, sig=True)
    twin_new = _bundle(s.outbox, "20210619T000000Z", "b" * 12, mtime=now)
    twin_old = _bundle(s.outbox, "20210619T000000Z", "c" * 12, mtime=now - 60)
    (s.outbox / ".hive_x.tar.age.tmp-12").write_bytes(b"")
    (s.outbox / "notes.txt").write_text("a human's")
    assert s.bundles() == [twin_old, twin_new, late], "by start in the name, then by the time sealed"
    assert spool_mod.signature_of(late).exists() and spool_mod.signature_of(late).name == late.name + ".sig"
    assert s.bundles(s.uploaded) == []


def test_bundle_filename_matches_the_pattern():
    name = spool_mod.bundle_filename("demo-hive", "20210619T000458Z", "hive_audio", "0123456789ab")
    m = BUNDLE_RE.match(name)
    assert m and (m["host"], m["start"], m["group"], m["digest"]) == ("demo-hive", "20210619T000458Z", "hive_audio",
                                                                       "0123456789ab")
    with pytest.raises(ValueError):
        spool_mod.bundle_filename("demo-hive", "2021-06-19", "all", "0123456789ab")


def test_orphan_signatures_only_old_ones(tmp_path):
    s = Spool(tmp_path)
    paired = _bundle(s.outbox, "20210619T000000Z", "a" * 12, sig=True)
    old = s.outbox / (spool_mod.bundle_filename("hive", "20210619T000000Z", "all", "b" * 12) + ".sig")
    old.write_bytes(b"s")
    os.utime(old, (time.time() - 3600,) * 2)
    young = s.outbox / (spool_mod.bundle_filename("hive", "20210619T000000Z", "all", "c" * 12) + ".sig")
    young.write_bytes(b"s")
    assert s.orphan_signatures(older_than_s=600) == [old]
    assert sorted(s.orphan_signatures()) == sorted([old, young])
    assert spool_mod.signature_of(paired) not in s.orphan_signatures()


def test_usage_counts_records_and_bundles(tmp_path):
    s = Spool(tmp_path)
    rec = spool_mod.write_record(s.staging_dir("hive_climate"), "r.csv", {"sensor": "hive_climate"},
                                 data_writer=lambda f: f.write(b"time\n1\n"))
    _bundle(s.outbox, "20210619T000000Z", "a" * 12, sig=True)
    (s.outbox / ".partial.tmp-1").write_bytes(b"x" * 1000)
    files, size = s.usage(spool_mod.STAGING)
    assert files == 1 and size == rec.stat().st_size + spool_mod.sidecar_of(rec).stat().st_size
    assert s.usage(spool_mod.OUTBOX) == (1, 100), "bundles only: the .sig and temporaries are not counted"
    assert s.allocated() >= 3 * 512 and s.free_bytes() > 0


def test_unique_name_never_overwrites(tmp_path):
    (tmp_path / "r.csv").write_text("1")
    (tmp_path / "r-1.csv").write_text("2")
    assert spool_mod.unique_name(tmp_path, "r.csv") == "r-2.csv"
    assert spool_mod.unique_name(tmp_path, "new.csv") == "new.csv"
    assert spool_mod.unique_name(tmp_path, "noext") == "noext"


def test_remove_stale_temps_only_ours(tmp_path):
    s = Spool(tmp_path)
    d = s.staging_dir("a")
    d.mkdir(parents=True)
    (d / ".r.csv.tmp-123").write_bytes(b"")
    (d / ".hidden").write_bytes(b"")
    (d / "r.csv").write_bytes(b"")
    assert fsio.remove_stale_temps(s.root) == 1
    assert sorted(p.name for p in d.iterdir()) == [".hidden", "r.csv"]


def test_atomic_writer_leaves_the_old_file_on_error(tmp_path):
    final = tmp_path / "x"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fsio.atomic_writer(final) as f:
            f.write(b"new")
            raise RuntimeError("power cut")
    assert final.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_daemon_lock_and_worker_lock(tmp_path):
    s = Spool(tmp_path)
    held = s.lock()
    with pytest.raises(SpoolBusy) as e:
        s.lock()
    assert e.value.held == LOCK
    held.release()

    # A worker of an earlier daemon holds .workers.lock shared: a new daemon waits, then gives up.
    fd = os.open(tmp_path / WORKERS_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    t0 = time.monotonic()
    with pytest.raises(SpoolBusy) as e:
        s.lock(wait_workers_s=0.5)
    assert e.value.held == WORKERS_LOCK and time.monotonic() - t0 >= 0.4
    os.close(fd)

    # The daemon's lock lets its own workers take theirs; `upload --backlog`'s keeps every worker out.
    daemon = s.lock(wait_workers_s=1)
    worker_fd = s.hold_worker_lock()
    os.close(worker_fd)
    daemon.release()
    backlog = s.lock(hold_workers=True)
    probe = os.open(tmp_path / WORKERS_LOCK, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    os.close(probe)
    backlog.release()
    assert s.lock().release() is None
