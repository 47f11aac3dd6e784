"""The worker runtime: every worker process's entry point (:func:`worker_main`) and the loop they all
share (:class:`Worker`).

A worker process receives commands from its queue (:class:`beemond.ipc.Channel`) and acts on each in
an ``on_<kind>`` method (``on_shutdown``, ``on_stop``, ``on_record_ready``, ...); a kind without a
handler is ignored. Between commands it does its own timed work in :meth:`Worker.tick`, woken no later
than :meth:`Worker.timeout` seconds after the last wake-up. The channel's ``receive`` sends the
heartbeat (never waiting past the next one) and turns SIGTERM or the orchestrator's death (the
orphan check: the event pipe's EPIPE) into a :class:`beemond.ipc.Shutdown`, so no worker needs a
timer of its own for liveness.

Pause and resume (``beemond pause`` / ``resume``) arrive as :class:`beemond.ipc.Stop` and
:class:`beemond.ipc.Start`; the default handlers keep :attr:`Worker.paused` and call the
:meth:`Worker.pause` / :meth:`Worker.resume` hooks on a change.
"""

from __future__ import annotations

import logging
import signal
import sys

from beemond import ipc

log = logging.getLogger(__name__)


class Worker:
    """Base of every worker: the receive loop and ``on_<kind>`` dispatch.

    Subclasses set ``self.channel`` (an :class:`beemond.ipc.Channel`, or any object with ``receive``,
    ``send`` and ``beat``) and override the hooks they need:

    - :meth:`prepare`: once, before the first wait (salvage, rescans, start threads);
    - :meth:`timeout`: seconds until the worker's next own deadline (the wait is shorter if a
      heartbeat is due first);
    - :meth:`tick`: after every wake-up, command or not, unless that command ended the worker;
    - :meth:`cleanup`: once, however the loop ended (also after an exception).
    """

    channel: ipc.Channel
    paused: bool = False     # by a Stop command until a Start
    finished: bool = False   # set by on_shutdown: the loop ends after the current command

    # ---- the loop
    def run(self) -> None:
        try:
            self.prepare()
            while not self.finished:
                cmd = self.next_command(self.timeout())
                if cmd is not None and not self.handle(cmd):
                    break
                self.tick()
        finally:
            self.cleanup()

    def next_command(self, timeout: float) -> ipc.Command | None:
        """The next command, or None after *timeout* seconds."""
        return self.channel.receive(timeout)

    def handle(self, cmd: ipc.Command) -> bool:
        """Act on one command (its ``on_<kind>`` method); False once the worker should end."""
        handler = getattr(self, "on_" + cmd.kind, None)
        if handler is None:
            log.debug("no handler for a %s command; ignored", cmd.kind)
        else:
            handler(cmd)
        return not self.finished

    # ---- hooks
    def prepare(self) -> None:
        pass

    def timeout(self) -> float:
        """Seconds to wait for a command before :meth:`tick` runs anyway."""
        return 3600.0

    def tick(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def pause(self) -> None:
        """Called on a Stop while running: release the device, flush what is open."""

    def resume(self) -> None:
        """Called on a Start while paused."""

    # ---- commands every worker understands
    def on_shutdown(self, cmd: ipc.Shutdown) -> None:
        log.info("shutting down (%s)", cmd.reason)
        self.finished = True

    def on_stop(self, cmd: ipc.Stop) -> None:
        if not self.paused:
            self.paused = True
            self.pause()

    def on_start(self, cmd: ipc.Start) -> None:
        if self.paused:
            self.paused = False
            self.resume()


def worker_main(role: str, name: str, cfg, commands, events) -> None:
    """Entry point of every worker process (started by the orchestrator through the forkserver)."""
    from beemond.core import journal

    journal.setup(name, cfg.daemon.log_level)
    # Held shared until this process ends: a new orchestrator waits for it (see Spool.lock).
    from beemond.spool import Spool

    Spool(cfg.spool).hold_worker_lock()
    channel = ipc.Channel(name, commands, events, cfg.daemon.heartbeat_interval_s)

    def on_term(signum, frame):
        channel.stop_requested = True

    # Ctrl-C in a terminal reaches the whole process group; the orchestrator alone decides the
    # shutdown order (sensors flush first, then the aggregator seals, then the uploader drains).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        worker = _make_worker(role, name, cfg, channel)
        ipc.trim_heap()
        worker.run()
    except Exception as e:
        log.exception("worker failed: %s", e)
        channel.send(ipc.Error(message=f"{type(e).__name__}: {e}"))
        sys.exit(1)
    finally:
        try:
            events.close()
        except OSError:
            pass


def _make_worker(role: str, name: str, cfg, channel: ipc.Channel) -> Worker:
    # Heavy imports (numpy, soundfile, pyrage, watchdog) happen here, in the worker that needs them,
    # never in the orchestrator or the forkserver.
    from beemond import registry

    if role == "sensor":
        sensor = next(s for s in cfg.sensors if s.name == name)
        return registry.lookup(registry.SENSORS, sensor.type, "sensor driver")(cfg, sensor, channel)
    if role == "processor":
        proc = next(p for p in cfg.processors if p.name == name)
        return registry.lookup(registry.PROCESSORS, proc.type, "processor")(cfg, proc, channel)
    return registry.lookup(registry.ROLES, role, "worker role")(cfg, channel)
