"""Reloading the config (SIGHUP, ``beemond reload``): validate the new file in a forkserver child, then
restart only the workers whose settings changed, start added sensors and processors and stop removed
ones (their records flushed). An invalid file is logged (file, key) and the running config kept.
``spool_dir``, ``host``, ``status_socket`` and ``[metrics]`` need a full restart and are kept.

:class:`Reloading` is the part of :class:`beemond.supervisor.orchestrator.Orchestrator` that does it;
it reads and writes the orchestrator's ``cfg``, ``workers``, ``ctx`` and ``notifier``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from pathlib import Path

from beemond import ipc
from beemond.config import ConfigError
from beemond.spool import Spool
from beemond.supervisor.state import ALIVE, RestartPolicy, WorkerProcess, WorkerState

log = logging.getLogger("beemond.supervisor.orchestrator")   # one logger for the supervisor's lines

# [daemon] keys the workers themselves read; a change restarts them all.
WORKER_DAEMON_KEYS = ("heartbeat_interval_s", "log_level")
# [daemon] keys the uploader reads (it enforces the spool limits); a change restarts it.
SPOOL_LIMIT_KEYS = ("spool_max_bytes", "spool_min_free_bytes", "drop_oldest_when_full")
# [daemon] keys that only a full restart can change (the spool lock, names of everything on disk).
RESTART_ONLY_KEYS = ("spool_dir", "host", "status_socket")


class Reloading:
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
        keys = bundle_key_files(new)
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
            self._stop_worker(name, WorkerState.REMOVING)
        for name in restart:
            self._stop_worker(name, WorkerState.RESTARTING)
        added = [name for name in new_units if name not in old_units]
        if new.telemetry.active != old.telemetry.active:
            log.info("%s: telemetry %s", why, "on" if new.telemetry.active else "off")
            if new.telemetry.active:
                self._add(WorkerProcess("telemetry", "telemetry"))
            else:
                self._stop_worker("telemetry", WorkerState.REMOVING)
        for name, role in new_units.items():
            if name not in old_units:
                log.info("%s: %s %s added", why, role, name)
                if role == "processor":
                    Spool(new.spool).processing_dir(name).mkdir(parents=True, exist_ok=True)
                self._add(WorkerProcess(role, name))
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
                w.commands.put(ipc.Shutdown("config reloaded"))
            except (OSError, ValueError):
                w.process.kill()
        elif state == WorkerState.REMOVING:
            del self.workers[name]  # in backoff or failed: nothing runs
        else:
            RestartPolicy.reset(w.history)
            self._spawn(w)  # a failed sensor gets a fresh start with its new settings


def _check_config(path: str, verdict) -> None:
    """In a short-lived forkserver child: the full :func:`beemond.config.load` of *path*; sends ``None``
    or the ``ConfigError``'s (file, key, message) down the *verdict* pipe."""
    from beemond import config

    try:
        config.load(path)
        verdict.send(None)
    except ConfigError as e:
        verdict.send((e.file, e.key, e.message))


def bundle_key_files(cfg) -> str:
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
