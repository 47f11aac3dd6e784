"""The aggregator worker in-process, with a real channel: crash recovery, size cap, bad records."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time

import pytest

from beemond import aggregator, config, ipc, spool
from beemond.bundle import crypto, format as bundle_format
from conftest import make_config


@pytest.fixture
def agg(tmp_path, keys, password_file):
    def make(**over):
        cfg = config.load(make_config(tmp_path, keys, password_file, 21, **over))
        reader, writer = multiprocessing.Pipe(duplex=False)
        a = aggregator.Aggregator(cfg, ipc.Channel("aggregator", queue.Queue(), writer, 1.0))
        a.events = reader
        return a
    return make


def stage(a, sensor: str, name: str, body: bytes) -> "os.PathLike":
    meta = {"sensor": sensor, "start": "2021-06-19T00:04:58.000Z", "end": "2021-06-19T00:14:58.000Z"}
    return spool.write_record(a.staging / sensor, name, meta, data_writer=lambda f: f.write(body))


def bundle_members(a, keys, tmp_path) -> dict[str, dict]:
    out = {}
    for i, b in enumerate(sorted(a.outbox.iterdir())):
        m = bundle_format.extract_bundle(b, crypto.load_identities(keys["identity"]), tmp_path / f"x{i}")
        out.update({r["path"]: r for r in m["records"]})
    return out


def staged(a) -> list[str]:
    return sorted(p.name for p in a.staging.rglob("*") if p.is_file())


def test_orphans_of_a_crash_are_recovered_not_lost(agg, keys, tmp_path):
    a = agg()
    good = stage(a, "hive_climate", "good.csv", b"time\n1\n")
    # A writer that died between the data rename and the sidecar: data file only, older than the grace.
    orphan = a.staging / "hive_audio" / "cut.flac"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"fLaC....")
    old = time.time() - aggregator.ORPHAN_GRACE_S - 5
    os.utime(orphan, (old, old))
    # A sidecar whose record was already bundled (crash before its unlink): removed, not bundled.
    stale = a.staging / "hive_climate" / ("gone.csv" + spool.META_SUFFIX)
    stale.write_text("{}")
    os.utime(stale, (old, old))
    # A record whose sidecar is still to come (young): left for its writer.
    young = a.staging / "hive_audio" / "young.flac"
    young.write_bytes(b"fLaC")

    a.rescan()
    a.seal_all(force=True)
    members = bundle_members(a, keys, tmp_path)
    assert set(members) == {"hive_climate/good.csv", "hive_audio/cut.flac"}
    assert members["hive_audio/cut.flac"]["metadata"]["recovered"] is True
    assert staged(a) == ["young.flac"]
    assert not good.exists()


def test_size_cap_seals_early_and_events_go_up(agg, keys, tmp_path):
    a = agg(**{"bundle.max_bytes": 2048, "bundle.max_duration_s": 3600})
    for i in range(3):
        a.add(stage(a, "hive_audio", f"s{i}.flac", os.urandom(1500)))
    bundles = sorted(a.outbox.iterdir())
    assert len(bundles) == 1, "the second 1500-byte record crossed the 2048-byte cap"
    assert len(bundle_members(a, keys, tmp_path)) == 2
    assert staged(a) == ["s2.flac", "s2.flac" + spool.META_SUFFIX]
    events = []
    while a.events.poll():
        events.append(a.events.recv())
    sealed = [e for e in events if e.kind == ipc.BUNDLE_SEALED]
    assert sealed and sealed[0].records == 2 and sealed[0].bytes == bundles[0].stat().st_size


def test_an_unreadable_record_is_set_aside_and_the_rest_sealed(agg, keys, tmp_path):
    a = agg()
    recs = [stage(a, "hive_climate", f"r{i}.csv", f"time\n{i}\n".encode()) for i in range(3)]
    a.rescan(final=True)
    # r1 becomes unreadable (a directory where a file was: open() fails like an EIO would).
    recs[1].unlink()
    recs[1].mkdir()
    # r2 vanishes outright.
    recs[2].unlink()
    a.seal_all(force=True)
    assert set(bundle_members(a, keys, tmp_path)) == {"hive_climate/r0.csv"}
    failed = a.staging.parent / "failed" / "hive_climate"
    assert sorted(p.name for p in failed.iterdir()) == ["r1.csv", "r1.csv" + spool.META_SUFFIX]
    assert json.loads((failed / ("r1.csv" + spool.META_SUFFIX)).read_text())["sensor"] == "hive_climate"
    assert not a.open


def test_seal_failure_keeps_records_staged(agg, keys, tmp_path):
    a = agg()
    rec = stage(a, "hive_climate", "r.csv", b"time\n1\n")
    a.rescan(final=True)
    a.outbox.rename(a.outbox.with_name("outbox-gone"))  # the bundle cannot be written
    a.outbox.parent.joinpath("outbox").write_text("not a directory")
    a.seal_all(force=True)
    assert rec.exists() and spool.sidecar_of(rec).exists()
    assert a.open["all"].retry_at > time.monotonic()
