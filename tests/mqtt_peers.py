"""A real MQTT peer for the tests: Debian's Mosquitto on 127.0.0.1 with a config file of our own, and a
paho-mqtt subscriber with a persistent session (see ../shared/TESTBED.md, "MQTT")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from upload_peers import stop, wait_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


class Mosquitto:
    """``mosquitto -c CONF`` in the foreground; persistence on, so sessions and queued messages
    survive a restart on the same port."""

    def __init__(self, directory: Path, port: int, tls: tuple[Path, Path] | None = None,
                 login: tuple[str, str] | None = None):
        """*tls*: (certificate, key) to require TLS; *login*: (user, password), the only one accepted."""
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (scripts/setup installs it)")
        self.dir, self.port = directory, port
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "persistence true",
                 f"persistence_location {self.dir}/", "log_dest stderr", "log_type error", "log_type warning"]
        if tls is not None:
            lines += [f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        if login is not None:
            passwd = self.dir / "passwd"
            passwd.touch()
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), *login], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        wait_port(self.port, 15, self.proc, "mosquitto")
        return self

    def stop(self) -> None:
        stop(self.proc)   # SIGTERM: it saves its persistence file on the way out
        self.proc = None


@pytest.fixture
def mqtt_peers():
    """Keeps the brokers and subscribers a test makes (``mqtt_peers.append(x)`` returns *x*) and stops
    them at teardown, also when the test failed half-way."""
    made: list = []

    class Peers:
        def append(self, peer):
            made.append(peer)
            return peer

    yield Peers()
    for peer in reversed(made):
        (peer.close if isinstance(peer, Subscriber) else peer.stop)()


class Subscriber:
    """Collects every message under *topic* (QoS 1, MQTT v5, clean_start=False with a session expiry,
    so what is published while it is away reaches it after its reconnect)."""

    def __init__(self, port: int, topic: str = "#", client_id: str = "test-subscriber", ca: Path | None = None,
                 login: tuple[str, str] | None = None):
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.topic = topic
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if ca is not None:
            c.tls_set(ca_certs=str(ca))
        if login is not None:
            c.username_pw_set(*login)
        c.on_message = self._on_message
        c.on_connect = lambda client, u, flags, rc, props: client.subscribe(self.topic, qos=1)
        c.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect_async("127.0.0.1", port, keepalive=10, clean_start=False, properties=props)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def received(self, suffix: str = "") -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [m for m in self.messages if m[0].endswith(suffix)]

    def states(self, sensor: str) -> list[dict]:
        """Decoded ``.../<sensor>/state`` payloads."""
        return [json.loads(p) for t, p, _r in self.received(f"/{sensor}/state")]

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return value
