"""MQTT live telemetry (beemond.telemetry): the durable reading buffer, the message layouts, and the
daemon against a real Mosquitto through a broker absent at start, a broker restart, and a SIGKILL of
the whole daemon during an outage: every reading reaches the subscriber with its original time."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import climate_rows, decrypt_with_age, free_port, make_config
from mqtt_peers import Mosquitto, Subscriber, mqtt_peers, wait_until  # noqa: F401 (a fixture)

from beemond.config import TelemetryConfig
from beemond.telemetry.buffer import ReadingBuffer
from beemond.telemetry.messages import Layout


def entry(i: int, sensor: str = "hive_climate", **extra) -> dict:
    return {"kind": "state", "sensor": sensor, "time": 1624060800.0 + i, "values": {"temperature_celsius": 20 + i / 100},
            **extra}


# ---- the buffer
def test_buffer_publishes_in_order_and_forgets_only_what_was_acknowledged(tmp_path):
    b = ReadingBuffer(tmp_path / "t", max_bytes=1 << 20)
    for i in range(5):
        b.append(entry(i))
    sent = [b.next_unsent() for _ in range(3)]
    assert [e["time"] for _p, e in sent] == [1624060800.0, 1624060801.0, 1624060802.0]
    b.ack(sent[1][0])            # out of order: the cursor stays at the oldest unacknowledged
    b.close()
    again = ReadingBuffer(tmp_path / "t", max_bytes=1 << 20)   # a restart (or a crash after the cursor save)
    assert again.pending == 5
    times = []
    while (item := again.next_unsent()) is not None:
        times.append(item[1]["time"])
        again.ack(item[0])
    assert times == [1624060800.0 + i for i in range(5)]
    assert again.pending == 0
    again.close()
    assert [p.name for p in (tmp_path / "t").glob("*.jsonl")] == []   # fully acknowledged segments go


def test_buffer_bound_drops_the_oldest_with_a_count_and_a_log_line(tmp_path, caplog):
    b = ReadingBuffer(tmp_path / "t", max_bytes=65536, segment_bytes=4096)
    for i in range(2000):        # ~200 kB of readings, over the 64 KiB bound
        b.append(entry(i))
    assert b.dropped > 0
    assert sum(p.stat().st_size for p in (tmp_path / "t").glob("*.jsonl")) <= 65536 + 4096
    assert b.pending + b.dropped == 2000
    first = b.next_unsent()[1]["time"]
    assert first == 1624060800.0 + b.dropped     # the newest are kept, contiguous
    assert "dropped the" in caplog.text and "2021-06-19T" in caplog.text


def test_buffer_skips_a_line_torn_by_a_power_cut(tmp_path):
    b = ReadingBuffer(tmp_path / "t", max_bytes=1 << 20)
    b.append(entry(0))
    b.append(entry(1))
    b.close()
    seg = next((tmp_path / "t").glob("*.jsonl"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])   # the last line lost its tail
    b = ReadingBuffer(tmp_path / "t", max_bytes=1 << 20)
    b.append(entry(2))           # a new start writes a new segment
    got = []
    while (item := b.next_unsent()) is not None:
        got.append(item[1]["time"])
    assert got == [1624060800.0, 1624060802.0] and b.dropped == 1


# ---- layouts
# Keys of Home Assistant's MQTT sensor discovery schema (homeassistant/components/mqtt/sensor.py
# PLATFORM_SCHEMA_MODERN + MQTT_RO_SCHEMA + MQTT_ENTITY_COMMON_SCHEMA; docs: integrations/sensor.mqtt).
HA_SENSOR_KEYS = {"name", "unique_id", "state_topic", "value_template", "state_class", "expire_after",
                  "availability", "device", "origin", "unit_of_measurement", "device_class"}
HA_DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
HA_UNITS = {"temperature": {"°C", "°F", "K"}, "humidity": {"%"}, "weight": {"kg", "g", "mg", "µg", "oz", "lb"},
            "atmospheric_pressure": {"Pa", "hPa", "kPa", "bar", "cbar", "mbar", "mmHg", "inHg", "psi"}}


def test_home_assistant_discovery_follows_the_sensor_schema():
    t = TelemetryConfig(enabled=True, broker="x")
    layout = Layout(t, "hive1", {"hive_frames": 300})
    e = {"kind": "state", "sensor": "hive_frames", "time": 1624060800.5, "labels": {"position": "top"},
         "values": {"temperature_celsius": 31.5}}
    (ctopic, cpayload), = layout.discovery(e)
    assert ctopic == "homeassistant/sensor/beemond_hive1/hive_frames_top_temperature_celsius/config"
    config = json.loads(cpayload)
    assert set(config) <= HA_SENSOR_KEYS
    assert config["device_class"] == "temperature" and config["unit_of_measurement"] in HA_UNITS["temperature"]
    assert config["state_class"] == "measurement" and config["expire_after"] == 300
    assert set(config["device"]) <= HA_DEVICE_KEYS and config["device"]["identifiers"] == ["beemond_hive1"]
    assert config["availability"] == [{"topic": "beemond/hive1/status", "payload_available": "online",
                                       "payload_not_available": "offline"}]
    (topic, payload), = layout.messages(e)
    assert topic == config["state_topic"] == "beemond/hive1/hive_frames/top/state"
    body = json.loads(payload)
    assert body == {"time": "2021-06-19T00:00:00.500Z", "values": {"temperature_celsius": 31.5},
                    "units": {"temperature_celsius": "°C"}, "labels": {"position": "top"}}
    # The value template Home Assistant will render, rendered here with Jinja2 the same way.
    import jinja2

    assert jinja2.Template(config["value_template"]).render(value_json=body) == "31.5"
    for quantity, cls in (("relative_humidity_percent", "humidity"), ("weight_kilograms", "weight"),
                          ("pressure_pascals", "atmospheric_pressure")):
        (_t, p), = layout.discovery({**e, "values": {quantity: 1.0}})
        c = json.loads(p)
        assert c["device_class"] == cls and c["unit_of_measurement"] in HA_UNITS[cls]


def test_alerts_and_the_kotori_layout():
    t = TelemetryConfig(enabled=True, broker="x")
    alert = {"kind": "alert", "sensor": "hive_scale", "time": 1624060800.0, "alert": "swarm", "drop_kg": 1.6}
    (topic, payload), = Layout(t, "hive1", {}).messages(alert)
    assert topic == "beemond/hive1/hive_scale/alert"
    assert json.loads(payload) == {"time": "2021-06-19T00:00:00.000Z", "sensor": "hive_scale", "alert": "swarm",
                                   "drop_kg": 1.6}
    k = replace(t, layout="kotori", kotori_network="alice", kotori_gateway="apiary")
    (topic, payload), = Layout(k, "hive1", {}).messages(entry(0))
    assert topic == "hiveeyes/alice/apiary/hive1/data.json"
    assert json.loads(payload) == {"time": "2021-06-19T00:00:00.000Z", "hive_climate_temperature_celsius": 20.0}
    (topic, payload), = Layout(k, "hive1", {}).messages(alert)
    assert topic == "hiveeyes/alice/apiary/hive1/event.json" and json.loads(payload)["title"] == "swarm alert on hive_scale"
    assert Layout(k, "hive1", {}).discovery(entry(0)) == []


# ---- the daemon against a real broker
def buffered_times(spool: Path) -> set[str]:
    """Times of every reading in the telemetry buffer's segments (what the daemon holds right now)."""
    from beemond.telemetry.messages import iso

    out = set()
    for seg in sorted((spool / "telemetry").glob("*.jsonl")):
        for line in seg.read_bytes().splitlines():
            e = json.loads(line)
            if e["sensor"] == "hive_climate":
                out.add(iso(e["time"]))
    return out


@pytest.mark.slow
def test_every_reading_reaches_the_subscriber_through_outages_and_a_kill(tmp_path, keys, password_file, daemons,
                                                                          mqtt_peers):
    port = free_port()
    broker = mqtt_peers.append(Mosquitto(tmp_path / "mosquitto", port).start())
    sub = mqtt_peers.append(Subscriber(port, "#"))   # its persistent session exists before the daemon publishes
    wait_until(lambda: sub.client.is_connected(), 10, "the subscriber to connect")
    broker.stop()
    off = {f"sensors.{s}.enabled": False for s in ("hive_air", "hive_audio", "hive_cam", "hive_gpio", "hive_scale")}
    off.update({f"processors.{p}.enabled": False for p in ("hive_bands", "hive_swarm")})
    cfg = make_config(tmp_path, keys, password_file, 0, **off, **{
        "upload.protocol": "none", "daemon.host": "hive1",
        "sensors.hive_frames.interval_s": 0.5, "sensors.hive_frames.record_window_s": 2,
        "telemetry": {"broker": "127.0.0.1", "port": port, "reconnect_max_s": 1}})   # a broker is all it takes
    spool = tmp_path / "spool"

    # 1. The broker is absent at start: readings wait in the spool.
    d = daemons(cfg, tmp_path / "run1.log")
    d.wait_log(r"cannot reach the broker")
    wait_until(lambda: len(buffered_times(spool)) >= 10, 30, "readings buffered while the broker is away")
    broker.start()
    early = buffered_times(spool)
    wait_until(lambda: early <= {s["time"] for s in sub.states("hive_climate")}, 30,
               "the readings buffered before the broker came to reach the subscriber")

    # 2. A broker restart with readings taken meanwhile.
    broker.stop()
    d.wait_log(r"lost the broker")
    wait_until(lambda: len(buffered_times(spool)) >= 5, 30, "readings buffered during the restart")
    broker.start()
    d.wait_log(r"connected to mqtt://", count=2)

    # 3. An outage, and the whole daemon SIGKILLed during it.
    broker.stop()
    d.wait_log(r"lost the broker", count=2)
    wait_until(lambda: len(buffered_times(spool)) >= 10, 30, "readings buffered during the outage")
    held = buffered_times(spool)
    killed_at = datetime.now(timezone.utc)
    d.kill_tree()
    broker.start()
    d2 = daemons(cfg, tmp_path / "run2.log")
    d2.wait_log(r"reading\(s\) from before the restart wait for the broker")
    wait_until(lambda: held <= {s["time"] for s in sub.states("hive_climate")}, 30,
               "the readings held at the kill to reach the subscriber")
    # The worker's metrics, linted with promtool like every other series.
    import tomllib
    import urllib.request

    from test_health import promtool_check, samples

    mport = tomllib.loads(cfg.read_text())["metrics"]["port"]

    def scrape():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:   # not listening yet
            return None
        got = samples(text)
        ok = got.get("beemond_telemetry_connected", [({}, 0)])[0][1] == 1 and \
            got.get("beemond_telemetry_published_total", [({}, 0)])[0][1] > 0
        return (text, got) if ok else None

    text, got = wait_until(scrape, 20, "telemetry metrics in a scrape")
    promtool_check(text)
    assert got["beemond_telemetry_dropped_total"][0][1] == 0
    from test_health import beemond

    assert re.search(r"^telemetry: connected, \d+ reading\(s\) waiting, \d+ published, 0 dropped$",
                     beemond("status", "--config", str(cfg)).stdout, re.M)
    assert d2.terminate() == 0

    # Every reading of every sealed record reached the subscriber, value for value, at its own time.
    received = {(s["time"], f"{s['values']['temperature_celsius']:.2f}", f"{s['values']['relative_humidity_percent']:.2f}")
                for s in sub.states("hive_climate")}
    recorded = set()
    for bundle in sorted((spool / "outbox").glob("*.tar.age")):
        recorded |= set(climate_rows(decrypt_with_age(bundle, keys["identity"])["members"]))
    assert len(recorded) >= 10
    # A reading reaches the live view through the orchestrator and the telemetry worker's buffer, which
    # is synced up to a second after it (as the sensor's own journal is): a SIGKILL in the last moments
    # before may leave a reading in the record (the journal) but not yet in the telemetry buffer. The
    # promise, as for the records (issue 11's soak), is about readings taken at least 2 s before the kill.
    def at_the_kill(t: str) -> bool:
        return killed_at - timedelta(seconds=2) < datetime.fromisoformat(t) <= killed_at
    missing = {r for r in recorded - received if not at_the_kill(r[0])}
    assert not missing, f"{len(missing)} recorded reading(s) never published, e.g. {sorted(missing)[:3]} " \
                        f"(killed at {killed_at.isoformat()})"
    one = sub.states("hive_climate")[0]
    assert one["units"] == {"temperature_celsius": "°C", "relative_humidity_percent": "%"}
    assert {s["labels"]["position"] for s in sub.states("top")} == {"top"}
    # Retained: the status ends offline (a clean stop), discovery configs stay for Home Assistant.
    retained = mqtt_peers.append(Subscriber(port, "#", client_id="late-reader"))
    wait_until(lambda: retained.received("/status"), 10, "the retained status")
    assert retained.received("/status")[-1][1] == b"offline"
    configs = wait_until(lambda: retained.received("/config"), 10, "retained discovery configs")
    assert any("hive_climate_temperature_celsius" in t for t, _p, _r in configs)
    assert os.listdir(spool / "telemetry") in (["cursor"], [])   # everything acknowledged, nothing left


def test_tls_and_a_password_from_a_systemd_credential(tmp_path, keys, password_file, monkeypatch, mqtt_peers):
    """The worker alone (as its process runs it) against a Mosquitto requiring TLS and a login."""
    import multiprocessing
    import queue
    import threading

    from beemond import config, ipc
    from beemond.telemetry.worker import TelemetryWorker
    from upload_peers import make_cert

    cert, key = make_cert(tmp_path / "tls")
    login = ("hive1", "mqtt-secret-7")
    broker = mqtt_peers.append(Mosquitto(tmp_path / "mosquitto", free_port(), tls=(cert, key), login=login).start())
    sub = mqtt_peers.append(Subscriber(broker.port, "beemond/#", ca=cert, login=login))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(login[1] + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{"daemon.host": "hive1", "telemetry": {
        "enabled": True, "broker": "127.0.0.1", "port": broker.port, "tls": True, "ca_file": str(cert),
        "user": login[0], "password_credential": "mqtt-password"}}))
    commands = queue.Queue()
    events_r, events_w = multiprocessing.Pipe(duplex=False)
    worker = TelemetryWorker(cfg, ipc.Channel("telemetry", commands, events_w, 0.5))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        commands.put(ipc.Sample(sensor="hive_climate", time=1624060800.25, values={"temperature_celsius": 34.5}))
        states = wait_until(lambda: sub.states("hive_climate"), 20, "a reading over TLS with the login")
        assert states[0]["time"] == "2021-06-19T00:00:00.250Z" and states[0]["values"] == {"temperature_celsius": 34.5}
    finally:
        commands.put(ipc.Shutdown())
        thread.join(15)
    assert not thread.is_alive()
    wait_until(lambda: sub.received("/status") and sub.received("/status")[-1][1] == b"offline", 10,
               "status offline at the clean stop")
    events = []
    while events_r.poll():
        events.append(events_r.recv())
    assert any(e.kind == ipc.TELEMETRY and e.connected == 1 for e in events)


@pytest.mark.parametrize("telemetry, key", [
    ({"enabled": True, "broker": "b", "layout": "kotori"}, "telemetry.kotori_network"),
    ({"enabled": True, "broker": "b", "topic": "beemond/+/{{ sensor }}"}, "telemetry.topic"),
    ({"enabled": True, "broker": "b", "ca_file": "/nonexistent.pem", "tls": True}, "telemetry.ca_file"),
    ({"enabled": True, "broker": "b", "qos": 2}, "telemetry.qos"),
])
def test_a_bad_telemetry_section_names_its_key(tmp_path, keys, password_file, telemetry, key):
    from beemond import config

    path = make_config(tmp_path, keys, password_file, 21, telemetry=telemetry)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.key == key


def test_a_processors_readings_are_a_series_of_their_own_and_alerts_stay_with_the_sensor():
    t = TelemetryConfig(broker="x")
    layout = Layout(t, "hive1", {"hive_swarm": 600})
    drop = {"kind": "state", "sensor": "hive_scale", "processor": "hive_swarm", "time": 1624060800.0,
            "values": {"swarm_drop_kilograms": 0.2}}
    (ctopic, cpayload), = layout.discovery(drop)
    config = json.loads(cpayload)
    assert config["state_topic"] == "beemond/hive1/hive_swarm/state" and config["expire_after"] == 600
    assert layout.messages(drop)[0][0] == "beemond/hive1/hive_swarm/state"
    alert = {"kind": "alert", "sensor": "hive_scale", "processor": "hive_swarm", "time": 1624060800.0,
             "alert": "swarm", "drop_kg": 1.2}
    topic, payload = layout.messages(alert)[0]
    assert topic == "beemond/hive1/hive_scale/alert" and "processor" not in json.loads(payload)


def test_a_reload_restarts_the_telemetry_worker_only_when_its_settings_change(tmp_path, keys, password_file):
    from beemond import config
    from beemond.supervisor.orchestrator import Orchestrator

    def cfg(**telemetry):
        return config.load(make_config(tmp_path, keys, password_file, 21, telemetry=telemetry))

    off, on, other = cfg(), cfg(broker="a"), cfg(broker="b")
    assert not off.telemetry.active and on.telemetry.active
    assert "telemetry" in Orchestrator._changed_workers(on, other)
    assert "telemetry" not in Orchestrator._changed_workers(on, on)
    assert "telemetry" not in Orchestrator._changed_workers(off, on)   # started by reload(), not restarted
