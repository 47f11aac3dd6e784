"""The telemetry worker: readings and alerts from the orchestrator to an MQTT broker.

Flow: a ``sample`` or ``alert`` command is appended to the durable :class:`ReadingBuffer`; while
connected, up to :data:`WINDOW` entries are published from the buffer in order (QoS 1); each PUBACK
retires its entry. paho-mqtt's network thread reports connects, disconnects and PUBACKs by putting
commands on this worker's own command queue, so every decision is taken in the worker's one loop.

Connection: MQTT v5, ``clean_start=False`` and a Session Expiry Interval (``session_expiry_s``), so
the broker keeps the session (and paho re-sends its unacknowledged messages) across a reconnect;
paho retries the connection itself, backing off up to ``reconnect_max_s``, also when the broker is
absent at start. A Last Will sets the retained status topic to ``offline`` if the connection drops;
each connect sets it to ``online``; a clean stop sets ``offline`` itself.

Offline: nothing is handed to paho while disconnected (its queue is memory only); readings wait in
the buffer, durable within about a second (:meth:`ReadingBuffer.sync`), bounded by
``max_buffer_bytes``, and go out with their original times when the broker is back. After a crash the
buffer's cursor restarts publishing at the oldest unacknowledged reading: at least once, in order.

Metrics: a ``telemetry`` event every few seconds: ``published`` (PUBACKs since the last event),
``buffered`` (readings not yet acknowledged), ``dropped`` (since the last event: over the bound or
unreadable), ``connected`` (0/1).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import ClassVar
from beemond import ipc
from beemond.core import names
from beemond.spool import Spool
from beemond.telemetry.buffer import ReadingBuffer
from beemond.telemetry.messages import Layout
from beemond.worker import Worker

log = logging.getLogger(__name__)

WINDOW = 64            # readings published and not yet acknowledged (paho's queue stays this small)
SYNC_AFTER_S = 1.0     # an appended reading unacknowledged this long is forced to disk
CURSOR_EVERY_S = 5.0
REPORT_EVERY_S = 5.0
STOP_WAIT_S = 3.0      # at shutdown, time for the last PUBACKs


# Commands from paho's network thread to the worker's loop (through its own command queue)
@dataclass(frozen=True, slots=True)
class Connected(ipc.Command):
    """The broker accepted the connection; *session_present*: it kept our session (MQTT 5 CONNACK)."""

    kind: ClassVar[str] = "mqtt_connected"
    session_present: bool = False


@dataclass(frozen=True, slots=True)
class Disconnected(ipc.Command):
    """The connection was refused, failed or lost, for *reason* (paho's reason code text)."""

    kind: ClassVar[str] = "mqtt_disconnected"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Acked(ipc.Command):
    """The broker acknowledged message *mid* (PUBACK); *failure*: its reason code text if it refused it."""

    kind: ClassVar[str] = "mqtt_acked"
    mid: int
    failure: str = ""


CONNECTED, DISCONNECTED, ACKED = Connected.kind, Disconnected.kind, Acked.kind


def expire_after(cfg) -> dict[str, int]:
    """Sensor or processor name -> Home Assistant ``expire_after`` (s): ``expire_after_s``, or three of
    the sensor's intervals (at least 300 s), so a value is marked unavailable once three readings are missing."""
    out = {}
    for s in cfg.sensors:
        interval = next((getattr(s, k) for k in ("interval_s", "segment_s", "still_interval_s")
                         if getattr(s, k, 0)), 300.0)
        out[s.name] = cfg.telemetry.expire_after_s or int(max(300, 3 * interval))
    for p in cfg.processors:   # a processor's readings come at its sensor's pace (or slower: spacing)
        out[p.name] = cfg.telemetry.expire_after_s or int(max(out.get(p.sensor, 300), 3 * p.min_output_spacing))
    return out


class TelemetryWorker(Worker):
    def __init__(self, cfg, channel: ipc.Channel):
        self.cfg, self.t, self.channel = cfg, cfg.telemetry, channel
        self.host = cfg.daemon.host
        self.layout = Layout(self.t, self.host, expire_after(cfg))
        self.buffer = ReadingBuffer(Spool(cfg.spool).telemetry, self.t.max_buffer_bytes)
        self.port = self.t.port or (8883 if self.t.tls else 1883)
        self.connected = False
        self.inflight: dict[int, tuple[int, int]] = {}   # paho mid -> buffer position
        self.announced: set[str] = set()                 # discovery topics sent on this connection
        self.published = self.dropped_reported = 0
        self.sync_at: float | None = None
        self.cursor_at = self.report_at = 0.0
        self.failed_connects = 0
        self.client = None
        if self.buffer.pending:
            log.info("telemetry: %d reading(s) from before the restart wait for the broker", self.buffer.pending)

    # ---- paho
    def _make_client(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        t = self.t
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=t.client_id or f"beemond-{self.host}",
                        protocol=mqtt.MQTTv5)
        if t.tls:
            c.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None)
        if t.user:
            c.username_pw_set(t.user, t.password() or None)
        c.will_set(self.layout.status_topic, "offline", qos=1, retain=True)
        c.reconnect_delay_set(1, t.reconnect_max_s)
        commands = self.channel.commands

        # paho's thread: hand everything to the worker's loop through its own command queue.
        def on_connect(client, userdata, flags, reason, properties):
            if reason.is_failure:
                commands.put(Disconnected(f"refused: {reason}"))
            else:
                commands.put(Connected(bool(flags.session_present)))

        def on_disconnect(client, userdata, flags, reason, properties):
            commands.put(Disconnected(str(reason)))

        def on_connect_fail(client, userdata):
            commands.put(Disconnected("connection failed"))

        def on_publish(client, userdata, mid, reason, properties):
            commands.put(Acked(mid, str(reason) if reason.is_failure else ""))

        c.on_connect, c.on_disconnect, c.on_connect_fail, c.on_publish = on_connect, on_disconnect, on_connect_fail, on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = t.session_expiry_s
        c.connect_async(t.broker, self.port, keepalive=t.keepalive_s, clean_start=False, properties=props)
        c.loop_start()
        return c

    def describe(self) -> str:
        return f"mqtt{'s' if self.t.tls else ''}://{self.t.broker}:{self.port}"

    # ---- loop (beemond.worker.Worker)
    def prepare(self) -> None:
        log.info("telemetry to %s, layout %s", self.describe(), self.t.layout)
        self.client = self._make_client()

    def tick(self) -> None:
        self._pump()
        self._timers()

    def cleanup(self) -> None:
        self._stop()

    def timeout(self) -> float:
        now = time.monotonic()
        due = [self.report_at, self.cursor_at + CURSOR_EVERY_S]
        if self.sync_at is not None:
            due.append(self.sync_at)
        return max(0.0, min(due) - now)

    def on_sample(self, cmd: ipc.Sample) -> None:
        self._queue("state", cmd, {"sensor": cmd.sensor, "values": cmd.values,
                                   **({"labels": cmd.labels} if cmd.labels is not None else {})})

    def on_alert(self, cmd: ipc.Alert) -> None:
        self._queue("alert", cmd, {"sensor": cmd.sensor, "alert": cmd.alert, **cmd.details})

    def _queue(self, kind: str, cmd: ipc.Sample | ipc.Alert, fields: dict) -> None:
        """Buffer one reading or alert for publishing (its entry as :mod:`beemond.telemetry.messages` reads it)."""
        entry = {"kind": kind, "time": cmd.time or time.time(), **fields}
        if cmd.processor:
            entry["processor"] = cmd.processor
        try:
            self.buffer.append(entry)
        except OSError as e:   # disk full: this reading is not kept for telemetry (the record has it)
            self.buffer.dropped += 1
            log.warning("telemetry buffer: cannot queue a reading of %s: %s", entry.get("sensor"), e.strerror or e)
            return
        if self.sync_at is None:
            self.sync_at = time.monotonic() + SYNC_AFTER_S

    def on_mqtt_connected(self, cmd: Connected) -> None:
        self._on_connected(cmd.session_present)

    def on_mqtt_disconnected(self, cmd: Disconnected) -> None:
        self._on_disconnected(cmd.reason)

    def on_mqtt_acked(self, cmd: Acked) -> None:
        start = self.inflight.pop(cmd.mid, None)
        if start is not None and self.buffer.ack(start):
            self.published += 1
            if cmd.failure:
                log.warning("telemetry: the broker refused a reading (%s); not retried", cmd.failure)

    def _on_connected(self, session_present: bool) -> None:
        was = self.connected
        self.connected = True
        self.failed_connects = 0
        self.announced.clear()
        if not session_present and self.inflight:
            # A new session: paho re-sends what it holds anyway; nothing to rewind.
            log.debug("telemetry: new session with %d reading(s) in flight", len(self.inflight))
        self.client.publish(self.layout.status_topic, "online", qos=1, retain=True)
        if not was:
            log.info("telemetry: connected to %s; %d reading(s) waiting", self.describe(), self.buffer.pending)
        self._report(force=True)

    def _on_disconnected(self, reason: str) -> None:
        if self.connected:
            log.warning("telemetry: lost the broker %s (%s); buffering readings", self.describe(), reason)
        else:
            self.failed_connects += 1
            if self.failed_connects == 1:
                log.warning("telemetry: cannot reach the broker %s (%s); buffering readings and retrying",
                            self.describe(), reason)
        self.connected = False
        self._report(force=True)

    def _pump(self) -> None:
        """Publish buffered readings, in order, while connected and the window has room."""
        import paho.mqtt.client as mqtt

        while self.connected and len(self.inflight) < WINDOW:
            item = self.buffer.next_unsent()
            if item is None:
                return
            start, entry = item
            try:
                messages = self.layout.discovery(entry) + self.layout.messages(entry)
            except (names.TemplateError, KeyError, TypeError, ValueError) as e:
                log.warning("telemetry: cannot publish an entry of %s: %s", entry.get("sensor"), e)
                self.buffer.ack(start)
                self.buffer.dropped += 1
                continue
            *configs, (topic, payload) = messages
            for ctopic, cpayload in configs:
                if ctopic not in self.announced:
                    self.announced.add(ctopic)
                    self.client.publish(ctopic, cpayload, qos=1, retain=True)
            info = self.client.publish(topic, payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("telemetry: publish failed (%s); will retry", mqtt.error_string(info.rc))
                self.buffer.rewind()
                self.inflight.clear()
                return
            self.inflight[info.mid] = start

    def _timers(self) -> None:
        now = time.monotonic()
        if self.sync_at is not None and now >= self.sync_at:
            self.sync_at = None
            if self.buffer.pending and self.buffer.unsynced:
                try:
                    self.buffer.sync()
                except OSError as e:
                    log.warning("telemetry buffer: cannot sync: %s", e.strerror or e)
        if now >= self.cursor_at + CURSOR_EVERY_S:
            self.cursor_at = now
            try:
                self.buffer.save_cursor()
            except OSError as e:
                log.debug("telemetry buffer: cannot save the cursor: %s", e)
        if now >= self.report_at:
            self._report()

    def _report(self, force: bool = False) -> None:
        self.report_at = time.monotonic() + REPORT_EVERY_S
        dropped = self.buffer.dropped - self.dropped_reported
        if force or self.published or dropped:
            self.channel.send(ipc.TELEMETRY, published=self.published, dropped=dropped,
                              buffered=self.buffer.pending, connected=int(self.connected))
            self.published, self.dropped_reported = 0, self.buffer.dropped

    def _stop(self) -> None:
        c = self.client
        if c is not None:
            if self.connected:
                deadline = time.monotonic() + STOP_WAIT_S
                info = c.publish(self.layout.status_topic, "offline", qos=1, retain=True)
                while (self.inflight or not info.is_published()) and time.monotonic() < deadline:
                    try:   # straight from the queue: receive() answers "shutdown" once a stop was asked
                        cmd = self.channel.commands.get(timeout=0.1)
                    except (queue.Empty, EOFError, OSError):
                        continue
                    if isinstance(cmd, Acked):
                        self.on_mqtt_acked(cmd)
                c.disconnect()
            c.loop_stop()
        try:
            self.buffer.sync()
        except OSError:
            pass
        self.buffer.close()
        self._report(force=True)
        log.info("telemetry stopped; %d reading(s) stay buffered for the next start", self.buffer.pending)
