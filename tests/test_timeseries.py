"""`beemond ingest --push URL` into a real VictoriaMetrics (Debian's victoria-metrics on 127.0.0.1), values
queried back, a late backlog included; and every query of the Grafana fleet dashboard
(contrib/grafana/beemond-fleet.json) run against that data and checked."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from beemond.core import clock
from beemond.core.names import utc_stamp
from conftest import free_port, wait_for
from test_lab import cli, lab, seal  # noqa: F401  (lab: the fixture)

VM = shutil.which("victoria-metrics")
DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "beemond-fleet.json"
T0 = datetime(2021, 6, 19, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def vm(tmp_path):
    if VM is None:
        pytest.fail("victoria-metrics is not installed: run scripts/setup")
    port = free_port()
    proc = subprocess.Popen([VM, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={tmp_path / 'vm'}",
                             "-retentionPeriod=100y", "-search.latencyOffset=0s"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "vm.log", "w"))
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return urllib.request.urlopen(url + "/health", timeout=2).read() == b"OK"
        except OSError:
            return False
    try:
        wait_for(ready, 30, "victoria-metrics ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, expr: str, at: datetime) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "time": f"{at.timestamp():.3f}"})
    body = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=30).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def series(url: str, metric: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every stored sample of *metric*: {(host, sensor): [(ms, value)]} from /api/v1/export."""
    q = urllib.parse.urlencode({"match[]": metric})
    out = {}
    for line in urllib.request.urlopen(f"{url}/api/v1/export?{q}", timeout=30).read().decode().splitlines():
        s = json.loads(line)
        key = (s["metric"]["host"], s["metric"]["sensor"])
        out.setdefault(key, []).extend(zip(s["timestamps"], s["values"]))
    return {k: sorted(v) for k, v in out.items()}


def rows(times, cols: dict[str, list[float]]) -> bytes:
    names = list(cols)
    return ("time," + ",".join(names) + "\n" + "".join(
        clock.utc_iso(t) + "," + ",".join(f"{cols[n][i]:.2f}" for n in names) + "\n"
        for i, t in enumerate(times))).encode()


def fleet_records(start: datetime, n: int, skip: range = range(0)):
    """Per host: minute readings from *start*, the minutes in *skip* missing (a gap)."""
    times = [start + timedelta(minutes=i) for i in range(n) if i not in skip]
    recs = {
        "hive-07": [("hive_climate", rows(times, {"temperature_c": [30 + i / 10 for i in range(len(times))],
                                                  "humidity_rh": [55 + i / 20 for i in range(len(times))]})),
                    ("hive_scale", rows(times, {"weight_kg": [42 - i / 100 for i in range(len(times))]}))],
        "hive-08": [("hive_climate", rows(times, {"temperature_c": [28 + i / 10 for i in range(len(times))],
                                                  "humidity_rh": [60 + i / 20 for i in range(len(times))]})),
                    ("hive_co2", rows(times, {"co2_ppm": [800 + i for i in range(len(times))]}))],
    }
    t0, t1 = clock.utc_iso(times[0]), clock.utc_iso(times[-1])
    return {host: [(sensor, f"{sensor}_{utc_stamp(times[0])}.csv", body, t0, t1, {}) for sensor, body in rs]
            for host, rs in recs.items()}


def csv_values(out: Path, column: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    got = {}
    for p in out.glob("hive-*/*/*/hive-*@*.csv"):
        table = list(csv.reader(open(p)))
        if column not in table[0]:
            continue
        i = table[0].index(column)
        key = (p.name.split("@")[0], p.parent.name)
        got.setdefault(key, []).extend((int(clock.parse_iso(r[0]).timestamp() * 1000), float(r[i])) for r in table[1:])
    return {k: sorted(v) for k, v in got.items()}


def test_push_to_victoria_metrics_and_every_dashboard_query(tmp_path, lab, vm):  # noqa: F811
    # Today's readings first; the backlog of an hour earlier (a device that was offline) in a later run.
    for host, recs in fleet_records(T0, 60, skip=range(20, 35)).items():
        seal(tmp_path, lab, host, recs)
    first = cli("ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"],
                "--out", lab["out"], "--push", vm + "/write", "--jobs", "2")
    assert first.returncode == 0 and "reading(s) pushed" in first.stdout, first.stdout + first.stderr
    for host, recs in fleet_records(T0 - timedelta(hours=1), 30).items():
        seal(tmp_path, lab, host, recs)
    late = cli("ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"],
               "--out", lab["out"], "--push", vm + "/write")
    assert late.returncode == 0 and "ingested 2 bundle(s)" in late.stdout and "120 reading(s) pushed" in late.stdout, late.stdout + late.stderr
    urllib.request.urlopen(vm + "/internal/force_flush", timeout=30).read()

    for column in ("temperature_c", "humidity_rh", "weight_kg", "co2_ppm"):
        want = csv_values(lab["out"], column)
        wait_for(lambda: series(vm, f"beemond_{column}") == want, 30, f"beemond_{column} in VictoriaMetrics")
    assert len(csv_values(lab["out"], "temperature_c")[("hive-07", "hive_climate")]) == 45 + 30

    # Every dashboard query, with $host = All, checked against the data pushed above.
    dash = json.loads(DASHBOARD.read_text())
    exprs = {p["title"]: p["targets"][0]["expr"].replace("$host", ".*") for p in dash["panels"]}
    assert len(exprs) == len(dash["panels"]) == 7
    end = T0 + timedelta(minutes=59)
    temps = csv_values(lab["out"], "temperature_c")
    checks = {"Hive temperature": "temperature_c", "Hive humidity": "humidity_rh", "Hive weight": "weight_kg",
              "CO2": "co2_ppm"}
    for title, column in checks.items():
        want = csv_values(lab["out"], column)
        for (host, _sensor), samples in want.items():
            for ms, value in samples[::7]:  # each value at its own time, late backlog included
                got = query(vm, exprs[title], datetime.fromtimestamp(ms / 1000, timezone.utc))
                got = {r["metric"]["host"]: float(r["value"][1]) for r in got}
                assert got[host] == pytest.approx(value), (title, host, ms)
    # readings per hour: the gap of 15 minutes shows as 45 in the last hour, 30 in the backlog hour's half
    per_hour = {r["metric"]["host"]: float(r["value"][1]) for r in query(vm, exprs["Readings per hour (gaps show as dips)"], end)}
    want_count = {h: sum(1 for ms, _ in temps[(h, "hive_climate")] if end.timestamp() * 1000 - 3_600_000 < ms
                         <= end.timestamp() * 1000) for h in ("hive-07", "hive-08")}
    assert per_hour == want_count == {"hive-07": 45, "hive-08": 45}
    last = {r["metric"]["host"]: float(r["value"][1]) for r in query(vm, exprs["Fleet: last reading per hive"], end)}
    assert last == {h: float(temps[(h, "hive_climate")][-1][0]) for h in ("hive-07", "hive-08")}
    hives = query(vm, exprs["Hives reporting"], end)
    assert [float(r["value"][1]) for r in hives] == [2.0]
    # the host variable's query lists the fleet
    q = urllib.parse.urlencode({"match[]": "beemond_temperature_c", "start": f"{(T0 - timedelta(hours=2)).timestamp():.0f}"})
    labels = json.loads(urllib.request.urlopen(f"{vm}/api/v1/label/host/values?{q}", timeout=30).read())["data"]
    assert dash["templating"]["list"][1]["query"]["query"] == "label_values(beemond_temperature_c, host)"
    assert sorted(labels) == ["hive-07", "hive-08"]


def test_a_push_that_fails_is_kept_and_sent_by_the_next_run(tmp_path, lab, vm):  # noqa: F811
    for host, recs in fleet_records(T0, 10).items():
        seal(tmp_path, lab, host, recs)
    args = ("ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"], "--out", lab["out"])
    dead = f"http://127.0.0.1:{free_port()}/write"  # nothing listens there
    r = cli(*args, "--push", dead)
    assert r.returncode == 1 and "push failed (kept for the next run)" in r.stderr, r.stdout + r.stderr
    assert "0 reading(s) pushed" in r.stdout and len(list((lab["out"] / ".push-pending").glob("*.lp"))) >= 1
    again = cli(*args, "--push", vm + "/write")  # nothing new to ingest; the kept readings go now
    assert again.returncode == 0 and "40 reading(s) pushed" in again.stdout, again.stdout + again.stderr
    assert not list((lab["out"] / ".push-pending").glob("*.lp"))
    urllib.request.urlopen(vm + "/internal/force_flush", timeout=30).read()
    want = csv_values(lab["out"], "temperature_c")
    wait_for(lambda: series(vm, "beemond_temperature_c") == want, 30, "the kept readings in VictoriaMetrics")


def test_readings_of_a_run_killed_while_pushing_are_sent_by_the_next_run(tmp_path, lab, vm):  # noqa: F811
    import os
    import signal
    import socket
    import sys

    for host, recs in fleet_records(T0, 10).items():
        seal(tmp_path, lab, host, recs)
    args = ["ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"], "--out", lab["out"]]
    stall = socket.socket()  # answers nothing: the POST waits there until the run is killed (cron's timeout, a reboot)
    stall.bind(("127.0.0.1", 0))
    stall.listen(4)
    stall.settimeout(60)
    p = subprocess.Popen([sys.executable, "-m", "beemond", *map(str, args), "--push",
                          f"http://127.0.0.1:{stall.getsockname()[1]}/write"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        conn, _ = stall.accept()
        conn.recv(65536)  # the batch is on its way: the ledger has committed it
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        conn.close()
    finally:
        stall.close()
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    again = cli(*args, "--push", vm + "/write")  # nothing new to ingest; the killed run's readings go now
    assert again.returncode == 0 and "40 reading(s) pushed" in again.stdout, again.stdout + again.stderr
    urllib.request.urlopen(vm + "/internal/force_flush", timeout=30).read()
    want = csv_values(lab["out"], "temperature_c")
    wait_for(lambda: series(vm, "beemond_temperature_c") == want, 30, "the killed run's readings in VictoriaMetrics")
