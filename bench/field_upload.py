"""Uploads over a slow, resetting rural link: resume overhead, large bundles delivered, small-bundle latency.

A part of bench/field.py (``--part upload``); also runs alone. The uploader (``Uploader.run`` in a
thread, with a real channel) sends to a real server on 127.0.0.1 (pyftpdlib for FTP, OpenSSH sshd for
SFTP) through tests/link_proxy.py: ``--upload-rate`` bytes/s each way (10-15 KB/s on the field's mobile
links), every connection reset every ``--upload-reset-s`` seconds. At the start ``--upload-large``
bundles of ``--upload-large-bytes`` wait in the outbox (a backlog after a night offline); every
``--upload-small-every-s`` seconds (the bundle window) a small fresh bundle is sealed into the outbox
(climate readings, alerts).

Prints (last line, key=value):
  resume_overhead       bytes the client sent over the link (logins, commands, every attempt) divided by
                        the bytes of the bundles delivered; goal <= 1.2 with a 2 MB bundle
  large_delivered       bundles over 1 MB on the server, byte for byte, of those queued ("3/3")
  small_latency_max_s   longest time from a small bundle's arrival in the outbox to its final name on the
                        server (goal: about two bundle windows at most)
  small_delivered, resets, resumed, paused, failures, elapsed_s

Reproduce (from the repo root, ~9 minutes with the defaults):
  .venv/bin/python bench/field.py --part upload [--upload-protocol ftp|sftp] [--upload-rate 12000]
      [--upload-reset-s 120] [--upload-large 3] [--upload-large-bytes 2000000] [--upload-small-every-s 60]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from beemond import config, ipc  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.spool import Spool  # noqa: E402
from beemond.upload.uploader import Uploader  # noqa: E402
from conftest import FtpServer, make_config  # noqa: E402
from link_proxy import LinkProxy  # noqa: E402
from upload_peers import Sshd  # noqa: E402


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("upload (bench/field_upload.py)")
    g.add_argument("--upload-protocol", choices=("ftp", "sftp"), default="ftp")
    g.add_argument("--upload-rate", type=int, default=12_000, help="link bytes/s each way")
    g.add_argument("--upload-reset-s", type=float, default=120, help="every connection reset this often")
    g.add_argument("--upload-large", type=int, default=3, help="large bundles waiting at the start")
    g.add_argument("--upload-large-bytes", type=int, default=2_000_000)
    g.add_argument("--upload-small-every-s", type=float, default=60, help="a small fresh bundle this often")
    g.add_argument("--upload-small-bytes", type=int, default=3_000)
    g.add_argument("--upload-timeout-s", type=float, default=30, help="[upload] timeout_s")
    g.add_argument("--upload-max-s", type=float, default=1800, help="give up after this long")


def _bundle(outbox: Path, stamp: str, group: str, size: int) -> tuple[str, str]:
    """A bundle sealed into the outbox as the aggregator does it (temporary name, then rename)."""
    body = os.urandom(size)
    digest = hashlib.sha256(body).hexdigest()
    name = f"field-hive_{stamp}_{group}_{digest[:12]}.tar.age"
    tmp = outbox / f".{name}.tmp"
    tmp.write_bytes(body)
    os.replace(tmp, outbox / name)
    return name, digest


def _stamp(i: int) -> str:
    return f"20260601T{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}Z"


def measure(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-field-upload-"))
    _ident, rcpt, _ = crypto.keygen(tmp / "keys")
    pw = tmp / "ftp-password"
    pw.write_text("bench-secret\n")
    server = proxy = None
    try:
        if args.upload_protocol == "ftp":
            server = FtpServer(tmp / "ftp-root", pw).start()
            remote_root = tmp / "ftp-root"
        else:
            server = Sshd(tmp / "sshd").start()
            remote_root = tmp / "sftp-root"
        proxy = LinkProxy(server.port, rate=args.upload_rate, reset_every_s=args.upload_reset_s,
                          ftp=args.upload_protocol == "ftp").start()
        over = {"daemon.spool_dir": str(tmp / "spool"), "upload.layout": "{{ sensor }}/{{ name }}",
                "upload.timeout_s": args.upload_timeout_s, "upload.backoff_initial_s": 2,
                "upload.backoff_max_s": 30, "daemon.heartbeat_interval_s": 5}
        if args.upload_protocol == "sftp":
            kh = tmp / "known_hosts"  # the proxy answers for the server
            kh.write_text(server.known_hosts.read_text().replace(f":{server.port} ", f":{proxy.port} "))
            over.update({"upload.protocol": "sftp", "upload.user": server.user, "upload.password_file": None,
                         "upload.key_file": str(server.client_key), "upload.known_hosts": str(kh),
                         "upload.remote_dir": str(remote_root)})
        cfg = config.load(make_config(tmp, {"recipient": rcpt}, pw, proxy.port, **over))
        outbox = Spool(cfg.spool).outbox
        outbox.mkdir(parents=True)
        large = dict(_bundle(outbox, _stamp(i), "hive_audio", args.upload_large_bytes)
                     for i in range(args.upload_large))

        commands: queue.Queue = queue.Queue()
        events_r, events_w = multiprocessing.Pipe(duplex=False)
        up = Uploader(cfg, ipc.Channel("uploader", commands, events_w, cfg.daemon.heartbeat_interval_s))
        threading.Thread(target=lambda: [events_r.recv() for _ in iter(int, 1)], daemon=True).start()
        runner = threading.Thread(target=up.run, daemon=True)
        t0 = time.monotonic()
        runner.start()

        small: dict[str, tuple[str, float]] = {}  # name -> (sha256, sealed at)
        arrived: dict[str, float] = {}
        next_small = t0 + args.upload_small_every_s
        deadline = t0 + args.upload_max_s
        i = 1000
        while time.monotonic() < deadline:
            now = time.monotonic()
            done_large = all(n in arrived for n in large)
            if now >= next_small and not done_large:
                name, digest = _bundle(outbox, _stamp(i), "climate", args.upload_small_bytes)
                small[name] = (digest, now)
                i += 1
                next_small += args.upload_small_every_s
            for p in remote_root.rglob("*.tar.age"):
                arrived.setdefault(p.name, time.monotonic())
            if done_large and all(n in arrived for n in small):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        commands.put(ipc.Shutdown())
        runner.join(60)
        on_server = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in remote_root.rglob("*.tar.age")}
        large_ok = sum(on_server.get(n) == d for n, d in large.items())
        small_ok = sum(on_server.get(n) == d for n, (d, _t) in small.items())
        delivered = large_ok * args.upload_large_bytes + small_ok * args.upload_small_bytes
        latencies = [arrived[n] - t for n, (_d, t) in small.items() if n in arrived]
        latencies += [time.monotonic() - t for n, (_d, t) in small.items() if n not in arrived]  # still waiting
        c = up.counts
        return {
            "resume_overhead": round(proxy.sent_up / delivered, 3) if delivered else "inf",
            "large_delivered": f"{large_ok}/{len(large)}",
            "small_latency_max_s": round(max(latencies), 1) if latencies else 0,
            "small_delivered": f"{small_ok}/{len(small)}",
            "bundle_window_s": args.upload_small_every_s,
            "link_rate_bytes_per_s": args.upload_rate,
            "reset_every_s": args.upload_reset_s,
            "resets": proxy.resets,
            "resumed": c["resumed"],
            "paused": c["paused"],
            "failures": c["failures"],
            "elapsed_s": round(elapsed, 1),
        }
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    got = measure(ap.parse_args())
    print(" ".join(f"{k}={v}" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
