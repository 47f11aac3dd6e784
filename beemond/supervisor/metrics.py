"""Daemon and hive health: a Prometheus registry fed by the orchestrator's events, and the status
snapshot behind ``beemond status``.

:class:`Health` is registered in ``Orchestrator.observers`` and sees every event of every worker in
the orchestrator's thread; prometheus_client's HTTP server thread and the status socket's thread read
it under one lock. Workers never touch the registry (no multiprocess directory): their readings come
up the event pipes as ``sample`` events.

Series (all with a ``host`` label; DESIGN.md conventions: ``beemond_`` prefix, base units):

- ``beemond_<quantity>{sensor, ...}``: the latest reading per sensor and quantity, named as in the
  ``sample`` event (``beemond_temperature_celsius``, ``beemond_relative_humidity_percent``,
  ``beemond_pressure_pascals``, ``beemond_audio_band_power_ratio{band}``, ``beemond_audio_rms_ratio``)
  except where Prometheus's base unit differs from the event's: mass is exported in grams
  (``weight_kilograms`` -> ``beemond_weight_grams``, ``swarm_drop_kilograms`` ->
  ``beemond_swarm_drop_grams``), because ``promtool check metrics`` rejects ``_kilograms``
  ("use base unit grams"); see :data:`PROMETHEUS_UNITS`. A reading older than
  ``[metrics] staleness_s`` is not exported: :meth:`Health.collect` yields only fresh ones, so a dead
  sensor's series vanish instead of repeating a last value (Prometheus then marks them stale).
- counters: ``beemond_records_total{sensor}`` (records, i.e. captures), ``beemond_errors_total{worker}``,
  ``beemond_audio_overflows_total{sensor}``, ``beemond_readings_missed_total{sensor}``,
  ``beemond_readings_rejected_total{sensor}`` (physically implausible values, never recorded),
  ``beemond_alerts_total{sensor, alert}``, ``beemond_bundles_sealed_total``,
  ``beemond_uploaded_files_total``, ``beemond_uploaded_bytes_total``, ``beemond_upload_errors_total``
  (failed upload attempts; the uploader's spool-limit errors count in ``beemond_errors_total`` only),
  ``beemond_worker_restarts_total{worker, role}``.
- gauges: ``beemond_worker_up{worker, role}``, ``beemond_worker_state{worker, role, beemond_worker_state}``
  (a StateSet: one series per :class:`beemond.supervisor.state.WorkerState`, 1 for the current one, so
  a worker restarting or being removed during a reload never reads all-zero; prometheus_client names
  the state label after the metric), ``beemond_worker_next_retry_timestamp_seconds{worker,
  role}`` (when a worker in backoff restarts, or a failed one is tried again), ``beemond_staging_files``, ``beemond_staging_bytes``,
  ``beemond_outbox_files``, ``beemond_outbox_bytes``, ``beemond_last_upload_timestamp_seconds``,
  ``beemond_seconds_since_last_upload``, ``beemond_clock_synchronised`` (beemond.core.clock's answer),
  ``beemond_build_info{version, python}``.
- telemetry (with ``[telemetry] enabled``): ``beemond_telemetry_published_total`` (readings the broker
  acknowledged), ``beemond_telemetry_dropped_total`` (readings dropped from the full buffer),
  ``beemond_telemetry_buffered_readings`` (waiting for the broker), ``beemond_telemetry_connected``.
"""

from __future__ import annotations

import collections
import logging
import os
import platform
import re
import threading
import time
from datetime import datetime, timezone

from beemond import __version__, ipc
from beemond.core.clock import utc_iso
from beemond.spool import OUTBOX, STAGING, Spool
from beemond.supervisor.state import WorkerState

log = logging.getLogger(__name__)

QUANTITY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# sample-event unit suffix -> (Prometheus base-unit suffix, factor). Events keep the units a beekeeper
# thinks in; the exposition follows Prometheus's base units so promtool's lint passes: promtool 2.42
# exits 3 on ``beemond_weight_kilograms`` ('use base unit "grams" instead of "kilograms"'), and the
# naming practice's base-unit table (prometheus.io/docs/practices/naming) lists Mass: grams, "preferred
# over kilograms to avoid issues with the kilo prefix".
PROMETHEUS_UNITS = {"_kilograms": ("_grams", 1000.0)}
SCAN_CACHE_S = 5.0          # staging/outbox are walked at most this often (scrapes come every 15 s or so)


def clock_synchronised(check=None) -> bool | None:
    """True/False: whether the system clock is synchronised, by :func:`beemond.core.clock.synchronized`
    (timesyncd's flag file, else the kernel NTP state; unknown counts as not synchronised), the same
    answer the records' ``clock_synchronized`` metadata carries. *check* replaces that function (a
    test passes it its own flag file). None only if the probe itself fails: a scrape never breaks."""
    from beemond.core import clock

    try:
        return bool((check or clock.synchronized)())
    except Exception:
        return None


def prometheus_unit(quantity: str, value: float) -> tuple[str, float]:
    """A sample's quantity and value in Prometheus's base unit (``weight_kilograms`` -> ``weight_grams``)."""
    for suffix, (base, factor) in PROMETHEUS_UNITS.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + base, value * factor
    return quantity, value


class Health:
    """Orchestrator observer, Prometheus collector and status snapshot. *workers* is the
    orchestrator's live ``{name: WorkerProcess}`` dict (read, never written)."""

    def __init__(self, cfg, workers: dict, clock_check=None):
        self.cfg = cfg
        self.host = cfg.daemon.host
        self.workers = workers
        self.staleness_s = cfg.metrics.staleness_s
        self.lock = threading.Lock()        # the event counters and readings
        self._scan_lock = threading.Lock()  # the staging/outbox walk, kept out of the event path
        # (quantity, sensor, ((label, value), ...)) -> (value, monotonic, wall time)
        self.readings: dict[tuple, tuple[float, float, float]] = {}
        self.records: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.overflows: collections.Counter = collections.Counter()
        self.missed: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()
        self.alerts: collections.Counter = collections.Counter()
        self.last_error: dict[str, tuple[str, float]] = {}
        self.sealed = self.uploaded_files = self.uploaded_bytes = self.upload_errors = 0
        self.outbox_event: tuple[int, int] | None = None
        # from the telemetry worker's events (ipc.TELEMETRY): counters summed, gauges as last reported
        self.telemetry = {"published": 0, "dropped": 0, "buffered": 0, "connected": 0}
        self.last_upload: float | None = None
        self.started = time.time()
        self._usage: dict[str, tuple[float, tuple[int, int]]] = {}
        self.http = None
        self.clock_check = clock_check  # None: beemond.core.clock.synchronized
        # Series that exist from the start at 0, so dashboards and alert rules see them before the
        # first event (a counter appearing late loses its first increase in rate()).
        for s in cfg.sensors:
            self.records[s.name] = 0
            (self.overflows if s.type == "audio" else self.missed)[s.name] = 0
            if s.type != "audio":
                self.rejected[s.name] = 0
        for p in cfg.processors:
            self.records[p.name] = 0
            if p.type == "swarm":
                self.alerts[(p.sensor, "swarm")] = 0

    # ---- observer (orchestrator thread)
    def __call__(self, w, ev: ipc.Event) -> None:
        with self.lock:
            if isinstance(ev, ipc.Sample):
                labels = tuple(sorted((k, str(v)) for k, v in (ev.labels or {}).items() if LABEL_RE.match(k)))
                sensor = ev.sensor or w.name
                now = time.monotonic()
                for quantity, value in (ev.values or {}).items():
                    if QUANTITY_RE.match(quantity) and isinstance(value, (int, float)):
                        self.readings[(quantity, sensor, labels)] = (float(value), now, ev.time)
            elif isinstance(ev, ipc.RecordWritten):
                sensor = ev.sensor or w.name
                self.records[sensor] += 1
                # Non-zero only where counted (sensors.base.EVENT_COUNTS): a series appears with its first.
                if ev.overflows:
                    self.overflows[sensor] += ev.overflows
                if ev.missed:
                    self.missed[sensor] += ev.missed
                if ev.rejected:
                    self.rejected[sensor] += ev.rejected
            elif isinstance(ev, ipc.Error):
                self.errors[w.name] += 1
                self.last_error[w.name] = (ev.message, ev.time)
                if w.role == "uploader" and not ev.spool:
                    self.upload_errors += 1  # a spool-limits error of the uploader is not an upload error
            elif isinstance(ev, ipc.BundleSealed):
                self.sealed += 1
            elif isinstance(ev, ipc.Uploaded):
                self.uploaded_files += 1
                self.uploaded_bytes += int(ev.bytes or 0)
                self.last_upload = ev.time
            elif isinstance(ev, ipc.Outbox):
                self.outbox_event = (int(ev.files), int(ev.bytes))
                if ev.last_upload:
                    self.last_upload = max(self.last_upload or 0.0, float(ev.last_upload))
            elif isinstance(ev, ipc.Telemetry):
                self.telemetry["published"] += ev.published
                self.telemetry["dropped"] += ev.dropped
                self.telemetry["buffered"] = ev.buffered
                self.telemetry["connected"] = ev.connected
            elif isinstance(ev, ipc.Alert):
                self.alerts[(ev.sensor or w.name, ev.alert or "alert")] += 1

    # ---- helpers (any thread, lock held by the caller)
    def _fresh(self):
        now = time.monotonic()
        for (quantity, sensor, labels), (value, mono, wall) in sorted(self.readings.items()):
            if now - mono <= self.staleness_s:
                yield quantity, sensor, labels, value, now - mono, wall

    def _scan(self, which: str) -> tuple[int, int]:
        """(files, bytes) waiting in spool/*which*. Called without ``self.lock`` held, so a slow SD
        card never holds up the orchestrator's events."""
        outbox_event = self.outbox_event
        uploader = self.workers.get("uploader")
        if which == OUTBOX and outbox_event is not None and uploader is not None and uploader.state == WorkerState.RUNNING:
            # The uploader's own view of its queue (ipc.OUTBOX); while it is down its last word goes
            # stale as the aggregator keeps sealing, so the directory is counted instead.
            return outbox_event
        with self._scan_lock:
            cached = self._usage.get(which)
            if cached is not None and time.monotonic() - cached[0] < SCAN_CACHE_S:
                return cached[1]
            got = Spool(self.cfg.spool).usage(which)
            self._usage[which] = (time.monotonic(), got)
            return got

    # ---- Prometheus collector (HTTP server thread)
    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily,
                                            StateSetMetricFamily)

        h = self.host
        usage = {which: self._scan(which) for which in (STAGING, OUTBOX)}
        with self.lock:
            build = InfoMetricFamily("beemond_build", "beemond version and Python", labels=["host"])
            build.add_metric([h], {"version": __version__, "python": platform.python_version()})
            yield build
            fresh = [(*prometheus_unit(q, v), sensor, dict(labels)) for q, sensor, labels, v, _a, _w in self._fresh()]
            # One family has one set of label names: the union of its series' extra labels (a DS18B20's
            # position beside a BME280's none); a series without one exports it empty, which
            # Prometheus reads as the label being absent.
            extra: dict[str, set] = collections.defaultdict(set)
            for quantity, _value, _sensor, labels in fresh:
                extra[quantity].update(labels)
            families: dict[str, object] = {}
            for quantity, value, sensor, labels in fresh:
                name, keys = f"beemond_{quantity}", sorted(extra[quantity])
                if name not in families:
                    families[name] = GaugeMetricFamily(name, f"latest {quantity.replace('_', ' ')} reading",
                                                       labels=["host", "sensor", *keys])
                families[name].add_metric([h, sensor, *(labels.get(k, "") for k in keys)], value)
            yield from families.values()
            for name, doc, label, counter in (
                    ("beemond_records_total", "records (captures) written", "sensor", self.records),
                    ("beemond_errors_total", "errors reported by each worker", "worker", self.errors),
                    ("beemond_audio_overflows_total", "audio input overflows (xruns)", "sensor", self.overflows),
                    ("beemond_readings_missed_total", "measurements lost after retries", "sensor", self.missed),
                    ("beemond_readings_rejected_total", "physically implausible values rejected", "sensor",
                     self.rejected)):
                yield _counter(CounterMetricFamily, name, doc, ["host", label],
                               [([h, k], v) for k, v in sorted(counter.items())])
            yield _counter(CounterMetricFamily, "beemond_alerts_total", "alerts raised by processors",
                           ["host", "sensor", "alert"], [([h, s, a], v) for (s, a), v in sorted(self.alerts.items())])
            for name, doc, value in (("beemond_bundles_sealed_total", "bundles sealed", self.sealed),
                                     ("beemond_uploaded_files_total", "bundles uploaded", self.uploaded_files),
                                     ("beemond_uploaded_bytes_total", "bytes uploaded", self.uploaded_bytes),
                                     ("beemond_upload_errors_total", "failed upload attempts", self.upload_errors)):
                yield _counter(CounterMetricFamily, name, doc, ["host"], [([h], value)])
            workers = list(self.workers.values())
            yield _gauge(GaugeMetricFamily, "beemond_worker_up", "1 while the worker process runs",
                         ["host", "worker", "role"],
                         [([h, w.name, w.role], int(w.state == WorkerState.RUNNING)) for w in workers])
            states = StateSetMetricFamily("beemond_worker_state", "the worker's current state",
                                          labels=["host", "worker", "role"])
            for w in workers:
                states.add_metric([h, w.name, w.role], {s.value: w.state == s for s in WorkerState})
            yield states
            yield _gauge(GaugeMetricFamily, "beemond_worker_next_retry_timestamp_seconds",
                         "when a worker in backoff restarts or a failed one is tried again",
                         ["host", "worker", "role"],
                         [([h, w.name, w.role], next_start_wall(w)) for w in workers if w.state.retried])
            yield _counter(CounterMetricFamily, "beemond_worker_restarts_total", "restarts of each worker",
                           ["host", "worker", "role"], [([h, w.name, w.role], max(0, w.starts - 1)) for w in workers])
            for which, (files, size) in usage.items():
                yield _gauge(GaugeMetricFamily, f"beemond_{which}_files", f"files waiting in spool/{which}",
                             ["host"], [([h], files)])
                yield _gauge(GaugeMetricFamily, f"beemond_{which}_bytes", f"bytes waiting in spool/{which}",
                             ["host"], [([h], size)])
            if self.last_upload is not None:
                yield _gauge(GaugeMetricFamily, "beemond_last_upload_timestamp_seconds",
                             "time of the last successful upload", ["host"], [([h], self.last_upload)])
                yield _gauge(GaugeMetricFamily, "beemond_seconds_since_last_upload",
                             "seconds since the last successful upload", ["host"],
                             [([h], max(0.0, time.time() - self.last_upload))])
            if self.cfg.telemetry.active:
                tm = self.telemetry
                yield _counter(CounterMetricFamily, "beemond_telemetry_published_total",
                               "readings the MQTT broker acknowledged", ["host"], [([h], tm["published"])])
                yield _counter(CounterMetricFamily, "beemond_telemetry_dropped_total",
                               "readings dropped from the full telemetry buffer", ["host"], [([h], tm["dropped"])])
                yield _gauge(GaugeMetricFamily, "beemond_telemetry_buffered_readings",
                             "readings waiting for the MQTT broker", ["host"], [([h], tm["buffered"])])
                yield _gauge(GaugeMetricFamily, "beemond_telemetry_connected",
                             "1 while connected to the MQTT broker", ["host"], [([h], tm["connected"])])
            synced = clock_synchronised(self.clock_check)
            if synced is not None:
                yield _gauge(GaugeMetricFamily, "beemond_clock_synchronised", "1 when the system clock is synchronised",
                             ["host"], [([h], int(synced))])

    # ---- HTTP endpoint
    def start_http(self) -> None:
        """Serve /metrics on ``[metrics] address:port`` in a daemon thread. A port in use is logged,
        not fatal: the hive keeps recording without its dashboard."""
        from prometheus_client import CollectorRegistry, start_http_server

        m = self.cfg.metrics
        if not m.enabled:
            return
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            got = start_http_server(m.port, addr=m.address, registry=registry)
        except OSError as e:
            log.error("metrics: cannot listen on %s:%d (%s); /metrics is off", m.address, m.port, e.strerror or e)
            return
        self.http = got[0] if isinstance(got, tuple) else None
        log.info("metrics on http://%s:%d/metrics", m.address, m.port)

    def stop_http(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    # ---- status snapshot (status socket thread)
    def status(self) -> dict:
        """The daemon's state as JSON-able data (``beemond status --json`` prints it)."""
        now_m, now = time.monotonic(), time.time()
        staging, outbox = self._scan(STAGING), self._scan(OUTBOX)
        with self.lock:
            readings: dict[str, dict] = collections.defaultdict(dict)
            for quantity, sensor, labels, value, age, _wall in self._fresh():
                key = quantity + "".join(f"{{{k}={v}}}" for k, v in labels)
                readings[sensor][key] = {"value": value, "age_s": round(age, 1)}
            workers = []
            for w in list(self.workers.values()):
                entry = {"name": w.name, "role": w.role, "state": w.state, "paused": w.paused,
                         "pid": w.process.pid if w.process is not None and w.state == WorkerState.RUNNING else None,
                         "restarts": max(0, w.starts - 1), "errors": self.errors.get(w.name, 0),
                         "readings": readings.get(w.name, {})}
                if w.state == WorkerState.RUNNING:
                    entry["up_s"] = round(now_m - w.started, 1)
                if w.state.retried:
                    entry["restart_in_s"] = round(max(0.0, w.restart_at - now_m), 1)
                if w.name in self.last_error:
                    msg, t = self.last_error[w.name]
                    entry["last_error"] = {"message": msg, "age_s": round(now - t, 1)}
                workers.append(entry)
            return {
                "host": self.host, "version": __version__, "pid": os.getpid(),
                "uptime_s": round(now - self.started, 1), "workers": workers,
                "staging": {"files": staging[0], "bytes": staging[1]},
                "outbox": {"files": outbox[0], "bytes": outbox[1]},
                "last_upload": utc_iso(datetime.fromtimestamp(self.last_upload, timezone.utc))
                if self.last_upload else None,
                "last_upload_age_s": round(now - self.last_upload, 1) if self.last_upload else None,
                "uploaded": {"files": self.uploaded_files, "bytes": self.uploaded_bytes, "errors": self.upload_errors},
                "alerts": [{"sensor": s, "alert": a, "count": n} for (s, a), n in sorted(self.alerts.items())],
                "clock": {"synchronised": clock_synchronised(self.clock_check)},
                **({"telemetry": dict(self.telemetry)} if self.cfg.telemetry.active else {}),
            }


def next_start_wall(w) -> float:
    """A worker's next start (monotonic ``restart_at``) as a Unix time, for the exposition."""
    return time.time() + max(0.0, w.restart_at - time.monotonic())


def _gauge(cls, name, doc, labels, rows):
    fam = cls(name, doc, labels=labels)
    for values, v in rows:
        fam.add_metric(values, v)
    return fam


_counter = _gauge  # CounterMetricFamily takes the same arguments and appends _total itself
