"""``beemond status`` / ``reload`` / ``pause`` / ``resume``: the running daemon over a unix socket.

Why a unix socket rather than the /metrics endpoint: it works with metrics disabled or bound
elsewhere, it carries what Prometheus series cannot say well (a worker's last error, time to its
next restart, reading ages), and access follows file permissions instead of being open to anything
that can reach a TCP port.

Where: ``daemon.status_socket`` (default ``SPOOL/status.sock``). Under systemd the example config puts
it in the unit's ``RuntimeDirectory=`` (``/run/beemond``, mode 0750, owner beemond:beemond) and the
daemon makes the socket 0660, so members of group ``beemond`` may ask while the spool stays 0700. A
client needs nothing but that location (:func:`beemond.config.status_socket`); one who may not connect
gets :class:`NoPermission` (exit 77, ``EX_NOPERM``), not "not running".

Protocol: connect, send one JSON line and shut down the writing side; the daemon answers one JSON
document and closes. ``{"cmd": "status"}`` (or an empty request) answers
:meth:`beemond.supervisor.metrics.Health.status`; ``{"cmd": "stop" | "start", "worker": NAME}`` sends that
command to a sensor or processor (``beemond pause`` / ``beemond resume``: e.g. silence the microphone
during a hive inspection) and answers ``{"ok": bool, "message": str}``; ``{"cmd": "reload"}`` makes the
orchestrator load its config file again and answers its verdict once applied (``{"ok": true,
"restarted": [...], "removed": [...], "added": [...], "message"}`` or ``{"ok": false, "file", "key",
"message"}``; the old config keeps running). The server is a daemon thread of the orchestrator blocked
in ``accept()``: no polling.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import threading
import time
from pathlib import Path
from beemond import errors, ipc
from beemond.errors import ControlError

from beemond.supervisor.state import ALIVE, WorkerState

log = logging.getLogger(__name__)

EXIT_NOT_RUNNING = errors.EX_NOT_RUNNING
EXIT_NO_PERMISSION = errors.EX_NOPERM
RELOAD_TIMEOUT_S = 60.0   # a reload only validates and sends stop commands: seconds at most
STATUS_EVERY_S = 10.0    # at most one unchanged STATUS= line this often


class NotRunning(ControlError):
    """No daemon answers on the status socket."""


class NoPermission(ControlError):
    """The socket (or the config naming it) exists but this user may not use it."""


def no_permission(path) -> NoPermission:
    try:  # the effective user, not $USER (sudo -u, setpriv keep the caller's environment)
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return NoPermission(f"beemond: permission denied on {path} (add {user} to group beemond)")


class StatusServer:
    def __init__(self, path: Path, snapshot, control=None, reload=None):
        """*snapshot()* -> status dict; *control(kind, worker)* -> (ok, message) for start/stop;
        *reload(timeout)* -> verdict dict (called in this server's thread; it waits for the main loop)."""
        self.path = Path(path)
        self.snapshot = snapshot
        self.control = control
        self.reload = reload
        self.sock: socket.socket | None = None

    def start(self) -> None:
        """Bind and serve. Failure (a path longer than AF_UNIX allows, a read-only directory) is
        logged: the daemon records without its status socket."""
        try:
            # A run outside systemd with the installed config: no RuntimeDirectory made it.
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # We hold the spool lock, so a socket file left here belongs to a dead daemon.
            self.path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o660)
            sock.listen(8)
        except OSError as e:
            log.error("status socket %s unavailable (%s); `beemond status` will not answer", self.path, e)
            return
        self.sock = sock
        threading.Thread(target=self._serve, name="status", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            try:
                with conn:
                    conn.settimeout(5)
                    conn.sendall(json.dumps(self._answer(_read_request(conn))).encode())
            except Exception as e:  # one bad client (gone, slow) must not end the server
                log.debug("status client: %s", e)

    def _answer(self, req: dict) -> dict:
        cmd = req.get("cmd", "status")
        if cmd == "status":
            return self.snapshot()
        if cmd in ("start", "stop") and self.control is not None and isinstance(req.get("worker"), str):
            ok, message = self.control(cmd, req["worker"])
            return {"ok": ok, "message": message}
        if cmd == "reload" and self.reload is not None:
            return self.reload(RELOAD_TIMEOUT_S)
        return {"ok": False, "message": f"unknown request {req!r}"}

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self.sock.close()
            self.sock = None
            self.path.unlink(missing_ok=True)


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while len(data) < 4096 and (chunk := conn.recv(4096)):
        data += chunk
    try:
        req = json.loads(data) if data.strip() else {}
    except ValueError:
        return {"cmd": "invalid"}
    return req if isinstance(req, dict) else {"cmd": "invalid"}


def query(path: Path, timeout: float = 5.0, request: dict | None = None) -> dict:
    """Send *request* (default: status) to the daemon listening on socket *path*; its answer.
    Raises :class:`NotRunning` or :class:`NoPermission`."""
    path = Path(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request or {"cmd": "status"}).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"beemond is not running (no daemon answers on {path})") from None
    except PermissionError:
        # EACCES on the socket or a directory above it: the daemon may well be running.
        raise no_permission(path) from None
    except OSError as e:
        raise NotRunning(f"beemond status: cannot reach {path}: {e.strerror or e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise NotRunning(f"beemond status: garbled answer on {path}") from None


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ago(s: float | None) -> str:
    return "never" if s is None else f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_status(st: dict) -> str:
    """A short human summary of :func:`query`'s answer."""
    clock = st["clock"]["synchronised"]
    lines = [f"beemond {st['version']} on {st['host']}: up {st['uptime_s']:.0f} s, pid {st['pid']}, clock "
             + {True: "synchronised", False: "NOT synchronised", None: "state unknown"}[clock]]
    width = max(len(w["name"]) for w in st["workers"])
    for w in st["workers"]:
        state = w["state"]
        if state == "running" and w.get("paused"):
            state = "paused"
        if state == "backoff":
            state += f" (restart in {w['restart_in_s']:.0f} s)"
        elif state == "failed" and "restart_in_s" in w:
            state += f" (next try in {_duration(w['restart_in_s'])})"
        line = f"  {w['name']:<{width}}  {w['role']:<10} {state:<12} restarts {w['restarts']}"
        if w["readings"]:
            line += "  " + " ".join(f"{k}={v['value']:.4g}" for k, v in sorted(w["readings"].items()))
            line += f" ({_ago(min(v['age_s'] for v in w['readings'].values()))})"
        if w.get("last_error") and w["state"] != "running":
            line += f"  last error: {w['last_error']['message']}"
        lines.append(line)
    lines.append(f"backlog: staging {st['staging']['files']} record(s), {_size(st['staging']['bytes'])}; "
                 f"outbox {st['outbox']['files']} bundle(s), {_size(st['outbox']['bytes'])}")
    up = st["uploaded"]
    lines.append(f"last upload: {st['last_upload'] or 'none since start'}"
                 + (f" ({_ago(st['last_upload_age_s'])})" if st["last_upload"] else "")
                 + f"; uploaded {up['files']} bundle(s), {_size(up['bytes'])}, {up['errors']} failed attempt(s)")
    if "telemetry" in st:
        tm = st["telemetry"]
        lines.append(f"telemetry: {'connected' if tm['connected'] else 'NOT connected'}, {tm['buffered']} reading(s) "
                     f"waiting, {tm['published']} published, {tm['dropped']} dropped")
    for a in st["alerts"]:
        lines.append(f"ALERT {a['alert']} on {a['sensor']}: {a['count']} since start")
    return "\n".join(lines)


class Reporting:
    """The orchestrator's reporting: /metrics and the status socket (their servers started and
    stopped, ``beemond pause``/``resume`` applied), and systemd's notifications (``Type=notify``,
    :mod:`beemond.core.notify`): ``READY=1`` once every worker has reported in, a ``STATUS=`` summary line
    when it changes, and ``WATCHDOG=1`` every half ``WatchdogSec=`` but only while every running
    worker's heartbeat is fresh: a hung worker is killed and restarted by the orchestrator, a hung
    orchestrator by systemd. Reads the orchestrator's ``cfg``, ``d``, ``workers``, ``outbox`` and
    ``notifier``."""

    # ---- health: /metrics and the status socket (beemond.supervisor.metrics, beemond.supervisor.status)
    def _start_health(self) -> None:
        from beemond.supervisor import metrics

        self.health = metrics.Health(self.cfg, self.workers)
        self.observers.append(self.health)
        self.health.start_http()
        self.status_server = StatusServer(self.cfg.status_socket, self.health.status, self._control,
                                          self.request_reload)
        self.status_server.start()

    def _control(self, kind: str, name: str) -> tuple[bool, str]:
        """``beemond pause|resume NAME`` (status socket thread): STOP/START to a sensor or processor.
        Only a queue put, which is thread-safe; the worker's state is read, never written, here."""
        w = self.workers.get(name)
        if w is None or w.role not in ("sensor", "processor"):
            choices = ", ".join(n for n, x in self.workers.items() if x.role in ("sensor", "processor"))
            return False, f"no sensor or processor {name!r} (have: {choices})"
        if not self._command(name, (ipc.Stop if kind == "stop" else ipc.Start)("beemond CLI")):
            return False, f"{name} is {w.state}, not running"
        w.paused = kind == "stop"  # a plain attribute store: the main loop only reads it
        log.info("%s sent to %s from the command line", kind, name)
        return True, f"{'paused' if kind == 'stop' else 'resumed'} {name}"

    def _stop_health(self) -> None:
        if self.status_server is not None:
            self.status_server.stop()
        if self.health is not None:
            self.health.stop_http()

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
        for state in (WorkerState.BACKOFF, WorkerState.FAILED):
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
