"""MQTT telemetry through a long broker outage, with the daemon SIGKILLed in the middle of it.

A real Mosquitto on 127.0.0.1 and a subscriber with a persistent session; the daemon records the
simulated hive's climate sensor every --interval s. After a connected warm-up the broker is stopped
for --outage-s seconds (default 300, the issue's five minutes); halfway through, the whole daemon is
SIGKILLed and started again (--no-kill: not). Then the broker returns and the subscriber must receive
every reading: those held in the telemetry buffer at the end of the outage and every reading of every
sealed record (decrypted with the stock age CLI), each with its original time.

Prints, last line: ``outage_s= readings_in_outage= catch_up_s= lost= duplicates= telemetry_pss_mb=
telemetry_rss_mb= buffer_bytes=``. PSS/RSS: the telemetry worker's largest over the run
(/proc/PID/smaps_rollup), connected and buffering.

Reproduce (from the repo root):  .venv/bin/python bench/telemetry.py [--outage-s 300] [--interval 1]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from beemond.bundle import crypto  # noqa: E402
from beemond.spool import Spool  # noqa: E402
from beemond.telemetry.messages import iso  # noqa: E402
from conftest import Daemon, climate_rows, decrypt_with_age, free_port, make_config  # noqa: E402
from mqtt_peers import Mosquitto, Subscriber, wait_until  # noqa: E402


def buffered(spool: Path) -> tuple[set[str], int]:
    times, size = set(), 0
    for seg in sorted(Spool(spool).telemetry.glob("*.jsonl")):
        data = seg.read_bytes()
        size += len(data)
        times |= {iso(json.loads(x)["time"]) for x in data.splitlines() if b'"hive_climate"' in x}
    return times, size


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in kB from /proc/PID/smaps_rollup; (0, 0) once the process is gone."""
    got = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                got[key] = int(rest.split()[0])
    except OSError:
        return 0, 0
    return got.get("Pss", 0), got.get("Rss", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outage-s", type=float, default=300.0)
    ap.add_argument("--interval", type=float, default=1.0, help="climate interval_s")
    ap.add_argument("--no-kill", action="store_true", help="do not SIGKILL the daemon during the outage")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="beemond-telemetry-"))
    started: list = []   # the broker, subscriber and daemons, stopped whatever happens
    try:
        return run(args, tmp, started)
    finally:
        for peer in reversed(started):
            (peer.kill_tree if isinstance(peer, Daemon) else peer.close if isinstance(peer, Subscriber) else peer.stop)()
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path, started: list) -> int:
    ident, rcpt, _public = crypto.keygen(tmp / "keys")
    keys = {"identity": ident, "recipient": rcpt}
    pw = tmp / "pw"
    pw.write_text("x\n")
    port = free_port()
    broker = Mosquitto(tmp / "mosquitto", port).start()
    sub = Subscriber(port, "beemond/#")
    started += [broker, sub]
    wait_until(lambda: sub.client.is_connected(), 10, "the subscriber")
    off = {f"sensors.{s}.enabled": False for s in ("hive_air", "hive_frames", "hive_audio", "hive_cam", "hive_gpio", "hive_scale")}
    off.update({f"processors.{p}.enabled": False for p in ("hive_bands", "hive_swarm")})
    cfg = make_config(tmp, keys, pw, 0, **off, **{
        "upload.protocol": "none", "daemon.host": "benchhive",
        "sensors.hive_climate.interval_s": args.interval, "sensors.hive_climate.record_window_s": 10,
        "telemetry": {"enabled": True, "broker": "127.0.0.1", "port": port, "reconnect_max_s": 5}})
    spool = tmp / "spool"
    peak = [0, 0]

    def sample_memory(d: Daemon) -> None:
        pids = [int(m) for m in re.findall(r"started worker telemetry \(telemetry, pid (\d+)\)", d.log())]
        if pids:
            pss, rss = memory_kb(pids[-1])
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)

    def run_for(d: Daemon, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sample_memory(d)
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))

    d = Daemon(cfg, tmp / "run1.log")
    started.append(d)
    d.wait_log(r"telemetry: connected to", timeout=60)
    run_for(d, 15)
    broker.stop()
    t_out = time.monotonic()
    print(f"broker stopped for {args.outage_s:g} s", flush=True)
    buffer_bytes = 0
    if not args.no_kill:
        run_for(d, args.outage_s / 2)
        held_before_kill, _ = buffered(spool)
        d.kill_tree()
        print(f"daemon SIGKILLed with {len(held_before_kill)} climate reading(s) buffered; restarting it", flush=True)
        d = Daemon(cfg, tmp / "run2.log")
        started.append(d)
    run_for(d, max(0.0, args.outage_s - (time.monotonic() - t_out)))
    held, buffer_bytes = buffered(spool)
    broker.start()
    t_back = time.monotonic()
    wait_until(lambda: held <= {s["time"] for s in sub.states("hive_climate")}, max(120.0, args.outage_s),
               "every reading held during the outage to reach the subscriber")
    catch_up = time.monotonic() - t_back
    run_for(d, 5)
    assert d.terminate() == 0, "the daemon did not stop cleanly"
    time.sleep(1)
    states = sub.states("hive_climate")
    received = {(s["time"], f"{s['values']['temperature_celsius']:.2f}", f"{s['values']['relative_humidity_percent']:.2f}")
                for s in states}
    recorded = set()
    for bundle in Spool(spool).bundles():
        recorded |= set(climate_rows(decrypt_with_age(bundle, ident)["members"]))
    lost = len(recorded - received) + len(held - {s["time"] for s in states})
    duplicates = len(states) - len({s["time"] for s in states})
    print(f"recorded {len(recorded)} readings in sealed records; subscriber got {len(states)} messages")
    print(f"outage_s={args.outage_s:g} readings_in_outage={len(held)} catch_up_s={catch_up:.1f} lost={lost} "
          f"duplicates={duplicates} telemetry_pss_mb={peak[0] / 1024:.1f} telemetry_rss_mb={peak[1] / 1024:.1f} "
          f"buffer_bytes={buffer_bytes}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
