"""Upload throughput on loopback: beemond's transports next to a reused-connection baseline and the stock clients.

What is measured (one run of each, servers are the tests' real peers on 127.0.0.1)
  small files: 200 x 10 kB bundles through ``Uploader.upload_next`` with one connection reused, then the
        same with the connection closed after every file (the seed's design: connect + log in per file).
        Same code path either way (.part, size check, rename, local delete + fsync). The seed uploaded
        over plain FTP, so the issue's ``small_files_speedup`` is FTP to pyftpdlib: per-file time / reused
        time. On loopback an FTP login costs ~5 round trips of ~0 s, so expect ~1.5-2x there (the goal,
        >= 5, is not reachable for FTP on loopback; on a mobile link each saved round trip counts, but a
        reused upload itself takes ~8 round trips against ~21 per file with the AppMAIS layout's MKDs,
        so ~2-3x there too: counted, not measured). The same over FTPS
        (pyftpdlib with TLS, certificate verified: a TLS handshake per connection) is
        ``ftps_small_files_speedup``, and over SFTP to OpenSSH sshd (a key exchange and public-key
        authentication per connection, in paramiko's Python) ``sftp_small_files_speedup``.
  sftp: one 200 MB bundle through ``Uploader`` (SftpTransport: .part, stat, posix-rename) to OpenSSH sshd,
        against ``sftp -b`` (OpenSSH's client, ``put`` of the same file) to the same server.
        ``sftp_ratio`` = our MB/s / OpenSSH's MB/s.
  ftp: the same file through ``Uploader`` (FtpTransport) to pyftpdlib, against ``curl -T`` to the same
        server. ``ftp_ratio`` = our MB/s / curl's MB/s.
MB = 1e6 bytes. The source file is warm in the page cache for every run (ours upload a hard link of it);
large-file runs alternate ours/theirs, each after ``os.sync()``, with the order inside each pair
flipped every repeat (the second of a pair runs while the server's disk still absorbs the first's
200 MB: measured 0.5x vs 1.6x for the same code depending on order), and the median of --repeat runs
is reported (loopback numbers on a shared machine swing by 2x).

  s3: the same against SeaweedFS and rclone (bench/upload_s3.py): s3_ratio, s3_small_files_per_s, and the
        peak memory of our S3 transport against obstore's put(mode="create").

Reproduce (from the repo root):  .venv/bin/python bench/upload.py [--mb 200] [--small 200] [--repeat 4] [--s3-only]
Exit 2 if sshd, sftp or curl is missing (scripts/setup installs openssh-server; curl is Debian's).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from beemond import config, ipc  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.spool import Spool  # noqa: E402
from beemond.upload.uploader import Uploader  # noqa: E402
from conftest import FtpServer, make_config  # noqa: E402
from upload_peers import Sshd, ftps_server, make_cert  # noqa: E402
from upload_s3 import bench_s3  # noqa: E402

SFTP, CURL = shutil.which("sftp"), shutil.which("curl")


def make_bundle(outbox: Path, i: int, size: int) -> Path:
    body = os.urandom(size) if size <= 1_000_000 else None
    name = f"bench_20210619T{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}Z_audio_{i:012x}.tar.age"
    path = outbox / name
    if body is not None:
        path.write_bytes(body)
    else:
        with open(path, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
            f.write(os.urandom(size - (size >> 20 << 20)))
    return path


def uploader(cfg) -> Uploader:
    reader, writer = multiprocessing.Pipe(duplex=False)
    u = Uploader(cfg, ipc.Channel("uploader", queue.Queue(), writer, 3600))
    u._bench_reader = reader  # keep the read end open
    return u


def drain_events(u: Uploader) -> None:
    while u._bench_reader.poll():
        u._bench_reader.recv()


def run_small(cfg, n: int, reuse: bool) -> float:
    u = uploader(cfg)
    outbox = Spool(cfg.spool).outbox
    for i in range(n):
        make_bundle(outbox, i, 10_000)
    u.scan()
    t0 = time.perf_counter()
    while u.backlog:
        assert u.upload_next() and not u.failures, "upload failed"
        if not reuse:
            u.transport.close()
        drain_events(u)
    dt = time.perf_counter() - t0
    u.transport.close()
    assert not list(outbox.glob("*.tar.age"))
    return dt


def run_one(cfg, path: Path) -> float:
    u = uploader(cfg)
    u.scan()
    t0 = time.perf_counter()
    assert u.upload_next() and not u.failures and not path.exists(), "upload failed"
    dt = time.perf_counter() - t0
    u.transport.close()
    drain_events(u)
    return dt


def warm(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--repeat", type=int, default=4, help="even: each order of a pair as often")
    p.add_argument("--s3-only", action="store_true", help="only the S3 part (bench/upload_s3.py)")
    args = p.parse_args()
    if args.s3_only:
        return s3_main(args)
    if not (SFTP and CURL and os.path.exists("/usr/sbin/sshd")):
        print("bench/upload.py needs sshd, sftp and curl", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    ftp = ftps = sshd = None
    try:
        _ident, rcpt, _ = crypto.keygen(tmp / "keys")
        keys = {"recipient": rcpt}
        pw = tmp / "ftp-password"
        pw.write_text("bench-secret\n")
        ftp = FtpServer(tmp / "ftp-root", pw).start()
        cert, cert_key = make_cert(tmp / "tls")
        ftps = ftps_server(tmp / "ftps-root", pw, cert, cert_key)
        sshd = Sshd(tmp / "sshd").start()
        sftp_root = tmp / "sftp-root"
        sftp_root.mkdir()

        def cfg_for(name: str, protocol: str) -> config.Config:
            d = tmp / name
            d.mkdir()  # a fresh spool and remote directory per run
            over = {"daemon.spool_dir": str(d / "spool"), "upload.layout": "{{ sensor }}/{{ name }}"}
            if protocol == "sftp":
                over.update({"upload.protocol": "sftp", "upload.user": sshd.user, "upload.password_file": None,
                             "upload.key_file": str(sshd.client_key), "upload.known_hosts": str(sshd.known_hosts),
                             "upload.remote_dir": str(sftp_root / name)})
            else:
                over["upload.remote_dir"] = name
            if protocol == "ftps":
                over.update({"upload.protocol": "ftps", "upload.ca_file": str(cert)})
            port = {"ftp": ftp.port, "ftps": ftps.port, "sftp": sshd.port}[protocol]
            cfg = config.load(make_config(d, keys, pw, port, **over))
            Spool(cfg.spool).outbox.mkdir(parents=True)
            return cfg

        # ---- small files
        results = {}
        for proto in ("ftp", "ftps", "sftp"):
            reused = run_small(cfg_for(f"small-{proto}-reused", proto), args.small, True)
            per_file = run_small(cfg_for(f"small-{proto}-per-file", proto), args.small, False)
            results[proto] = (reused, per_file)
            print(f"{proto}: {args.small} x 10 kB: reused connection {reused:.2f} s "
                  f"({args.small / reused:.0f} files/s), one connection per file {per_file:.2f} s "
                  f"({args.small / per_file:.0f} files/s): speedup {per_file / reused:.1f}x")

        # ---- one large bundle: ours and theirs alternate, each after os.sync(), median of --repeat
        size = args.mb * 1_000_000
        src = make_bundle(tmp, 86399, size)  # a name no small-file run used
        digest = warm(src)
        mb = size / 1e6
        batch = tmp / "batch"
        (sftp_root / "openssh").mkdir()

        # Every run, theirs as ours, writes a new file on the server (overwriting one instead changes
        # what the server's filesystem does), and each is deleted at the end of its repeat.
        def openssh_run() -> float:
            target = sftp_root / "openssh" / f"big-{time.monotonic_ns()}.tar.age"
            batch.write_text(f"put {src} {target}\n")
            checks.append(target)
            t0 = time.perf_counter()
            subprocess.run([SFTP, "-b", str(batch), "-P", str(sshd.port), "-i", str(sshd.client_key),
                            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                            "-o", f"UserKnownHostsFile={sshd.known_hosts}", f"{sshd.user}@127.0.0.1"],
                           check=True, capture_output=True)
            return time.perf_counter() - t0

        def curl_run() -> float:
            name = f"big-{time.monotonic_ns()}.tar.age"
            checks.append(tmp / "ftp-root" / "curl" / name)
            t0 = time.perf_counter()
            subprocess.run([CURL, "-s", "-S", "--ftp-create-dirs", "-u", f"beemond:{pw.read_text().strip()}",
                            "-T", str(src), f"ftp://127.0.0.1:{ftp.port}/curl/{name}"], check=True)
            return time.perf_counter() - t0

        def ours_run(proto: str, remote_root: Path):
            def run() -> float:
                cfg = cfg_for(f"big-{proto}-{time.monotonic_ns()}", proto)
                local = Spool(cfg.spool).outbox / src.name
                os.link(src, local)  # the same warm pages; the upload deletes only this link
                dt = run_one(cfg, local)
                got = next(remote_root.rglob(src.name))
                assert got.stat().st_size == size
                checks.append(got)
                return dt
            return run

        checks: list[Path] = []
        times: dict[str, list[float]] = {k: [] for k in ("openssh", "sftp", "curl", "ftp")}
        runs = {"openssh": openssh_run, "sftp": ours_run("sftp", sftp_root), "curl": curl_run,
                "ftp": ours_run("ftp", tmp / "ftp-root")}
        # Whichever client of a pair goes second pays for the first one's 200 MB written on the server
        # (write-back), so the order within each pair flips every repeat (ABBA) and --repeat is even.
        for i in range(args.repeat):
            for pair in (("openssh", "sftp"), ("curl", "ftp")):
                for name in (pair if i % 2 == 0 else pair[::-1]):
                    os.sync()
                    times[name].append(runs[name]())
            ok = all(warm(p) == digest for p in checks)  # every copy on the server, ours and theirs
            for p in checks:  # keep the disk from filling with copies
                p.unlink()
            checks.clear()
            if not ok:
                print("content check MISMATCH", file=sys.stderr)
                return 1
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:8s} {mb:.0f} MB: " + " ".join(f"{t:.2f}" for t in v) + f" s; median {mb / med[k]:.0f} MB/s")
        ours_sftp, openssh, ours_ftp, curl = med["sftp"], med["openssh"], med["ftp"], med["curl"]
        speedup = {k: per_file / reused for k, (reused, per_file) in results.items()}
        print(f"small_files_speedup={speedup['ftp']:.1f} ftps_small_files_speedup={speedup['ftps']:.1f} "
              f"sftp_small_files_speedup={speedup['sftp']:.1f} "
              f"sftp_mb_s={mb / ours_sftp:.0f} openssh_sftp_mb_s={mb / openssh:.0f} sftp_ratio={openssh / ours_sftp:.2f} "
              f"ftp_mb_s={mb / ours_ftp:.0f} curl_mb_s={mb / curl:.0f} ftp_ratio={curl / ours_ftp:.2f} "
              + s3_fields(bench_s3(args, tmp, keys, pw, make_bundle, run_small, run_one, warm)))
        return 0
    finally:
        for server in (ftp, ftps, sshd):
            if server is not None:
                server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def s3_fields(got: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" if k.endswith(("ratio", "per_s")) else f"{k}={v:.0f}" for k, v in got.items())


def s3_main(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-upload-s3-"))
    try:
        _ident, rcpt, _ = crypto.keygen(tmp / "keys")
        pw = tmp / "unused-password"
        pw.write_text("x\n")
        print(s3_fields(bench_s3(args, tmp, {"recipient": rcpt}, pw, make_bundle, run_small, run_one, warm)))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
