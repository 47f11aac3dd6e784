"""Health: /metrics scraped over HTTP from the real daemon and linted with promtool, `beemond status`
against the running daemon (a worker in backoff included), the collector's staleness rule, and the
Grafana dashboard's queries against a scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from beemond import config, ipc
from beemond.core import clock
from beemond.supervisor import metrics
from beemond.supervisor.state import WorkerProcess, WorkerState

from conftest import ROOT, free_port, make_config, wait_for

PROMTOOL = shutil.which("promtool", path=str(ROOT / ".venv" / "bin")) or shutil.which("promtool")
DASHBOARD = ROOT / "contrib" / "grafana" / "beemond.json"


def promtool_check(text: str) -> None:
    if PROMTOOL is None:
        print("promtool not found (scripts/setup puts it in .venv/bin): lint skipped")
        return
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def samples(text: str) -> dict[str, list]:
    """metric sample name -> [(labels, value)]"""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def beemond(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beemond", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# ------------------------------------------------------------------------------------------ daemon

@pytest.mark.slow
def test_scrape_status_and_processor_against_the_running_daemon(tmp_path, keys, password_file, ftp, daemons):
    port = free_port()
    # The scale replays a swarm, looped: 3 s at 45 kg, 3 s at 42 kg (hive_swarm: drop_kg 1, window_s 10),
    # so the detector sees a drop however late its worker starts.
    swarm_csv = tmp_path / "swarm.csv"
    swarm_csv.write_text("time,weight_kg\n" + "".join(
        f"2021-06-19T11:{i // 2:02d}:{30 * (i % 2):02d}Z,{45.0 if i < 12 else 42.0}\n" for i in range(24)))
    # The climate sensor is an SHT3x on a bus that does not exist: it fails at every start and spends
    # its time in backoff, while the audio sensor, its band-power processor and the upload carry on.
    cfg = make_config(tmp_path, keys, password_file, ftp.port, **{
        "sensors.hive_scale.simulation": None, "sensors.hive_scale.replay": {"file": str(swarm_csv), "loop": True},
        "sensors.hive_scale.interval_s": 0.25, "sensors.hive_scale.samples": 1,
        "sensors.hive_scale.record_window_s": 2,
        "metrics.port": port, "daemon.crash_loop_limit": 50, "daemon.restart_backoff_initial_s": 4,
        "daemon.restart_backoff_max_s": 4,
        "sensors.hive_climate.backend": "hardware", "sensors.hive_climate.bus": 250,
        "sensors.hive_climate.replay": None,
        "processors.hive_bands.type": "audio_bands", "processors.hive_bands.sensor": "hive_audio",
        "processors.hive_bands.bands": ["100-300", "300-600"]})
    d = daemons(cfg, tmp_path / "daemon.log")
    d.wait_log(r"metrics on http://127\.0\.0\.1:%d/metrics" % port)
    d.wait_log(r"uploaded \S+", timeout=30)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()

    def scraped_all():
        t = scrape()
        alerted = [v for labels, v in samples(t).get("beemond_alerts_total", []) if labels["alert"] == "swarm"]
        return t if ("beemond_audio_band_power_ratio" in t and "beemond_last_upload_timestamp_seconds" in t
                     and alerted and alerted[0] >= 1) else None

    text = wait_for(scraped_all, 20, "band power, an upload and a swarm alert in a scrape")
    promtool_check(text)
    got = samples(text)
    bands = {s[0]["band"]: s[1] for s in got["beemond_audio_band_power_ratio"]}
    assert bands["100-300"] > 5 * bands["300-600"], "the simulated 250 Hz hum sits in 100-300 Hz"
    assert all(s[0]["host"] == "demo-hive" and s[0]["sensor"] == "hive_audio" for s in got["beemond_audio_rms_ratio"])
    records = {s[0]["sensor"]: s[1] for s in got["beemond_records_total"]}
    assert records["hive_audio"] >= 1 and records["hive_bands"] >= 1
    assert {s[0]["worker"]: s[1] for s in got["beemond_worker_up"]}["hive_bands"] == 1
    assert got["beemond_uploaded_files_total"][0][1] >= 1 and got["beemond_uploaded_bytes_total"][0][1] > 0
    assert 0 <= got["beemond_seconds_since_last_upload"][0][1] < 60
    temperatures = got.get("beemond_temperature_celsius", [])
    assert not [s for s in temperatures if s[0]["sensor"] == "hive_climate"], "a sensor that never read exports no reading"
    # the simulated DS18B20 probes: one series per position
    assert {s[0].get("position") for s in temperatures if s[0]["sensor"] == "hive_frames"} == {"brood", "middle", "top"}
    assert got["beemond_weight_grams"][0][1] in (42_000, 45_000), "the replayed scale's kg, in grams"
    assert {s[0]["worker"]: s[1] for s in got["beemond_worker_up"]}["hive_swarm"] == 1
    # the replayed drop: an alert counted, a warning logged (its JSON record is checked at the server below)
    assert [s[0] for s in got["beemond_alerts_total"]] == [{"host": "demo-hive", "sensor": "hive_scale", "alert": "swarm"}]
    d.wait_log(r"hive_swarm WARNING SWARM ALERT on hive_scale: weight fell 3\.00 kg \(45\.00 -> 42\.00 kg\)")
    # beemond.core.clock's answer, the same one the records' clock_synchronized metadata carries
    assert got["beemond_clock_synchronised"] == [({"host": "demo-hive"}, float(clock.synchronized()))]

    # status: the climate worker in backoff, with its restarts and last error
    def climate_in_backoff():
        res = beemond("status", "--json", "--config", str(cfg))
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        w = {w["name"]: w for w in st["workers"]}
        return st if w["hive_climate"]["state"] == "backoff" and w["hive_climate"]["restarts"] >= 1 else None

    st = wait_for(climate_in_backoff, 20, "hive_climate in backoff after a restart")
    w = {w["name"]: w for w in st["workers"]}
    assert 0 < w["hive_climate"]["restart_in_s"] <= 4
    assert {n: w[n]["state"] for n in ("aggregator", "uploader", "hive_audio", "hive_bands")} == dict.fromkeys(
        ("aggregator", "uploader", "hive_audio", "hive_bands"), "running")
    assert w["hive_audio"]["readings"]["audio_band_power_ratio{band=100-300}"]["value"] == pytest.approx(
        bands["100-300"], rel=0.5)
    assert st["host"] == "demo-hive" and st["uploaded"]["files"] >= 1 and st["last_upload"].endswith("Z")
    restarts = {s[0]["worker"]: s[1] for s in samples(scrape())["beemond_worker_restarts_total"]}
    assert restarts["hive_climate"] >= 1 and restarts["hive_audio"] == 0

    human = beemond("status", "--config", str(cfg))
    assert human.returncode == 0, human.stderr
    assert re.search(r"^  hive_climate\s+sensor\s+(backoff \(restart in \d+ s\)|running)\s+restarts \d+", human.stdout, re.M)
    assert re.search(r"^  hive_bands\s+processor\s+running", human.stdout, re.M)
    assert re.search(r"^backlog: staging \d+ record\(s\), .*; outbox \d+ bundle\(s\)", human.stdout, re.M)
    assert re.search(r"^last upload: \d{4}-\d\d-\d\dT.*Z \(\d+ s ago\); uploaded \d+ bundle", human.stdout, re.M)

    # pause / resume by command: the audio sensor closes its segment and stops, then records again
    res = beemond("pause", "hive_audio", "--config", str(cfg))
    assert res.returncode == 0 and res.stdout.strip() == "paused hive_audio", res.stderr
    d.wait_log(r"hive_audio INFO capture stopped by command")
    assert re.search(r"^  hive_audio\s+sensor\s+paused", beemond("status", "--config", str(cfg)).stdout, re.M)
    assert beemond("resume", "hive_audio", "--config", str(cfg)).returncode == 0
    d.wait_log(r"hive_audio INFO capture started by command")
    bad = beemond("pause", "uploader", "--config", str(cfg))
    assert bad.returncode == 1 and "no sensor or processor 'uploader' (have: hive_climate, " in bad.stderr
    assert "hive_audio" in bad.stderr.split("(have:")[1]

    assert d.terminate() == 0, d.log()
    gone = beemond("status", "--config", str(cfg))
    assert gone.returncode == 3 and "beemond is not running" in gone.stderr
    assert not (tmp_path / "spool" / "status.sock").exists()
    assert not (tmp_path / "spool" / "processing" / "hive_bands").exists() or \
        not any((tmp_path / "spool" / "processing" / "hive_bands").iterdir()), "every record handed over was processed"

    # The processor's JSON records travelled in the bundles.
    from beemond.bundle import crypto, format as bundle_format

    ids = crypto.load_identities(str(keys["identity"]))
    found, alerts = [], []
    for b in ftp.bundles():
        man = bundle_format.extract_bundle(b, ids, tmp_path / "out" / b.name)
        found += [r for r in man["records"] if r["sensor"] == "hive_bands"]
        alerts += [r for r in man["records"] if r["sensor"] == "hive_swarm"]
    assert found, "band-power records reach the server"
    assert alerts, "swarm alert records reach the server"
    alert = json.loads(next((tmp_path / "out").rglob(Path(alerts[0]["path"]).name)).read_text())
    assert alert["source"] == "hive_scale" and alert["result"]["alert"] == "swarm"
    assert alert["result"]["drop_kg"] == pytest.approx(3.0)
    body = json.loads((tmp_path / "out").rglob(Path(found[0]["path"]).name).__next__().read_text())
    assert body["source"] == "hive_audio" and set(body["result"]["bands"]) == {"100-300", "300-600"}


def test_status_without_a_daemon_exits_3(tmp_path, keys, password_file):
    cfg = make_config(tmp_path, keys, password_file, 21)
    res = beemond("status", "--config", str(cfg))
    assert res.returncode == 3
    assert res.stderr.strip() == f"beemond is not running (no daemon answers on {tmp_path / 'spool' / 'status.sock'})"


# ------------------------------------------------------------------------------------------ in process

@pytest.fixture
def health(tmp_path, keys, password_file):
    path = make_config(tmp_path, keys, password_file, 21, **{
        "metrics.staleness_s": 1,
        "processors.bands": {"type": "audio_bands", "sensor": "hive_audio"},
        "processors.swarm": {"type": "swarm", "sensor": "hive_scale"}})
    cfg = config.load(path)
    workers = {name: WorkerProcess(role, name, state=WorkerState.RUNNING, starts=1) for role, name in
               [("aggregator", "aggregator"), ("uploader", "uploader"), ("sensor", "hive_climate"),
                ("sensor", "hive_audio"), ("sensor", "hive_scale"), ("processor", "bands"), ("processor", "swarm")]}
    workers["hive_scale"].state, workers["hive_scale"].starts = WorkerState.BACKOFF, 3
    h = metrics.Health(cfg, workers)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(h)
    feed = [(workers["hive_climate"], ipc.Sample(worker='hive_climate', sensor="hive_climate", values={"temperature_celsius": 34.5, "relative_humidity_percent": 61.0})),
            (workers["hive_scale"], ipc.Sample(worker='hive_scale', sensor="hive_scale", values={"weight_kilograms": 41.2, "pressure_pascals": 101325.0})),
            (workers["bands"], ipc.Sample(worker='bands', sensor="hive_audio", values={"audio_band_power_ratio": 0.01}, labels={"band": "100-300"})),
            (workers["bands"], ipc.Sample(worker='bands', sensor="hive_audio", values={"audio_rms_ratio": 0.1})),
            (workers["swarm"], ipc.Sample(worker='swarm', sensor="hive_scale", values={"swarm_drop_kilograms": 0.2})),
            (workers["hive_audio"], ipc.RecordWritten(worker='hive_audio', sensor="hive_audio", path="x", overflows=2)),
            (workers["hive_scale"], ipc.Error(worker='hive_scale', message="no bus")),
            (workers["uploader"], ipc.Error(worker='uploader', message="upload failed: 421")),
            (workers["uploader"], ipc.Uploaded(worker='uploader', name="b", bytes=1234)),
            (workers["swarm"], ipc.Alert(worker='swarm', sensor="hive_scale", alert="swarm"))]
    for w, ev in feed:
        h(w, ev)
    return h, registry


def test_collector_counts_events_and_drops_stale_readings(health):
    h, registry = health
    text = generate_latest(registry).decode()
    promtool_check(text)
    got = samples(text)
    # weight_kilograms samples are exported in Prometheus's base unit for mass
    assert got["beemond_weight_grams"] == [({"host": "demo-hive", "sensor": "hive_scale"}, 41200.0)]
    assert "beemond_weight_kilograms" not in got
    assert got["beemond_audio_band_power_ratio"][0][0]["band"] == "100-300"
    assert {s[0]["sensor"]: s[1] for s in got["beemond_audio_overflows_total"]} == {"hive_audio": 2}
    assert {s[0]["worker"]: s[1] for s in got["beemond_errors_total"]} == {"hive_scale": 1, "uploader": 1}
    assert got["beemond_upload_errors_total"][0][1] == 1 and got["beemond_uploaded_bytes_total"][0][1] == 1234
    assert got["beemond_alerts_total"] == [({"host": "demo-hive", "sensor": "hive_scale", "alert": "swarm"}, 1)]
    assert {s[0]["worker"]: s[1] for s in got["beemond_worker_restarts_total"]}["hive_scale"] == 2
    # A StateSet: prometheus_client names the state label after the metric.
    state = {(s[0]["worker"], s[0]["beemond_worker_state"]): s[1] for s in got["beemond_worker_state"]}
    assert state[("hive_scale", "backoff")] == 1 and state[("hive_scale", "running")] == 0
    assert {st for _w, st in state} == {s.value for s in WorkerState}
    assert all(sum(v for (w, _s), v in state.items() if w == name) == 1 for name in health[0].workers)
    # staleness_s = 1: the readings vanish, the counters stay
    def stale_gone():
        t = generate_latest(registry).decode()
        return t if "beemond_weight_grams" not in t else None

    later = wait_for(stale_gone, 5, "stale readings to drop out")
    assert "beemond_temperature_celsius" not in later and "beemond_audio_rms_ratio" not in later
    assert 'beemond_records_total{host="demo-hive",sensor="hive_audio"} 1.0' in later


def test_worker_state_never_reads_all_zero_during_a_reload(health):
    """A worker stopping to restart with a new config, and one leaving it, each read 1 in their state."""
    h, registry = health
    h.workers["hive_climate"].state = WorkerState.RESTARTING
    h.workers["hive_audio"].state = WorkerState.REMOVING
    text = generate_latest(registry).decode()
    promtool_check(text)
    state = {(s[0]["worker"], s[0]["beemond_worker_state"]): s[1] for s in samples(text)["beemond_worker_state"]}
    assert state[("hive_climate", "restarting")] == 1 and state[("hive_audio", "removing")] == 1
    for name in h.workers:
        assert sum(v for (w, _s), v in state.items() if w == name) == 1, name


def test_grafana_dashboard_parses_and_queries_only_exported_metrics(health):
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("temperature", "humidity", "weight", "band power", "backlog", "uploads", "restarts"):
        assert word in titles, word
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs.append(variables["host"]["definition"])
    queried = {m for e in exprs for m in re.findall(r"\bbeemond_[a-z0-9_]+", e)}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    exported = set(samples(generate_latest(health[1]).decode()))
    missing = queried - exported
    assert not missing, f"the dashboard queries metrics the daemon does not export: {sorted(missing)}"


def test_clock_and_outbox_series_follow_beemond_clock_and_the_uploaders_outbox_events(tmp_path, keys, password_file):
    flag = tmp_path / "timesync-synchronized"   # systemd-timesyncd's flag file, as beemond.core.clock reads it
    cfg = config.load(make_config(tmp_path, keys, password_file, 21))
    uploader = WorkerProcess("uploader", "uploader", state=WorkerState.RUNNING, starts=1)
    h = metrics.Health(cfg, {"uploader": uploader}, clock_check=lambda: clock.synchronized(str(flag)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(h)
    outbox = tmp_path / "spool" / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    (outbox / "demo-hive_20260101T000000Z_all_0123456789ab.tar.age").write_bytes(b"x" * 321)

    def scrape():
        text = generate_latest(registry).decode()
        promtool_check(text)
        return samples(text)

    # No flag file: the kernel's adjtimex state decides, the same answer records carry in their metadata.
    assert scrape()["beemond_clock_synchronised"][0][1] == int(clock.synchronized(str(flag)))
    flag.touch()
    assert scrape()["beemond_clock_synchronised"][0][1] == 1
    assert h.status()["clock"]["synchronised"] is True

    # The outbox series are the uploader's own count (ipc.OUTBOX), not a walk of the directory...
    h(uploader, ipc.Outbox(worker='uploader', files=7, bytes=7000, last_upload=1.7e9))
    got = scrape()
    assert got["beemond_outbox_files"][0][1] == 7 and got["beemond_outbox_bytes"][0][1] == 7000
    assert got["beemond_last_upload_timestamp_seconds"][0][1] == 1.7e9
    # ...while the uploader runs. Down, its last word goes stale: the directory is counted instead.
    uploader.state = WorkerState.BACKOFF
    got = scrape()
    assert got["beemond_outbox_files"][0][1] == 1 and got["beemond_outbox_bytes"][0][1] == 321


def test_metrics_port_in_use_is_logged_and_the_daemon_records_on(tmp_path, keys, password_file, caplog):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{"metrics.port": port}))
        h = metrics.Health(cfg, {})
        with caplog.at_level("ERROR", logger="beemond.supervisor.metrics"):
            h.start_http()  # must not raise: /metrics is a convenience, recording is the job
        assert h.http is None
        assert f"metrics: cannot listen on 127.0.0.1:{port} (Address already in use); /metrics is off" in caplog.text
        h.stop_http()
