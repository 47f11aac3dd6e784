"""The orchestrator's signals: SIGTERM and SIGINT shut down, SIGHUP reloads. Each handler only appends
to a list and the C-level wake-up fd writes a byte into a pipe the run loop selects on beside the
event pipes and process sentinels, so a signal wakes the loop without polling and nothing runs inside
a handler."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("beemond.supervisor.orchestrator")


class Signals:
    """Mixin of :class:`beemond.supervisor.orchestrator.Orchestrator`: uses its ``_signals`` (list),
    ``stopping`` and ``_reload_requested``."""

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

