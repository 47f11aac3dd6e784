#!/usr/bin/env python3
"""The beemond demo (run it through ``scripts/demo``, which sets up .venv first).

1. Makes a lab key pair (``beemond keygen``) and a device signing key (``beemond keygen --device``),
   and starts an FTP server (pyftpdlib) on 127.0.0.1.
2. Runs the real daemon, ``beemond run --duration SECONDS``, on ``config/simulated.toml``: every sensor
   type simulated behind its driver's seam; the SHT3x, BME280 and DS18B20 replay real in-hive
   temperature and humidity of UrBAN hives (``shared/data/urban-2021/README.md``; Abdollahi et al.
   2024, CC BY 4.0), with a simulated microphone, camera, GPIO button and serial scale.
3. Decrypts every bundle that reached the server, checks every manifest hash, and prints what
   arrived: bundles, records per sensor (exit 1 if a configured sensor has none; at least 30 s are
   needed for the simulated button's first press), and the first and last climate readings next to the UrBAN
   rows they replayed, then ingests the server's tree as a lab would (``beemond ingest``: signatures,
   manifest hashes, one CSV per day). Exits 1 if anything does not match.

Everything lives in ``demo-run/`` (git-ignored); each run starts with an empty spool and server.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "demo-run"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()

    from beemond.bundle import crypto, format as bundle_format
    from beemond import config as config_mod
    from beemond.sensors.replay import CsvReplay

    for sub in ("spool", "ftp-root", "received", "lab-data"):
        shutil.rmtree(RUN / sub, ignore_errors=True)
    keys = RUN / "keys"
    if not (keys / "identity.txt").exists():
        crypto.keygen(keys)
    device = RUN / "device"
    if not (device / crypto.DEVICE_KEY_NAME).exists():
        crypto.device_keygen(device, "demo-hive")
    password = RUN / "ftp-password"
    password.write_text("demo-hive-password\n")
    password.chmod(0o600)

    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "ftp_server.py"), "--root", str(RUN / "ftp-root"),
                               "--port", "0", "--password-file", str(password)], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("ready "):
            print("demo: the FTP server did not start", file=sys.stderr)
            return 1
        port = int(line.split()[1])
        print(f"demo: FTP server on 127.0.0.1:{port}, files under {RUN / 'ftp-root'}")

        source = ROOT / "config" / "simulated.toml"
        cfg = tomllib.loads(source.read_text())
        cfg["daemon"]["spool_dir"] = str(RUN / "spool")
        for sensor in cfg["sensors"].values():
            if "replay" in sensor:
                sensor["replay"]["file"] = str((source.parent / sensor["replay"]["file"]).resolve())
        cfg["bundle"]["recipients"] = [str(keys / "recipient.txt")]
        cfg["bundle"]["signing_key"] = str(device / crypto.DEVICE_KEY_NAME)
        cfg["upload"].update(port=port, password_file=str(password))
        with socket.socket() as probe:  # a free port for /metrics, so a running beemond is no obstacle
            probe.bind(("127.0.0.1", 0))
            cfg["metrics"]["port"] = probe.getsockname()[1]
        config = RUN / "beemond.toml"
        config.write_text(tomli_w.dumps(cfg))
        print(f"demo: while it runs: curl http://127.0.0.1:{cfg['metrics']['port']}/metrics, "
              f"or {sys.executable} -m beemond status --config {config}")

        print(f"demo: running beemond for {args.seconds:g} s (config {config})\n")
        status = subprocess.call([sys.executable, "-m", "beemond", "run", "--config", str(config),
                                  "--duration", str(args.seconds)])
        if status != 0:
            print(f"demo: beemond exited with status {status}", file=sys.stderr)
            return 1
    finally:
        server.terminate()
        server.wait(10)

    # ---- what reached the server
    identities = crypto.load_identities(keys / "identity.txt")
    bundles = sorted((RUN / "ftp-root").rglob("*.tar.age"))
    per_sensor: collections.Counter = collections.Counter()
    readings = []   # (time, °C, %RH, replayed row index)
    total = 0
    for b in bundles:
        out = RUN / "received" / b.name.removesuffix(".tar.age")
        manifest = bundle_format.extract_bundle(b, identities, out)  # raises on any hash mismatch
        total += b.stat().st_size
        for rec in manifest["records"]:
            per_sensor[rec["sensor"]] += 1
            if rec["sensor"] == "hive_climate":
                rows = [i for a, z in rec["metadata"]["replay"]["rows"] for i in range(a, z + 1)]
                data = list(csv.reader(io.StringIO((out / rec["path"]).read_text())))[1:]
                readings += [(t, c, h, i) for (t, c, h), i in zip(data, rows)]
    print(f"\ndemo: {len(bundles)} bundle(s), {total} bytes on the server, every manifest hash checked")
    for sensor, n in sorted(per_sensor.items()):
        print(f"  {sensor}: {n} record(s)")
    if not readings:
        print("demo: no climate readings arrived", file=sys.stderr)
        return 1
    readings.sort()
    loaded = config_mod.load(config)
    missing = [s.name for s in loaded.sensors if not per_sensor[s.name]]
    if missing:
        print(f"demo: no record arrived from {', '.join(missing)}", file=sys.stderr)
    climate = next(s for s in loaded.sensors if s.type == "sht3x")
    urban = CsvReplay.from_config(climate.replay, climate.replay_columns()).rows
    ok = True
    for label, (t, c, h, i) in (("first", readings[0]), ("last", readings[-1])):
        row = urban[i]
        same = (c, h) == (f"{row.temperature_c:.2f}", f"{row.humidity_rh:.2f}")
        ok &= same
        print(f"  {label} climate reading {t}: {c} °C {h} %RH  <- UrBAN hive 3629 at {row.time:%Y-%m-%d %H:%M:%S}Z: "
              f"{row.temperature_c:.2f} °C {row.humidity_rh:.2f} %RH  {'equal' if same else 'DIFFERENT'}")
    mismatched = sum((c, h) != (f"{urban[i].temperature_c:.2f}", f"{urban[i].humidity_rh:.2f}")
                     for _, c, h, i in readings)
    print(f"  {len(readings)} climate readings, {mismatched} differ from the replayed rows")
    print(f"\ndemo: decrypted records are in {RUN / 'received'}; "
          f"decrypt by hand with: age -d -i {keys / 'identity.txt'} BUNDLE | tar tv")

    # ---- the lab's side: verify every signature, decrypt, check, merge the readings per day
    from beemond.lab import ingest

    trusted = RUN / "trusted"  # the lab names each trusted key after its hive: demo-hive.pub signs for demo-hive
    trusted.mkdir(exist_ok=True)
    shutil.copy(device / f"{crypto.DEVICE_KEY_NAME}.pub", trusted / "demo-hive.pub")
    report = ingest.run(RUN / "ftp-root", keys / "identity.txt", trusted, RUN / "lab-data", print=lambda _l: None)
    days = sorted((RUN / "lab-data").glob("*/*/*/*@*.csv"))
    climate = [str(d.relative_to(RUN)) for d in days if d.parent.name == "hive_climate"]
    print(f"demo: beemond ingest: {len(report.ingested)} bundle(s) verified and unpacked, {len(report.rejected)} "
          f"rejected; {report.rows} rows in {len(days)} daily CSV(s), e.g. {climate[0] if climate else 'none'}")
    for name, _reason, message in report.rejected:
        print(f"  rejected {name}: {message}")
    ok &= not report.rejected
    return 0 if ok and mismatched == 0 and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
