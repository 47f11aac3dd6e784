"""S3 over the field's slow, resetting link: which bundle sizes a single PUT gets through.

The question behind the S3 transport's design (beemond/upload/s3.py): one PUT per bundle cannot
resume, so over a link of ``--rate`` bytes/s whose connections are reset every ``--reset-s`` seconds
(tests/link_proxy.py, as bench/field_upload.py uses it) a bundle gets through only if it fits between
two resets. Multipart would not change that: S3 parts are at least 5 MiB and do not resume either.
The uploader (``Uploader.run`` in a thread, real channel) sends to a real SeaweedFS through the proxy:
one bundle of each ``--sizes`` waits in the outbox, and a small fresh bundle arrives every
``--small-every-s`` (climate readings, alerts).

Prints per size whether and when it arrived, then (last line) ``s3_link_delivered=`` (sizes on the
server, byte for byte, by SHA-256), ``s3_link_largest_delivered=``, ``s3_link_fits_bytes=`` (rate x
reset interval: what one connection can carry), ``s3_link_overhead=`` (bytes over the link / bytes
delivered), ``small_delivered=``, ``small_latency_max_s=``, ``resets=``, ``failures=``.

Reproduce (from the repo root, ~10 minutes with the defaults):
  .venv/bin/python bench/s3_link.py [--rate 12000] [--reset-s 120] [--sizes 500000,1000000,2000000] [--max-s 600]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from beemond import config, ipc  # noqa: E402
from beemond.bundle import crypto  # noqa: E402
from beemond.spool import Spool  # noqa: E402
from beemond.upload.uploader import Uploader  # noqa: E402
from conftest import make_config  # noqa: E402
from link_proxy import LinkProxy  # noqa: E402
from s3_peers import ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFS  # noqa: E402

from field_upload import _bundle, _stamp  # noqa: E402  (bundles sealed as bench/field_upload.py seals them)


def drain(events) -> None:
    """Read the uploader's events as the orchestrator would (a full pipe would block it)."""
    try:
        while True:
            events.recv()
    except (EOFError, OSError):
        return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=12_000, help="link bytes/s each way")
    ap.add_argument("--reset-s", type=float, default=120)
    ap.add_argument("--sizes", default="500000,1000000,2000000", help="one large bundle of each size (bytes)")
    ap.add_argument("--small-every-s", type=float, default=60)
    ap.add_argument("--max-s", type=float, default=600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-link-"))
    _ident, rcpt, _ = crypto.keygen(tmp / "keys")
    secret = tmp / "secret"
    secret.write_text(SECRET_KEY + "\n")
    weed = SeaweedFS(tmp / "weed").start()
    proxy = LinkProxy(weed.port, rate=args.rate, reset_every_s=args.reset_s).start()
    try:
        cfg = config.load(make_config(tmp, {"recipient": rcpt}, secret, 0, **{
            "daemon.spool_dir": str(tmp / "spool"), "upload.layout": "{{ sensor }}/{{ name }}",
            "upload.protocol": "s3", "upload.endpoint": f"http://127.0.0.1:{proxy.port}", "upload.bucket": BUCKET,
            "upload.user": ACCESS_KEY, "upload.remote_dir": "field", "upload.timeout_s": 30,
            "upload.backoff_initial_s": 2, "upload.backoff_max_s": 30, "daemon.heartbeat_interval_s": 5}))
        outbox = Spool(cfg.spool).outbox
        outbox.mkdir(parents=True)
        sizes = [int(x) for x in args.sizes.split(",")]
        large = {_bundle(outbox, _stamp(i), "hive_audio", size): size for i, size in enumerate(sizes)}
        commands: queue.Queue = queue.Queue()
        events_r, events_w = multiprocessing.Pipe(duplex=False)
        up = Uploader(cfg, ipc.Channel("uploader", commands, events_w, cfg.daemon.heartbeat_interval_s))
        threading.Thread(target=drain, args=(events_r,), daemon=True).start()
        runner = threading.Thread(target=up.run, daemon=True)
        t0 = time.monotonic()
        runner.start()
        small: dict[tuple[str, str], float] = {}
        arrived: dict[str, float] = {}
        next_small, i = t0 + args.small_every_s, 1000
        while time.monotonic() < t0 + args.max_s:
            now = time.monotonic()
            if now >= next_small:
                small[_bundle(outbox, _stamp(i), "climate", 3000)] = now
                i, next_small = i + 1, next_small + args.small_every_s
            _status, body = weed.request("GET", "", "list-type=2&prefix=field/")   # not through the proxy
            for key in re.findall(rb"<Key>([^<]+)</Key>", body):
                arrived.setdefault(key.decode().rsplit("/", 1)[-1], time.monotonic() - t0)
            if all(n in arrived for n, _d in large) and all(n in arrived for n, _d in small):
                break
            time.sleep(1)
        commands.put(ipc.Shutdown())
        runner.join(60)
        objects = {k.rsplit("/", 1)[-1]: v for k, v in weed.objects("field/").items()}
        ok = {size: objects.get(name) == digest for (name, digest), size in large.items()}
        for (name, _d), size in large.items():
            print(f"{size:>9} bytes: {'delivered after %.0f s' % arrived[name] if ok[size] else 'NOT delivered'}")
        small_ok = sum(objects.get(n) == d for n, d in small)
        latencies = [arrived[n] - (t - t0) for (n, _d), t in small.items() if n in arrived]
        got = sum(size for size, good in ok.items() if good) + 3000 * small_ok
        print(f"s3_link_delivered={'/'.join(str(s) for s, good in ok.items() if good) or 'none'} "
              f"s3_link_largest_delivered={max([s for s, good in ok.items() if good], default=0)} "
              f"s3_link_fits_bytes={int(args.rate * args.reset_s)} "
              f"s3_link_overhead={proxy.sent_up / got if got else float('inf'):.2f} "
              f"small_delivered={small_ok}/{len(small)} small_latency_max_s={max(latencies, default=0):.0f} "
              f"resets={proxy.resets} failures={up.counts['failures']} rate={args.rate} reset_s={args.reset_s:g}")
        return 0
    finally:
        proxy.stop()
        weed.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
