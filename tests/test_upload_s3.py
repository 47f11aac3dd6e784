"""The S3 transport against a real SeaweedFS (SigV4 checked, If-None-Match and x-amz-checksum-sha256
enforced): a server killed mid-upload and restarted, connection resets, a re-sent bundle (412), a
different object under our name, a corrupted body refused, the daemon SIGKILLed mid-upload, and the
secret never in the log."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest

from beemond import config, ipc
from conftest import make_config, wait_for
from s3_peers import ACCESS_KEY, SECRET_KEY, CorruptingProxy, SeaweedFS
from test_upload import HOST, Running, bundles_left, load, make_bundles, outbox_of
from upload_peers import ResetProxy


@pytest.fixture(scope="module")
def shared_s3(tmp_path_factory):
    """One SeaweedFS for the tests that do not stop it (each writes under its own key prefix)."""
    server = SeaweedFS(tmp_path_factory.mktemp("weed")).start()
    yield server
    if server.proc is not None:
        server.kill()   # by its PID; SIGTERM makes weed linger for seconds


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of the test's own, which it may kill and restart."""
    server = SeaweedFS(tmp_path / "weed").start()
    yield server
    if server.proc is not None:
        server.kill()


@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "s3-secret"
    p.write_text(SECRET_KEY + "\n")
    return p


def s3_over(port: int, prefix: str, **extra) -> dict:
    return {"upload.protocol": "s3", "upload.endpoint": f"http://127.0.0.1:{port}", "upload.bucket": "hives",
            "upload.user": ACCESS_KEY, "upload.remote_dir": prefix, "upload.timeout_s": 5, **extra}


def keyed(prefix: str, made: dict[str, str]) -> dict[str, str]:
    """Bundle name -> the object key the default layout gives it under remote_dir *prefix*."""
    return {f"{prefix}/{HOST}/2021-06-19/hive_audio/{name}": digest for name, digest in made.items()}


def test_s3_server_killed_mid_upload_then_back_every_bundle_once(tmp_path, keys, secret_file, own_s3, caplog):
    s3 = own_s3
    cfg = load(tmp_path, keys, secret_file, **s3_over(s3.port, "lab", **{"upload.rate_limit_bytes_per_s": 2_000_000}))
    made = make_bundles(outbox_of(cfg), 5, 600_000)
    caplog.set_level(logging.DEBUG)
    with Running(cfg) as r:
        wait_for(lambda: r.uploader.counts["uploaded"] >= 1, 30, "a first bundle")
        s3.kill()                         # mid-way through the next PUT (600 kB at 2 MB/s)
        wait_for(lambda: r.uploader.counts["failures"] >= 1, 30, "the uploader noticing")
        assert len(bundles_left(cfg)) >= 3, "nothing leaves the outbox while the server is away"
        s3.start()                        # same ports, same data directory
        wait_for(lambda: not bundles_left(cfg), 60, "the outbox to empty")
    assert s3.objects() == keyed("lab", made), "every bundle exactly once under its key, byte for byte"
    assert SECRET_KEY not in caplog.text


def test_s3_small_bundles_through_a_resetting_proxy(tmp_path, keys, secret_file, shared_s3):
    s3 = shared_s3
    proxy = ResetProxy(s3.port, min_bytes=2_000, max_bytes=100_000, resets=12).start()
    cfg = load(tmp_path, keys, secret_file, **s3_over(proxy.port, "resets", **{"upload.backoff_initial_s": 0.01,
                                                                                  "upload.backoff_max_s": 0.05}))
    made = make_bundles(outbox_of(cfg), 60, 10_000)
    try:
        with Running(cfg) as r:
            wait_for(lambda: not bundles_left(cfg), 90, "60 bundles through the proxy")
    finally:
        proxy.stop()
    assert proxy.resets >= 10 and r.uploader.counts["failures"] >= 10
    assert s3.objects("resets/") == keyed("resets", made)


def test_s3_corrupted_body_is_refused_then_sent_again(tmp_path, keys, secret_file, shared_s3):
    s3 = shared_s3
    proxy = CorruptingProxy(s3.port, at=50_000, times=2).start()
    # A loaded SeaweedFS can take seconds to answer a refused body: a longer no-progress timeout here.
    cfg = load(tmp_path, keys, secret_file, **s3_over(proxy.port, "corrupt", **{"upload.timeout_s": 20}))
    made = make_bundles(outbox_of(cfg), 1, 200_000)
    try:
        with Running(cfg) as r:
            wait_for(lambda: not bundles_left(cfg), 60, "the bundle, after the corrupted tries")
    finally:
        proxy.stop()
    assert proxy.corrupted == 2
    errors = [e.message for e in r.events if e.kind == ipc.ERROR]
    # The server refused the flipped byte (a try whose answer came too late counts as a timeout instead).
    assert sum("BadDigest" in m for m in errors) >= 1, errors
    assert all("BadDigest" in m or "timed out" in m for m in errors), errors
    assert s3.objects("corrupt/") == keyed("corrupt", made), "what the server keeps is our bytes"


def test_s3_resent_bundle_is_delivered_once_and_a_different_object_is_never_overwritten(tmp_path, keys, secret_file,
                                                                                         shared_s3, caplog):
    s3 = shared_s3
    cfg = load(tmp_path, keys, secret_file, **s3_over(s3.port, "resent"))
    outbox = outbox_of(cfg)
    small = make_bundles(outbox, 1, 20_000)                 # PUT, then 412 when sent again
    large = make_bundles(outbox, 1, 1_500_000, start=1)     # over HEAD_FIRST_BYTES: looked up before sending
    copies = {n: (outbox / n).read_bytes() for n in (*small, *large)}
    with Running(cfg):
        wait_for(lambda: not bundles_left(cfg), 30, "the first upload")
    caplog.set_level(logging.INFO)
    for name, data in copies.items():      # a crash between the server's 200 and our delete: sent again
        (outbox / name).write_bytes(data)
    with Running(cfg) as r:
        wait_for(lambda: not bundles_left(cfg), 30, "the re-sent bundles")
    assert r.uploader.counts["quarantined"] == 0
    assert re.search(r"already on the server \(412 to If-None-Match", caplog.text)
    assert re.search(r"already on the server \(same size and SHA-256\); not sent again", caplog.text)
    assert s3.objects("resent/") == keyed("resent", {**small, **large})
    # Another bundle's bytes under an existing name: refused by the server, quarantined, never replaced.
    name = next(iter(small))
    (outbox / name).write_bytes(b"not the same bundle" * 100)
    with Running(cfg) as r:
        wait_for(lambda: r.uploader.counts["quarantined"] == 1, 30, "the impostor quarantined")
    assert (cfg.spool / "quarantine" / name).exists()
    assert s3.objects("resent/") == keyed("resent", {**small, **large})


def test_s3_daemon_killed_mid_upload_restarts_and_delivers_once(tmp_path, keys, secret_file, shared_s3, daemons):
    s3 = shared_s3
    path = make_config(tmp_path, keys, secret_file, 0, **s3_over(s3.port, "killed", **{
        "upload.rate_limit_bytes_per_s": 1_000_000, "upload.backoff_initial_s": 0.2, "upload.backoff_max_s": 1}),
        **{f"sensors.{s}.enabled": False for s in ("hive_air", "hive_frames", "hive_audio", "hive_cam", "hive_gpio",
                                                    "hive_scale")},
        **{f"processors.{p}.enabled": False for p in ("hive_bands", "hive_swarm")})
    cfg = config.load(path)
    made = make_bundles(outbox_of(cfg), 3, 1_500_000)      # 1.5 s each at 1 MB/s
    d = daemons(path, tmp_path / "run1.log")
    d.wait_log(r"connected to s3://hives")
    # A first bundle confirmed and deleted locally (its object shows on the server a moment before
    # the uploader deletes it: under load a kill in between left all three in the outbox).
    wait_for(lambda: len(bundles_left(cfg)) < len(made), 30, "a first bundle delivered")
    d.kill_tree()                                           # in the middle of the second PUT
    left = set(bundles_left(cfg))
    assert left and set(made) - left, "some bundles delivered, the rest still in the outbox"
    d2 = daemons(path, tmp_path / "run2.log")
    wait_for(lambda: not (set(bundles_left(cfg)) & set(made)), 60, "the outbox to empty after the restart")
    assert d2.terminate() == 0
    objects = s3.objects("killed/")
    assert {k: v for k, v in objects.items() if k.rsplit("/", 1)[-1] in made} == keyed("killed", made)
    assert SECRET_KEY not in d.log() + d2.log()


def test_s3_secret_from_a_systemd_credential_and_config_rules(tmp_path, keys, secret_file, shared_s3, monkeypatch):
    s3 = shared_s3
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "s3-secret").write_text(SECRET_KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load(tmp_path, keys, None, **s3_over(s3.port, "credential", **{"upload.password_credential": "s3-secret"}))
    made = make_bundles(outbox_of(cfg), 2, 5_000)
    with Running(cfg):
        wait_for(lambda: not bundles_left(cfg), 30, "uploads with the credential")
    assert s3.objects("credential/") == keyed("credential", made)
    for over, key in (({"upload.endpoint": "s3.example.org"}, "upload.endpoint"),
                      ({"upload.bucket": "No_Such"}, "upload.bucket"),
                      ({"upload.password_file": None, "upload.password_credential": None}, "upload.user")):
        with pytest.raises(config.ConfigError) as e:
            load(tmp_path, keys, secret_file, **{**s3_over(s3.port, "x"), **over})
        assert e.value.key == key
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, keys, secret_file, **{"upload.bucket": "hives"})   # ftp with an s3 key
    assert e.value.key == "upload.bucket"


def test_sigv4_matches_the_aws_documented_example():
    """AWS's "Signature Version 4: GET Object" example (examplebucket/test.txt, Range bytes=0-9)."""
    import datetime

    from beemond.upload.s3 import EMPTY_SHA256, sigv4_headers

    h = sigv4_headers("GET", "examplebucket.s3.amazonaws.com", "/test.txt", "", {"Range": "bytes=0-9"}, EMPTY_SHA256,
                      "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1",
                      datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc))
    assert h["authorization"].endswith("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                                       "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    assert hashlib.sha256(b"").hexdigest() == EMPTY_SHA256


def test_s3_a_connection_idle_too_long_is_replaced_before_the_next_request(tmp_path, keys, secret_file, shared_s3,
                                                                          monkeypatch):
    from beemond.upload import s3 as s3_mod

    monkeypatch.setattr(s3_mod, "IDLE_REOPEN_S", 0.0)   # every request on a fresh connection
    cfg = load(tmp_path, keys, secret_file, **s3_over(shared_s3.port, "idle"))
    made = make_bundles(outbox_of(cfg), 3, 1_200_000)   # HEAD, then PUT: two requests per bundle
    with Running(cfg) as r:
        wait_for(lambda: not bundles_left(cfg), 30, "the uploads")
    assert r.uploader.counts["failures"] == 0
    assert shared_s3.objects("idle/") == keyed("idle", made)


def test_s3_keys_with_spaces_plus_tilde_and_unicode_are_signed_and_stored_once(tmp_path, keys, secret_file, shared_s3):
    """SigV4's canonical URI percent-encodes each byte of the UTF-8 key but "/-_.~" (a space is %20, a
    "+" %2B); a wrong encoding shows as 403 SignatureDoesNotMatch, or as an object under another name.
    The same bundles sent again meet 412 and are found equal by HEAD under the same encoded key."""
    layout = "{{ host }}/apiary 1+2~ü/{{ name }}"
    cfg = load(tmp_path, keys, secret_file, **s3_over(shared_s3.port, "odd keys", **{"upload.layout": layout}))
    outbox = outbox_of(cfg)
    made = make_bundles(outbox, 2, 5_000)
    copies = {n: (outbox / n).read_bytes() for n in made}
    with Running(cfg) as r:
        wait_for(lambda: not bundles_left(cfg), 30, "the uploads")
    assert r.uploader.counts["failures"] == 0
    expected = {f"odd keys/{HOST}/apiary 1+2~ü/{name}": digest for name, digest in made.items()}
    assert shared_s3.objects("odd keys/") == expected
    for name, data in copies.items():      # sent again: 412, then HEAD on the same encoded key
        (outbox / name).write_bytes(data)
    with Running(cfg) as r:
        wait_for(lambda: not bundles_left(cfg), 30, "the re-sent bundles")
    assert r.uploader.counts["quarantined"] == 0 and r.uploader.counts["failures"] == 0
    assert shared_s3.objects("odd keys/") == expected


class DeletingProxy(ResetProxy):
    """Forwards to SeaweedFS, and deletes the bundle's object just before the first HEAD of it reaches
    the server (the lab ingesting and removing it between our PUT's 412 and the HEAD that follows)."""

    def __init__(self, s3: SeaweedFS):
        super().__init__(s3.port, 0, 0, resets=0)
        self.s3, self.deleted = s3, []

    def tamper(self, data: bytes, offset: int) -> bytes:
        m = re.match(rb"HEAD /hives/(\S+\.tar\.age) HTTP", data)
        if m and not self.deleted:
            key = m[1].decode()
            self.deleted.append((key, self.s3.request("DELETE", key)[0]))
        return data


def test_s3_an_object_gone_between_the_412_and_the_head_is_retried_not_quarantined(tmp_path, keys, secret_file,
                                                                                   shared_s3):
    s3 = shared_s3
    cfg = load(tmp_path, keys, secret_file, **s3_over(s3.port, "gone"))
    outbox = outbox_of(cfg)
    made = make_bundles(outbox, 1, 20_000)
    copies = {n: (outbox / n).read_bytes() for n in made}
    with Running(cfg):
        wait_for(lambda: not bundles_left(cfg), 30, "the first upload")
    for name, data in copies.items():      # sent again after a lost 200
        (outbox / name).write_bytes(data)
    proxy = DeletingProxy(s3).start()
    cfg = load(tmp_path, keys, secret_file, **s3_over(proxy.port, "gone", **{"upload.backoff_initial_s": 0.05,
                                                                               "upload.backoff_max_s": 0.2}))
    try:
        with Running(cfg) as r:
            wait_for(lambda: not bundles_left(cfg) or r.uploader.counts["quarantined"], 30, "the re-sent bundle")
    finally:
        proxy.stop()
    assert [status for _key, status in proxy.deleted] == [204], proxy.deleted
    assert r.uploader.counts["quarantined"] == 0, "a 412 whose object is gone at the HEAD is no impostor"
    assert s3.objects("gone/") == keyed("gone", made), "sent again once the name was free"
