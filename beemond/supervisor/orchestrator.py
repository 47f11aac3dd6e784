"""The orchestrator: the daemon's main process.

It spawns one worker process per sensor, one aggregator/encryptor and one uploader through a
``forkserver`` (a clean single-threaded parent that has imported only beemond's light modules, so
children start fast and share those pages; never ``fork`` from a process with live threads), forwards
*record ready* events to the aggregator, and supervises:

- a worker that exits, or whose heartbeat is older than ``heartbeat_timeout_s`` (it is then killed),
  is restarted after an exponential backoff (``restart_backoff_initial_s`` doubling up to
  ``restart_backoff_max_s``);
- more than ``crash_loop_limit`` restarts within ``crash_loop_window_s`` marks the worker failed; the
  others keep recording, and a failed sensor or processor is tried again every ``failed_retry_s``
  for as long as the daemon runs (:mod:`beemond.supervisor.state` decides). A failed aggregator or uploader
  ends the daemon with status 1, so that systemd's ``Restart=on-failure`` takes over.

It blocks in ``multiprocessing.connection.wait`` on the workers' event pipes, their process sentinels
and a signal wake-up pipe, with a timeout set by the next timer: no polling.

It speaks for the service to systemd (``READY=1``, ``STATUS=``, ``WATCHDOG=1``) and serves /metrics and
the status socket (:class:`beemond.supervisor.status.Reporting`).

SIGHUP, or ``beemond reload`` over the status socket (which waits for the verdict: ``ExecReload=``),
reloads the config file (:mod:`beemond.supervisor.reload`).

Shutdown (SIGTERM, SIGINT, ``--duration``) is ordered so that nothing is left unsealed: sensors flush
their open records first, then the aggregator seals every staged record, then the uploader uploads
for up to ``shutdown_grace_s``. Then the forkserver and the resource tracker are stopped and waited
for, so the orchestrator exits last and systemd finds nothing left to SIGKILL. Exit status 0.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from beemond import ipc
from beemond.core import notify
from beemond.config import EX_CONFIG, ConfigError
from beemond.core.fsio import remove_stale_temps, temp_name
from beemond.spool import WORKERS_LOCK, Spool, SpoolBusy
from beemond.supervisor.processes import discard_queue, forkserver_preload, stop_multiprocessing_helpers
from beemond.supervisor.reload import Reloading, bundle_key_files
from beemond.supervisor.signals import Signals
from beemond.supervisor.state import ALIVE, RestartPolicy, WorkerProcess, WorkerState
from beemond.supervisor.status import Reporting
from beemond.worker import worker_main

log = logging.getLogger(__name__)

# Shutdown phases: each role's share of ``shutdown_timeout_s``; the uploader then gets
# ``shutdown_grace_s`` + 10 s. The unit's TimeoutStopSec must cover the sum (tests/test_service.py).
SHUTDOWN_SHARES = (("sensor", 0.3), ("processor", 0.2), ("telemetry", 0.1), ("aggregator", 0.4))


class Orchestrator(Reloading, Reporting, Signals):
    """The supervisor: spawns, routes between and restarts the workers (see the module docstring)."""

    @classmethod
    def from_file(cls, path, duration: float | None = None) -> Orchestrator:
        """The daemon's start: *path* typed here (``config.load(semantics=False)``), then validated in
        full in a child (:meth:`check_config`). Raises ``ConfigError``."""
        from beemond import config

        orch = cls(config.load(path, semantics=False), duration)
        try:
            orch.check_config(orch.cfg.source)
        except ConfigError:
            stop_multiprocessing_helpers(timeout=10)  # the check started them; nothing else will stop them
            raise
        return orch

    def __init__(self, cfg, duration: float | None = None):
        self.cfg = cfg
        self.d = cfg.daemon
        self.duration = duration
        self.workers: dict[str, WorkerProcess] = {}
        self.ctx = multiprocessing.get_context("forkserver")
        # One BLAS thread: the workers' NumPy work is small FFTs and array copies, and each extra
        # OpenBLAS thread is a stack and a buffer in every process that imports NumPy.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        self.ctx.set_forkserver_preload(forkserver_preload(cfg))
        self.stopping = False
        self.exit_status = 0
        self._signals: list[int] = []
        self._wake_r = self._wake_w = -1
        # Called with (worker, event) for every event, after the orchestrator's own handling: the
        # metrics registry and the status endpoint hook in here.
        self.observers: list = []
        # sensor name -> names of the workers that receive its SAMPLE events as commands
        self.subscribers: dict[str, list[str]] = collections.defaultdict(list)
        self._subscribe(cfg)
        # sd_notify: the orchestrator alone speaks for the service; workers must not inherit the socket.
        self.notifier = notify.Notifier()
        notify.strip_environment()
        self.ready_sent = False
        self.outbox = {"files": None, "bytes": None, "last_upload": None}   # from the uploader's OUTBOX events
        self._watchdog_at = 0.0
        self._status_text, self._status_at = "", 0.0
        self._reload_requested = False
        self._reload_lock = threading.Lock()
        self._reload_waiters: list[tuple[threading.Event, dict]] = []   # `beemond reload` requests
        self._bundle_keys = bundle_key_files(cfg)   # what the aggregator reads at its start
        self.health = None
        self.status_server = None

    def _subscribe(self, cfg) -> None:
        self.subscribers.clear()
        for sensor in cfg.sensors:
            for source in sensor.subscribes_to():
                self.subscribers[source].append(sensor.name)
        # sensor name -> processors that read its records and samples (beemond.processors)
        self.processor_feeds: dict[str, list[str]] = collections.defaultdict(list)
        for proc in cfg.processors:
            self.processor_feeds[proc.sensor].append(proc.name)

    # ---- lifecycle
    def run(self) -> int:
        spool = self.cfg.spool
        try:
            layout = Spool(spool)
            for sub in (layout.staging, layout.outbox):
                sub.mkdir(parents=True, exist_ok=True)
            probe = temp_name(spool, "write-test")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            log.error("%s: daemon.spool_dir: cannot create or write %s: %s", self.cfg.source, spool,
                      e.strerror or e)
            stop_multiprocessing_helpers(timeout=10)  # started by from_file's config check
            return EX_CONFIG
        if not self._lock_spool():
            stop_multiprocessing_helpers(timeout=10)
            return 1
        removed = remove_stale_temps(spool)
        if removed:
            log.info("removed %d temporary file(s) left by an earlier crash", removed)
        self._install_signals()
        log.info("beemond starting: host %s, spool %s, %d sensor(s)", self.d.host, spool, len(self.cfg.sensors))
        watchdog_s = self.notifier.watchdog_usec / 1e6
        if watchdog_s and self.d.heartbeat_timeout_s >= watchdog_s:
            # systemd would kill the whole daemon for one hung worker before we restart that worker.
            log.warning("WatchdogSec=%g of the unit is not above daemon.heartbeat_timeout_s=%g: a hung worker "
                        "restarts the whole service", watchdog_s, self.d.heartbeat_timeout_s)
        self._add(WorkerProcess("aggregator", "aggregator"))
        self._add(WorkerProcess("uploader", "uploader"))
        if self.cfg.telemetry.active:
            self._add(WorkerProcess("telemetry", "telemetry"))
        for sensor in self.cfg.sensors:
            self._add(WorkerProcess("sensor", sensor.name))
        self._add_processors()
        self._start_health()
        ipc.trim_heap()  # the start-up's garbage (config parsed, workers' arguments pickled)
        end_at = time.monotonic() + self.duration if self.duration else None
        try:
            while not self.stopping:
                if end_at is not None and time.monotonic() >= end_at:
                    log.info("run duration of %g s reached", self.duration)
                    break
                self._step(self._next_timer(end_at))
                if self._reload_requested and not self.stopping:
                    self._reload_requested = False
                    self.reload("SIGHUP")
                self._answer_reloads()
            self.notifier.stopping()
            self._shutdown()
        finally:
            self._stop_health()
            self._answer_reloads()
            self._restore_signals()
            left = stop_multiprocessing_helpers(timeout=10)
            if left:
                log.warning("still running after 10 s: %s; systemd will kill them", ", ".join(left))
        log.info("beemond stopped (status %d)", self.exit_status)
        return self.exit_status

    def _lock_spool(self) -> bool:
        """One daemon per spool (:meth:`beemond.spool.Spool.lock`): after a crash of the orchestrator a
        new one waits for the old workers (which notice and finish their records) before touching it."""
        spool = self.cfg.spool
        try:
            self._spool_lock = Spool(spool).lock(wait_workers_s=self.d.shutdown_timeout_s)
        except SpoolBusy as e:
            if e.held == WORKERS_LOCK:
                log.error("workers of an earlier beemond still hold spool %s; not starting", spool)
            else:
                log.error("another beemond is running on spool %s; not starting", spool)
            return False
        return True

    def _add(self, w: WorkerProcess) -> None:
        self.workers[w.name] = w
        self._spawn(w)

    def _spawn(self, w: WorkerProcess) -> None:
        if w.commands is not None:
            discard_queue(w.commands)
        w.commands = self.ctx.Queue()
        reader, writer = self.ctx.Pipe(duplex=False)
        w.process = self.ctx.Process(target=worker_main, name=f"beemond-{w.name}",
                                     args=(w.role, w.name, self.cfg, w.commands, writer), daemon=False)
        w.process.start()
        writer.close()  # so a dead worker's pipe reads as EOF here
        w.events = reader
        w.state, w.started = WorkerState.RUNNING, time.monotonic()
        w.starts += 1
        w.paused = False
        w.last_heartbeat = w.started
        w.reported = False
        log.info("started worker %s (%s, pid %d)", w.name, w.role, w.process.pid)

    # ---- processors (beemond.processors)
    def _add_processors(self) -> None:
        spool = Spool(self.cfg.spool)
        names = {p.name for p in self.cfg.processors}
        root = spool.processing
        if root.is_dir():  # inboxes of processors no longer configured hold only links: drop them
            for d in root.iterdir():
                if d.is_dir() and d.name not in names:
                    shutil.rmtree(d, ignore_errors=True)
        for proc in self.cfg.processors:
            spool.processing_dir(proc.name).mkdir(parents=True, exist_ok=True)
            self._add(WorkerProcess("processor", proc.name))

    def _feed_processors(self, w: WorkerProcess, ev: ipc.Event) -> None:
        """A sensor's *record ready* or *sample* to the processors that read that sensor. A record is
        hard-linked into the processor's inbox first, so it survives the aggregator bundling and
        deleting the staged original, and a processor in backoff finds it at its restart."""
        from beemond.spool import link_record

        for name in self.processor_feeds.get(w.name, ()):
            target = self.workers.get(name)
            if target is None or target.state in (WorkerState.FAILED, WorkerState.STOPPED):
                continue
            if isinstance(ev, ipc.RecordWritten):
                try:
                    link = link_record(self.cfg.spool, name, Path(ev.path))
                except OSError as e:
                    log.warning("cannot pass record %s to processor %s: %s", ev.path, name, e)
                    continue
                self._command(name, ipc.RecordReady(str(link), w.name))
            else:
                self._command(name, ev)   # the Sample itself: its time is the reading's

    # ---- the wait loop
    def _next_timer(self, end_at: float | None) -> float:
        now = time.monotonic()
        timers = [now + self.d.heartbeat_interval_s]
        if self.notifier.watchdog_interval_s:
            timers.append(self._watchdog_at)
        timers += [w.restart_at for w in self.workers.values() if w.state.retried]
        if end_at is not None:
            timers.append(end_at)
        return max(0.0, min(timers) - now)

    def _step(self, timeout: float) -> None:
        live = [w for w in self.workers.values() if w.state in ALIVE]
        waitables = [self._wake_r]
        waitables += [w.events for w in live if w.events is not None]
        waitables += [w.process.sentinel for w in live]
        ready = multiprocessing.connection.wait(waitables, timeout)
        if self._wake_r in ready:
            self._drain_signals()
        for w in live:
            if w.events is not None and w.events in ready:
                self._read_events(w)
        for w in live:
            if w.process.sentinel in ready:
                self._reap(w)
        self._check_heartbeats()
        self._restart_due()
        self._notify_systemd()

    def _read_events(self, w: WorkerProcess) -> None:
        try:
            while w.events.poll():
                self._on_event(w, w.events.recv())
        except (EOFError, OSError):
            w.events.close()
            w.events = None  # the sentinel reports the exit

    def _on_event(self, w: WorkerProcess, ev: ipc.Event) -> None:
        w.last_heartbeat = time.monotonic()
        w.reported = True
        if isinstance(ev, (ipc.RecordWritten, ipc.Sample)):
            self._feed_processors(w, ev)  # first: the aggregator may delete a staged record at once
        if isinstance(ev, ipc.RecordWritten):
            agg = self.workers.get("aggregator")
            if agg is not None and agg.state == WorkerState.RUNNING:
                agg.commands.put(ipc.RecordReady(ev.path, ev.sensor))
            # else: the aggregator's rescan at its restart finds the record on disk
        elif isinstance(ev, ipc.Error):
            w.last_event = {"error": ev.message, "time": ev.time}
        elif isinstance(ev, (ipc.BundleSealed, ipc.Uploaded)):
            w.last_event = {ev.kind: ev.fields(), "time": ev.time}
        elif isinstance(ev, ipc.Outbox):
            self.outbox = {"files": ev.files, "bytes": ev.bytes, "last_upload": ev.last_upload}
        elif isinstance(ev, ipc.Sample):
            for name in self.subscribers.get(w.name, ()):
                self._command(name, ev)
        elif isinstance(ev, ipc.CaptureRequest):
            for name in ev.targets:
                if not self._command(name, ipc.CaptureNow(ev.reason or w.name)):
                    log.warning("%s asked %s to capture, but it is not running", w.name, name)
        if isinstance(ev, (ipc.Sample, ipc.Alert)) and "telemetry" in self.workers:
            # A processor's readings are published as its own series.
            self._command("telemetry", dataclasses.replace(ev, processor=w.name) if w.role == "processor" else ev)
        for observer in self.observers:
            observer(w, ev)

    def _command(self, name: str, cmd: ipc.Command) -> bool:
        """Send *cmd* to worker *name* if it is running; False otherwise (the command is dropped)."""
        target = self.workers.get(name)
        if target is None or target.state != WorkerState.RUNNING:
            return False
        try:
            target.commands.put(cmd)
        except (OSError, ValueError):
            return False
        return True

    def _reap(self, w: WorkerProcess) -> None:
        w.process.join(timeout=5)
        code = w.process.exitcode
        if w.events is not None:
            self._read_events(w)  # what it said before dying (a record ready, an error)
            if w.events is not None:
                w.events.close()
                w.events = None
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"status {code}"
        if w.state == WorkerState.REMOVING:
            log.info("worker %s stopped (%s): removed from the config", w.name, how)
            del self.workers[w.name]
            discard_queue(w.commands)
            return
        if self.stopping:
            w.state = WorkerState.STOPPED
            return
        if w.state == WorkerState.RESTARTING:
            log.info("worker %s stopped (%s); starting it with the new config", w.name, how)
            self._spawn(w)
            return
        self._schedule_restart(w, f"exited with {how}")

    def _schedule_restart(self, w: WorkerProcess, why: str) -> None:
        decision = RestartPolicy.from_config(self.d).after_exit(w.history, w.started)
        w.state, w.restart_at = decision.state, decision.at
        if decision.state == WorkerState.BACKOFF:
            log.warning("worker %s %s; restarting in %.1f s (restart %d)", w.name, why, decision.delay,
                        len(w.history.restarts))
            return
        if w.role in ("aggregator", "uploader"):
            log.error("worker %s %s; %d restarts within %g s: giving up on it (crash loop)",
                      w.name, why, len(w.history.restarts), self.d.crash_loop_window_s)
            log.error("the %s is essential; stopping beemond so that its supervisor restarts it", w.name)
            self.exit_status = 1
            self.stopping = True
        elif decision.crash_loop:
            log.error("worker %s %s; %d restarts within %g s: giving up on it (crash loop); next try in %.0f s",
                      w.name, why, len(w.history.restarts), self.d.crash_loop_window_s, decision.delay)
        else:
            log.warning("worker %s %s again on its retry; next try in %.0f s", w.name, why, decision.delay)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for w in self.workers.values():
            if w.state in ALIVE and now - w.last_heartbeat > self.d.heartbeat_timeout_s:
                log.error("worker %s silent for %.0f s (pid %d): killing it", w.name, now - w.last_heartbeat,
                          w.process.pid)
                w.process.kill()
                w.last_heartbeat = now  # the sentinel will fire; do not kill twice

    def _restart_due(self) -> None:
        now = time.monotonic()
        for w in self.workers.values():
            if self.stopping or now < w.restart_at:
                continue
            if w.state == WorkerState.BACKOFF:
                self._spawn(w)
            elif w.state == WorkerState.FAILED and w.role in ("sensor", "processor"):
                log.info("trying failed worker %s again (every %g s while it fails)", w.name, self.d.failed_retry_s)
                RestartPolicy.retry(w.history)
                self._spawn(w)

    # ---- ordered shutdown
    def _shutdown(self) -> None:
        self.stopping = True
        budget = self.d.shutdown_timeout_s
        t0 = time.monotonic()
        for w in self.workers.values():
            if w.state == WorkerState.BACKOFF:
                w.state = WorkerState.STOPPED
        # Processors after the sensors (their last records reach them), before the aggregator (their
        # last outputs are sealed).
        phases = [*((role, budget * share) for role, share in SHUTDOWN_SHARES),
                  ("uploader", self.cfg.upload.shutdown_grace_s + 10)]
        for role, limit in phases:
            group = [w for w in self.workers.values() if w.role == role and w.state in ALIVE]
            for w in group:
                try:
                    w.commands.put(ipc.Shutdown("daemon stopping"))
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + limit
            while any(w.state in ALIVE for w in group) and time.monotonic() < deadline:
                self._step(min(0.5, max(0.0, deadline - time.monotonic())))
            for w in group:
                if w.state in ALIVE:
                    log.error("worker %s did not stop within %.0f s: killing it", w.name, limit)
                    w.process.kill()
                    w.process.join(5)
                    w.state = WorkerState.STOPPED
        for w in list(self.workers.values()):
            if w.commands is not None:
                discard_queue(w.commands)
        log.info("all workers stopped in %.1f s", time.monotonic() - t0)
