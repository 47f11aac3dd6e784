"""What the telemetry worker publishes: topics, JSON payloads and Home Assistant discovery.

A queued entry (see :mod:`beemond.telemetry.buffer`) is one reading or alert:
``{"kind": "state", "sensor", "time" (s since the epoch, UTC), "values": {quantity: value},
"labels": {...}}`` or ``{"kind": "alert", "sensor", "time", "alert": kind, ...details}``.
Quantities are named with their unit as in ``ipc.SAMPLE`` (``temperature_celsius``).

Layouts (``[telemetry] layout``):

- ``beemond``: ``<topic>/state`` with ``{"time": ISO 8601 UTC of the measurement, "values": {...},
  "units": {...}}`` (plus ``"labels"`` when the reading has some), ``<topic>/alert`` with
  ``{"time", "alert", ...details}``; ``<topic>`` is rendered from ``[telemetry] topic``
  (default ``beemond/{{ host }}/{{ sensor }}``). A sensor that sends one series per probe or band
  (DS18B20 positions, audio bands) gets its label values as further topic levels: ``.../brood/top``;
  a processor's readings (``swarm_drop_kilograms``, band powers) go under the processor's name.
- ``kotori``: Kotori/Hiveeyes' ``REALM/NETWORK/GATEWAY/NODE/data.json`` with a flat object of
  fields and Kotori's ``time`` field, and alerts as Grafana annotations on ``.../event.json``
  (``title``, ``text``, ``tags``, ``time``); see Kotori's handbook, "Timestamp formats" and
  "Events API".

Home Assistant MQTT discovery (``home_assistant = true``): one retained config per quantity of each
series on ``<prefix>/sensor/beemond_<host>/<series>_<quantity>/config`` with the fields of Home
Assistant's MQTT sensor schema (``homeassistant/components/mqtt/sensor.py``: ``device_class``,
``unit_of_measurement``, ``state_class``, ``expire_after``, and the common entity schema's
``unique_id``, ``device``, ``availability``, ``origin``; ``state_topic`` and ``value_template`` from
the read-only schema). Device classes and units are those of Home Assistant's ``DEVICE_CLASS_UNITS``
(``homeassistant/components/sensor/const.py``): temperature °C, humidity %, atmospheric_pressure Pa,
weight kg, carbon_dioxide ppm.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from beemond import __version__
from beemond.core import clock, names

# unit suffix of a quantity -> the unit a reader sees
UNITS = {"_celsius": "°C", "_percent": "%", "_pascals": "Pa", "_kilograms": "kg", "_grams": "g",
         "_ppm": "ppm", "_hertz": "Hz", "_seconds": "s", "_ratio": ""}
# quantity -> Home Assistant sensor device class (its unit above is one HA accepts for that class)
DEVICE_CLASSES = {"temperature_celsius": "temperature", "relative_humidity_percent": "humidity",
                  "pressure_pascals": "atmospheric_pressure", "weight_kilograms": "weight",
                  "swarm_drop_kilograms": "weight", "co2_ppm": "carbon_dioxide"}
_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]+")
_WILDCARDS = ("+", "#")
STATE, ALERT = "state", "alert"   # the last topic level of a reading and of an alert


def unit_of(quantity: str) -> str:
    return next((u for suffix, u in UNITS.items() if quantity.endswith(suffix)), "")


def iso(t: float) -> str:
    return clock.utc_iso(datetime.fromtimestamp(float(t), timezone.utc))


def origin(entry: dict) -> str:
    """Who measured it: the processor that derived a reading (``hive_swarm``), else its sensor."""
    return entry.get("processor") or entry["sensor"]


def series(entry: dict) -> str:
    """The origin, then the label values as further levels (``hive_frames/top``): each series gets a
    topic of its own, so every message on a topic has the same quantities (Home Assistant's value
    template of one quantity never meets a message without it)."""
    labels = entry.get("labels") or {}
    return "/".join([origin(entry), *(str(labels[k]) for k in sorted(labels))])


def render_topic(template: str, **variables) -> str:
    """A topic from a sandboxed template; raises ``names.TemplateError`` for a wildcard or an
    empty level (MQTT 3.1.1 section 4.7: a topic name never holds ``+`` or ``#``)."""
    topic = names.render_name(template, **variables)
    if any(w in topic for w in _WILDCARDS):
        raise names.TemplateError(f"topic {topic!r} contains an MQTT wildcard (+ or #)")
    return topic


def check_topic(template: str) -> None:
    """Try *template* at config load, within :func:`beemond.core.names.trial_limit` (it is rendered for
    every reading). Raises ``names.TemplateError``."""
    with names.trial_limit():
        render_topic(template, host="hive", sensor="scale")


class Layout:
    """Turns queued entries into ``(topic, payload bytes, retain)`` messages for one config."""

    def __init__(self, t, host: str, expire_after: dict[str, int]):
        self.t, self.host = t, host
        self.expire_after = expire_after     # sensor -> s (Home Assistant expire_after)
        self.status_topic = render_topic(t.status_topic, host=host)

    def base(self, entry: dict) -> str:
        """The topic before /state (per series) or /alert (per sensor: the scale's swarm alert)."""
        who = entry["sensor"] if entry["kind"] == "alert" else series(entry)
        return render_topic(self.t.topic, host=self.host, sensor=who)

    def messages(self, entry: dict) -> list[tuple[str, bytes]]:
        """The messages of one entry, the reading's own last (its PUBACK retires the entry)."""
        if self.t.layout == "kotori":
            return [self._kotori(entry)]
        topic = self.base(entry)
        when = iso(entry["time"])
        if entry["kind"] == "alert":
            body = {"time": when, **{k: v for k, v in entry.items() if k not in ("kind", "time", "labels", "processor")}}
            return [(f"{topic}/{ALERT}", _json(body))]
        values = entry["values"]
        body = {"time": when, "values": values, "units": {q: unit_of(q) for q in values}}
        if entry.get("labels"):
            body["labels"] = entry["labels"]
        return [(f"{topic}/{STATE}", _json(body))]

    def _kotori(self, entry: dict) -> tuple[str, bytes]:
        t = self.t
        base = "/".join([t.kotori_realm, t.kotori_network, t.kotori_gateway or self.host, t.kotori_node or self.host])
        field = _OBJECT_ID.sub("_", series(entry))
        when = iso(entry["time"])
        if entry["kind"] == "alert":
            details = {k: v for k, v in entry.items() if k not in ("kind", "time", "sensor", "alert", "labels", "processor")}
            return (f"{base}/event.json", _json({
                "time": when, "title": f"{entry['alert']} alert on {entry['sensor']}",
                "text": json.dumps(details, sort_keys=True), "tags": f"beemond,alert,{entry['alert']}"}))
        return (f"{base}/data.json", _json({"time": when, **{f"{field}_{q}": v for q, v in entry["values"].items()}}))

    def discovery(self, entry: dict) -> list[tuple[str, bytes]]:
        """Home Assistant discovery configs (retained) for each quantity of a state entry."""
        if not self.t.home_assistant or self.t.layout != "beemond" or entry["kind"] != "state":
            return []
        name = series(entry)
        node = f"beemond_{_OBJECT_ID.sub('_', self.host)}"
        out = []
        for quantity in entry["values"]:
            object_id = _OBJECT_ID.sub("_", f"{name}_{quantity}")
            config = {
                "name": f"{name} {_words(quantity)}",
                "unique_id": f"{node}_{object_id}",
                "state_topic": f"{self.base(entry)}/{STATE}",
                # Subscript, not attribute: in Jinja, value_json.values is the dict's method.
                "value_template": f"{{{{ value_json['values']['{quantity}'] }}}}",
                "state_class": "measurement",
                "expire_after": self.expire_after.get(origin(entry), self.t.expire_after_s or 900),
                "availability": [{"topic": self.status_topic, "payload_available": "online",
                                  "payload_not_available": "offline"}],
                "device": {"identifiers": [node], "name": f"beemond {self.host}", "manufacturer": "beemond",
                           "model": "beemond hive recorder", "sw_version": __version__},
                "origin": {"name": "beemond", "sw_version": __version__},
            }
            unit = unit_of(quantity)
            if unit:
                config["unit_of_measurement"] = unit
            if quantity in DEVICE_CLASSES:
                config["device_class"] = DEVICE_CLASSES[quantity]
            out.append((f"{self.t.discovery_prefix}/sensor/{node}/{object_id}/config", _json(config)))
        return out


def _words(quantity: str) -> str:
    for suffix in UNITS:
        if quantity.endswith(suffix):
            quantity = quantity[: -len(suffix)]
            break
    return quantity.replace("_", " ")


def _json(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
