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

Under systemd (``Type=notify``, :mod:`beemond.notify`) it sends ``READY=1`` once every worker has
reported in, a ``STATUS=`` summary line when it changes, and ``WATCHDOG=1`` every half
``WatchdogSec=`` but only while every running worker's heartbeat is fresh: a hung worker is killed and
restarted here, a hung orchestrator by systemd.

SIGHUP, or ``beemond reload`` over the status socket (which waits for the verdict: ``ExecReload=``),
reloads the config file: an invalid file is logged (file, key) and the running config kept; a valid one
restarts only the workers whose settings changed, starts added sensors and stops removed ones (their
records flushed). ``spool_dir``, ``host`` and ``status_socket`` need a full restart and are kept.

Shutdown (SIGTERM, SIGINT, ``--duration``) is ordered so that nothing is left unsealed: sensors flush
their open records first, then the aggregator seals every staged record, then the uploader uploads
for up to ``shutdown_grace_s``. Then the forkserver and the resource tracker are stopped and waited
for, so the orchestrator exits last and systemd finds nothing left to SIGKILL. Exit status 0.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from beemond import ipc, notify
from beemond.config import EX_CONFIG, ConfigError
from beemond.supervisor.state import RestartPolicy, RestartState
from beemond.spool import WORKERS_LOCK, Spool, SpoolBusy, remove_stale_temps, temp_name

log = logging.getLogger(__name__)

STATUS_EVERY_S = 10.0    # at most one unchanged STATUS= line this often
# Worker states in which a process exists: "restarting" (stopping to come back with a reloaded
# config) and "removing" (its sensor left the config) are still read, watched and reaped.
ALIVE = ("running", "restarting", "removing")
# [daemon] keys the workers themselves read; a change restarts them all.
WORKER_DAEMON_KEYS = ("heartbeat_interval_s", "log_level")
# [daemon] keys the uploader reads (it enforces the spool limits); a change restarts it.
SPOOL_LIMIT_KEYS = ("spool_max_bytes", "spool_min_free_bytes", "drop_oldest_when_full")
# [daemon] keys that only a full restart can change (the spool lock, names of everything on disk).
RESTART_ONLY_KEYS = ("spool_dir", "host", "status_socket")
# Shutdown phases: each role's share of ``shutdown_timeout_s``; the uploader then gets
# ``shutdown_grace_s`` + 10 s. The unit's TimeoutStopSec must cover the sum (tests/test_service.py).
SHUTDOWN_SHARES = (("sensor", 0.3), ("processor", 0.2), ("telemetry", 0.1), ("aggregator", 0.4))


# Imported by the forkserver before it forks the workers, so that their pages are shared (and frozen
# out of the garbage collector's reach: beemond.preload, last). Always: beemond's modules every worker
# uses (archive brings Jinja2). Libraries only where at least two configured workers import them: one
# worker gains nothing from sharing, and the forkserver would carry the library for nobody.
PRELOAD_ALWAYS = ("beemond.ipc", "beemond.config", "beemond.journal", "beemond.spool", "beemond.archive",
                  "beemond.clock", "beemond.sensors.base")
PRELOAD_SHARED = {"audio": ("numpy", "soundfile"), "audio_bands": ("numpy", "soundfile"),
                  "camera": ("numpy",)}


def forkserver_preload(cfg) -> list[str]:
    """Module names for ``set_forkserver_preload``: :data:`PRELOAD_ALWAYS`, the :data:`PRELOAD_SHARED`
    libraries of the configured sensor and processor types used by two or more of them, then
    ``beemond.preload`` (``gc.freeze()``)."""
    users = collections.Counter(lib for unit in (*cfg.sensors, *cfg.processors)
                                for lib in PRELOAD_SHARED.get(unit.type, ()))
    return [*PRELOAD_ALWAYS, *sorted(lib for lib, n in users.items() if n >= 2), "beemond.preload"]


@dataclass
class Worker:
    role: str                    # sensor | processor | aggregator | uploader | telemetry
    name: str
    process: multiprocessing.process.BaseProcess | None = None
    commands: object = None
    events: multiprocessing.connection.Connection | None = None
    state: str = "starting"      # running | backoff | failed | stopped
    started: float = 0.0
    last_heartbeat: float = 0.0
    history: RestartState = field(default_factory=RestartState)
    restart_at: float = 0.0      # monotonic time of the next start (in backoff, or the retry of a failed one)
    last_event: dict = field(default_factory=dict)
    starts: int = 0              # process starts since the daemon started (restarts = starts - 1)
    paused: bool = False         # stopped by `beemond pause` (a restarted process records again)
    reported: bool = False       # has sent an event since its last start (READY=1 waits for all)


def _check_config(path: str, verdict) -> None:
    """In a short-lived forkserver child: the full :func:`beemond.config.load` of *path*; sends ``None``
    or the ``ConfigError``'s (file, key, message) down the *verdict* pipe."""
    from beemond import config

    try:
        config.load(path)
        verdict.send(None)
    except ConfigError as e:
        verdict.send((e.file, e.key, e.message))


class Orchestrator:
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

    def check_config(self, path, timeout: float = 120.0) -> None:
        """Run the full validation of the config file *path* in a forkserver child and raise its
        ``ConfigError`` here. The checks import Jinja2, pyrage and the replay files' readers, whose
        memory (about 8 MB) would otherwise stay in the orchestrator for good; the child is forked from
        the forkserver, which has most of them preloaded, so it takes a fraction of a second."""
        reader, writer = self.ctx.Pipe(duplex=False)
        child = self.ctx.Process(target=_check_config, args=(str(path), writer), name="beemond-check-config")
        child.start()
        writer.close()
        try:
            verdict = reader.recv() if reader.poll(timeout) else (str(path), "", f"not validated within {timeout:g} s")
        except EOFError:
            verdict = None
        finally:
            reader.close()
        child.join(timeout)
        if verdict is None and child.exitcode != 0:
            verdict = (str(path), "", f"the validating process failed (exit status {child.exitcode}); see the log")
        if verdict is not None:
            raise ConfigError(*verdict)

    def __init__(self, cfg, duration: float | None = None):
        self.cfg = cfg
        self.d = cfg.daemon
        self.duration = duration
        self.workers: dict[str, Worker] = {}
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
        self._bundle_keys = _bundle_key_files(cfg)   # what the aggregator reads at its start
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
        self._add(Worker("aggregator", "aggregator"))
        self._add(Worker("uploader", "uploader"))
        if self.cfg.telemetry.active:
            self._add(Worker("telemetry", "telemetry"))
        for sensor in self.cfg.sensors:
            self._add(Worker("sensor", sensor.name))
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

    def _add(self, w: Worker) -> None:
        self.workers[w.name] = w
        self._spawn(w)

    def _spawn(self, w: Worker) -> None:
        if w.commands is not None:
            _discard_queue(w.commands)
        w.commands = self.ctx.Queue()
        reader, writer = self.ctx.Pipe(duplex=False)
        w.process = self.ctx.Process(target=ipc.worker_main, name=f"beemond-{w.name}",
                                     args=(w.role, w.name, self.cfg, w.commands, writer), daemon=False)
        w.process.start()
        writer.close()  # so a dead worker's pipe reads as EOF here
        w.events = reader
        w.state, w.started = "running", time.monotonic()
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
            self._add(Worker("processor", proc.name))

    def _feed_processors(self, w: Worker, ev: ipc.Event) -> None:
        """A sensor's *record ready* or *sample* to the processors that read that sensor. A record is
        hard-linked into the processor's inbox first, so it survives the aggregator bundling and
        deleting the staged original, and a processor in backoff finds it at its restart."""
        from beemond.spool import link_record

        for name in self.processor_feeds.get(w.name, ()):
            target = self.workers.get(name)
            if target is None or target.state in ("failed", "stopped"):
                continue
            if ev.kind == ipc.READY_EVENT:
                try:
                    link = link_record(self.cfg.spool, name, Path(ev.data["path"]))
                except OSError as e:
                    log.warning("cannot pass record %s to processor %s: %s", ev.data["path"], name, e)
                    continue
                self._command(name, ipc.Command(ipc.RECORD_READY, {"path": str(link), "sensor": w.name}))
            else:
                self._command(name, ipc.Command(ipc.SAMPLE, {**ev.data, "time": ev.time}))

    # ---- health: /metrics and the status socket (beemond.supervisor.metrics, beemond.supervisor.status)
    def _start_health(self) -> None:
        from beemond.supervisor import metrics, status

        self.health = metrics.Health(self.cfg, self.workers)
        self.observers.append(self.health)
        self.health.start_http()
        self.status_server = status.StatusServer(self.cfg.status_socket, self.health.status, self._control,
                                                 self.request_reload)
        self.status_server.start()

    def request_reload(self, timeout: float) -> dict:
        """``beemond reload`` (status socket thread): have the main loop reload and wait for its verdict."""
        done, verdict = threading.Event(), {}
        if self.stopping:
            return {"ok": False, "message": "beemond is stopping"}
        with self._reload_lock:
            self._reload_waiters.append((done, verdict))
        try:
            os.write(self._wake_w, b"r")  # wakes the main loop's wait; a full pipe is awake already
        except OSError:
            pass
        if not done.wait(timeout):
            return {"ok": False, "message": f"no verdict within {timeout:g} s"}
        return verdict

    def _answer_reloads(self) -> None:
        """Serve pending ``beemond reload`` requests: one reload answers all of them."""
        with self._reload_lock:
            waiters, self._reload_waiters = self._reload_waiters, []
        if not waiters:
            return
        if self.stopping:
            verdict = {"ok": False, "message": "beemond is stopping"}
        else:
            verdict = self.reload("reload")
        for done, out in waiters:
            out.update(verdict)
            done.set()

    def _control(self, kind: str, name: str) -> tuple[bool, str]:
        """``beemond pause|resume NAME`` (status socket thread): STOP/START to a sensor or processor.
        Only a queue put, which is thread-safe; the worker's state is read, never written, here."""
        w = self.workers.get(name)
        if w is None or w.role not in ("sensor", "processor"):
            choices = ", ".join(n for n, x in self.workers.items() if x.role in ("sensor", "processor"))
            return False, f"no sensor or processor {name!r} (have: {choices})"
        if not self._command(name, ipc.Command(ipc.STOP if kind == "stop" else ipc.START, {"reason": "beemond CLI"})):
            return False, f"{name} is {w.state}, not running"
        w.paused = kind == "stop"  # a plain attribute store: the main loop only reads it
        log.info("%s sent to %s from the command line", kind, name)
        return True, f"{'paused' if kind == 'stop' else 'resumed'} {name}"

    def _stop_health(self) -> None:
        if self.status_server is not None:
            self.status_server.stop()
        if self.health is not None:
            self.health.stop_http()

    # ---- the wait loop
    def _next_timer(self, end_at: float | None) -> float:
        now = time.monotonic()
        timers = [now + self.d.heartbeat_interval_s]
        if self.notifier.watchdog_interval_s:
            timers.append(self._watchdog_at)
        timers += [w.restart_at for w in self.workers.values() if w.state in ("backoff", "failed")]
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

    def _read_events(self, w: Worker) -> None:
        try:
            while w.events.poll():
                self._on_event(w, w.events.recv())
        except (EOFError, OSError):
            w.events.close()
            w.events = None  # the sentinel reports the exit

    def _on_event(self, w: Worker, ev: ipc.Event) -> None:
        w.last_heartbeat = time.monotonic()
        w.reported = True
        if ev.kind in (ipc.READY_EVENT, ipc.SAMPLE):
            self._feed_processors(w, ev)  # first: the aggregator may delete a staged record at once
        if ev.kind == ipc.READY_EVENT:
            agg = self.workers.get("aggregator")
            if agg is not None and agg.state == "running":
                agg.commands.put(ipc.Command(ipc.RECORD_READY, {"path": ev.data["path"]}))
            # else: the aggregator's rescan at its restart finds the record on disk
        elif ev.kind == ipc.ERROR:
            w.last_event = {"error": ev.data.get("message", ""), "time": ev.time}
        elif ev.kind in (ipc.BUNDLE_SEALED, ipc.UPLOADED):
            w.last_event = {ev.kind: ev.data, "time": ev.time}
        elif ev.kind == ipc.OUTBOX:
            self.outbox = {k: ev.data.get(k) for k in ("files", "bytes", "last_upload")}
        elif ev.kind == ipc.SAMPLE:
            for name in self.subscribers.get(w.name, ()):
                self._command(name, ipc.Command(ipc.SAMPLE, ev.data))
        elif ev.kind == ipc.CAPTURE_REQUEST:
            for name in ev.data.get("targets", ()):
                if not self._command(name, ipc.Command(ipc.CAPTURE_NOW, {"reason": ev.data.get("reason", w.name)})):
                    log.warning("%s asked %s to capture, but it is not running", w.name, name)
        if ev.kind in (ipc.SAMPLE, ipc.ALERT) and "telemetry" in self.workers:
            # The event's time is the measurement's (sent as the reading is taken) unless it says otherwise;
            # a processor's readings are published as its own series.
            self._command("telemetry", ipc.Command(ev.kind, {"time": ev.time, **ev.data,
                                                             **({"processor": w.name} if w.role == "processor" else {})}))
        for observer in self.observers:
            observer(w, ev)

    def _command(self, name: str, cmd: ipc.Command) -> bool:
        """Send *cmd* to worker *name* if it is running; False otherwise (the command is dropped)."""
        target = self.workers.get(name)
        if target is None or target.state != "running":
            return False
        try:
            target.commands.put(cmd)
        except (OSError, ValueError):
            return False
        return True

    def _reap(self, w: Worker) -> None:
        w.process.join(timeout=5)
        code = w.process.exitcode
        if w.events is not None:
            self._read_events(w)  # what it said before dying (a record ready, an error)
            if w.events is not None:
                w.events.close()
                w.events = None
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"status {code}"
        if w.state == "removing":
            log.info("worker %s stopped (%s): removed from the config", w.name, how)
            del self.workers[w.name]
            _discard_queue(w.commands)
            return
        if self.stopping:
            w.state = "stopped"
            return
        if w.state == "restarting":
            log.info("worker %s stopped (%s); starting it with the new config", w.name, how)
            self._spawn(w)
            return
        self._schedule_restart(w, f"exited with {how}")

    def _schedule_restart(self, w: Worker, why: str) -> None:
        decision = RestartPolicy.from_config(self.d).after_exit(w.history, w.started, time.monotonic())
        w.state, w.restart_at = decision.state, decision.at
        if decision.state == "backoff":
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
            if w.state == "backoff":
                self._spawn(w)
            elif w.state == "failed" and w.role in ("sensor", "processor"):
                log.info("trying failed worker %s again (every %g s while it fails)", w.name, self.d.failed_retry_s)
                RestartPolicy.retry(w.history)
                self._spawn(w)

    # ---- signals
    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _drain_signals(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload_requested = True  # handled in the run loop, outside _step
                continue
            if not self.stopping:
                log.info("%s received: shutting down", signal.Signals(signum).name)
            self.stopping = True

    # ---- ordered shutdown
    def _shutdown(self) -> None:
        self.stopping = True
        budget = self.d.shutdown_timeout_s
        t0 = time.monotonic()
        for w in self.workers.values():
            if w.state == "backoff":
                w.state = "stopped"
        # Processors after the sensors (their last records reach them), before the aggregator (their
        # last outputs are sealed).
        phases = [*((role, budget * share) for role, share in SHUTDOWN_SHARES),
                  ("uploader", self.cfg.upload.shutdown_grace_s + 10)]
        for role, limit in phases:
            group = [w for w in self.workers.values() if w.role == role and w.state in ALIVE]
            for w in group:
                try:
                    w.commands.put(ipc.Command(ipc.SHUTDOWN, {"reason": "daemon stopping"}))
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
                    w.state = "stopped"
        for w in list(self.workers.values()):
            if w.commands is not None:
                _discard_queue(w.commands)
        log.info("all workers stopped in %.1f s", time.monotonic() - t0)


    # ---- systemd: READY=1, STATUS=, WATCHDOG=1
    def _notify_systemd(self) -> None:
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if not self.ready_sent and all(w.reported or w.state not in ALIVE for w in self.workers.values()):
            self.ready_sent = True
            self._status_text, self._status_at = self.status_line(), now
            self.notifier.ready(self._status_text)
            log.info("every worker is up: notified systemd (READY=1)")
        interval = self.notifier.watchdog_interval_s
        if interval and now >= self._watchdog_at:
            stale = self.stale_workers(now)
            if not stale:
                self.notifier.watchdog()
                self._watchdog_at = now + interval
            else:
                # No ping: if the orchestrator cannot recover the worker (kill + restart), systemd will.
                log.debug("withholding WATCHDOG=1: stale heartbeat from %s", ", ".join(stale))
                self._watchdog_at = now + min(interval, self.d.heartbeat_interval_s)
        if self.ready_sent:
            text = self.status_line()
            if text != self._status_text or now - self._status_at >= STATUS_EVERY_S:
                self._status_text, self._status_at = text, now
                self.notifier.status(text)

    def stale_workers(self, now: float) -> list[str]:
        """Running workers whose last heartbeat is older than three heartbeat intervals (capped at
        ``heartbeat_timeout_s``): while any exists the watchdog is not fed."""
        limit = min(self.d.heartbeat_timeout_s, 3 * self.d.heartbeat_interval_s)
        return [w.name for w in self.workers.values() if w.state in ALIVE and now - w.last_heartbeat > limit]

    def status_line(self) -> str:
        """One line for ``systemctl status``: sensors ok/backoff/failed, then the upload backlog.
        E.g. ``2 sensors ok, backlog 3 bundles / 12.0 MB, last upload 40 s ago``."""
        sensors = [w for w in self.workers.values() if w.role == "sensor"]
        ok = sum(1 for w in sensors if w.state in ALIVE)
        parts = [f"{ok} sensor{'' if ok == 1 else 's'} ok"]
        units = [w for w in self.workers.values() if w.role in ("sensor", "processor")]
        for state in ("backoff", "failed"):
            names = [w.name for w in units if w.state == state]
            if names:
                parts.append(f"{state}: {' '.join(names)}")
        broken = [w.name for w in self.workers.values() if w not in units and w.state not in ALIVE]
        if broken:
            parts.append(f"down: {' '.join(broken)}")
        if self.outbox["files"] is not None:
            parts.append(f"backlog {self.outbox['files']} bundle{'' if self.outbox['files'] == 1 else 's'}"
                         f" / {(self.outbox['bytes'] or 0) / 1e6:.1f} MB")
        if self.outbox["last_upload"]:
            parts.append(f"last upload {max(0, time.time() - self.outbox['last_upload']):.0f} s ago")
        return ", ".join(parts)

    # ---- SIGHUP, `beemond reload`: reload the config
    def reload(self, why: str = "SIGHUP") -> dict:
        """Load and validate the config file again and apply what changed (see the module docstring).
        Returns the verdict sent to ``beemond reload``: ``{"ok": False, "file", "key", "message"}``
        when the file is rejected (nothing changes), else ``{"ok": True, "restarted", "removed",
        "added", "kept", "message"}`` (``kept``: changes that need a restart of the service)."""
        from beemond import config

        self.notifier.reloading()
        try:
            new = config.load(self.cfg.source, semantics=False)
            self.check_config(new.source)
        except ConfigError as e:
            log.error("%s: new config rejected, keeping the running one: %s: %s: %s", why, e.file, e.key or "-",
                      e.message)
            self.notifier.ready(self.status_line())
            return {"ok": False, "file": e.file, "key": e.key, "message": e.message}
        old = self.cfg
        kept = {k: getattr(old.daemon, k) for k in RESTART_ONLY_KEYS}
        needs_restart = []
        for key, value in kept.items():
            if getattr(new.daemon, key) != value:
                needs_restart.append(f"daemon.{key}")
                log.warning("%s: daemon.%s changed to %s; that needs a restart of the service, keeping %s",
                            why, key, getattr(new.daemon, key), value)
        new = dataclasses.replace(new, daemon=dataclasses.replace(new.daemon, **kept))
        if new.metrics != old.metrics:
            needs_restart.append("metrics")
            log.warning("%s: [metrics] changed; that needs a restart of the service, keeping the old one", why)
            new = dataclasses.replace(new, metrics=old.metrics)
        restart = self._changed_workers(old, new)
        keys = _bundle_key_files(new)
        if keys != self._bundle_keys and "aggregator" not in restart:
            # Same [bundle] text, edited recipients file or device key: only a restarted aggregator reads them.
            log.info("%s: a recipients file or the signing key changed", why)
            restart.insert(0, "aggregator")
        self._bundle_keys = keys
        old_units, new_units = _units(old), _units(new)
        removed = sorted(set(old_units) - set(new_units))
        self.cfg, self.d = new, new.daemon
        self._subscribe(new)
        if new.daemon.log_level != old.daemon.log_level:
            logging.getLogger().setLevel(new.daemon.log_level.upper())
        for name in removed:
            log.info("%s: %s %s removed", why, old_units[name], name)
            self._stop_worker(name, "removing")
        for name in restart:
            self._stop_worker(name, "restarting")
        added = [name for name in new_units if name not in old_units]
        if new.telemetry.active != old.telemetry.active:
            log.info("%s: telemetry %s", why, "on" if new.telemetry.active else "off")
            if new.telemetry.active:
                self._add(Worker("telemetry", "telemetry"))
            else:
                self._stop_worker("telemetry", "removing")
        for name, role in new_units.items():
            if name not in old_units:
                log.info("%s: %s %s added", why, role, name)
                if role == "processor":
                    Spool(new.spool).processing_dir(name).mkdir(parents=True, exist_ok=True)
                self._add(Worker(role, name))
        message = (f"config {new.source} reloaded: restarting {', '.join(restart) or 'none'}; "
                   f"removed {', '.join(removed) or 'none'}")
        log.info("%s: %s", why, message)
        self.notifier.ready(self.status_line())
        if needs_restart:
            message += f"; {', '.join(needs_restart)} changed: kept until the service restarts"
        return {"ok": True, "restarted": restart, "removed": removed, "added": added, "kept": needs_restart,
                "message": message}

    @staticmethod
    def _changed_workers(old, new) -> list[str]:
        """Workers whose settings differ between two configs (sensors and processors present in both)."""
        every = any(getattr(old.daemon, k) != getattr(new.daemon, k) for k in WORKER_DAEMON_KEYS)
        names = []
        if every or old.bundle != new.bundle or old.archive != new.archive:
            names.append("aggregator")
        if every or old.upload != new.upload or any(getattr(old.daemon, k) != getattr(new.daemon, k)
                                                    for k in SPOOL_LIMIT_KEYS):
            names.append("uploader")
        if old.telemetry.active and new.telemetry.active and (every or old.telemetry != new.telemetry):
            names.append("telemetry")
        before = {s.name: s for s in (*old.sensors, *old.processors)}
        for s in (*new.sensors, *new.processors):
            if s.name in before and (every or before[s.name] != s or old.template_for(s) != new.template_for(s)):
                names.append(s.name)
        return names

    def _stop_worker(self, name: str, state: str) -> None:
        """Ask worker *name* to stop (its records flushed); when reaped it is restarted with the current
        config (``restarting``) or forgotten (``removing``)."""
        w = self.workers.get(name)
        if w is None:
            return
        if w.state in ALIVE:
            w.state = state
            try:
                w.commands.put(ipc.Command(ipc.SHUTDOWN, {"reason": "config reloaded"}))
            except (OSError, ValueError):
                w.process.kill()
        elif state == "removing":
            del self.workers[name]  # in backoff or failed: nothing runs
        else:
            RestartPolicy.reset(w.history)
            self._spawn(w)  # a failed sensor gets a fresh start with its new settings


def _bundle_key_files(cfg) -> str:
    """SHA-256 over the contents of the files the aggregator loads keys from (recipients files, the
    signing key), so a reload notices an edited file behind an unchanged path. Pyrage stays out of this
    process; nothing but the digest is kept. An unreadable file counts as its error text."""
    h = hashlib.sha256()
    key = cfg.bundle.signing_key_path()
    for item in (*cfg.bundle.recipients, *([str(key)] if key is not None else [])):
        item = item.strip()
        h.update(item.encode() + b"\0")
        if item.startswith(("age1", "ssh-")):
            continue
        path = Path(os.path.expanduser(item))
        try:
            h.update((path if path.is_absolute() else cfg.source.parent / path).read_bytes())
        except OSError as e:
            h.update(str(e).encode())
        h.update(b"\0")
    return h.hexdigest()


def _units(cfg) -> dict[str, str]:
    """Name -> role of the configured sensors and processors."""
    return {**{s.name: "sensor" for s in cfg.sensors}, **{p.name: "processor" for p in cfg.processors}}


def _discard_queue(q) -> None:
    """Drop a dead worker's command queue without waiting on its feeder thread (whose reader is gone)."""
    q.cancel_join_thread()
    q.close()


def stop_multiprocessing_helpers(timeout: float) -> list[str]:
    """Stop the forkserver and the resource tracker and wait for them (at most *timeout* s each).
    Returns the names of any still running.

    Left alone they end only when the orchestrator's exit closes their pipes, a moment after the main
    process is gone; systemd (``KillMode=mixed``) SIGKILLs whatever is left in the cgroup then and logs
    "Killing process ... with signal SIGKILL". CPython 3.11-3.13 have no public call for this:
    ``ForkServer._stop()`` and ``ResourceTracker._stop()`` close the pipe and ``waitpid`` without a
    deadline, so their attributes are used here with one. Order matters: the forkserver holds a copy of
    the tracker's pipe, so the tracker sees EOF only after the forkserver has gone. Semaphores still
    registered (queues of workers) are unlinked first through multiprocessing's own finalizers, which
    would otherwise start a new tracker at interpreter exit to unregister them."""
    import gc
    from multiprocessing import forkserver, resource_tracker, util

    gc.collect()
    util._run_finalizers(0)  # what atexit would run: SemLock._cleanup unregisters with the live tracker
    left = []
    for name, obj, pid_attr, fd_attr in (
            ("forkserver", forkserver._forkserver, "_forkserver_pid", "_forkserver_alive_fd"),
            ("resource tracker", resource_tracker._resource_tracker, "_pid", "_fd")):
        pid, fd = getattr(obj, pid_attr, None), getattr(obj, fd_attr, None)
        if pid is None:
            continue
        if fd is not None:
            os.close(fd)  # EOF: the forkserver leaves its accept loop, the tracker its read loop
            setattr(obj, fd_attr, None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            if done:
                setattr(obj, pid_attr, None)
                break
            if time.monotonic() > deadline:
                left.append(f"{name} (pid {pid})")
                break
            time.sleep(0.02)
    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:
        forkserver._forkserver._forkserver_address = None
    return left
