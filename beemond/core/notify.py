"""The systemd service notification protocol (``sd_notify(3)``), in plain Python.

systemd passes a ``Type=notify`` service the path of an ``AF_UNIX``/``SOCK_DGRAM`` socket in
``$NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` assignments to it, one datagram
per message (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``RELOADING=1``, ``STOPPING=1``). A path
starting with ``@`` names a socket in the abstract namespace (the ``@`` stands for a leading NUL byte).
``$WATCHDOG_USEC`` is the watchdog interval in µs (``WatchdogSec=``); it applies to us only if
``$WATCHDOG_PID`` is unset or equals our PID. See sd_notify(3) and sd_watchdog_enabled(3); the wire
format is documented in systemd's "systemd.service(5)" under Type=notify and in sd_notify(3) NOTES.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same in a
terminal. No dependency: the protocol is one ``sendto`` per message.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages for this process. Never raises: a lost notification must not stop
    recording (systemd then times the start out or the watchdog fires, which is the right outcome)."""

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET", "")
        self.watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1`` (half ``WatchdogSec=``, as sd_watchdog_enabled(3) advises),
        or ``None`` when the watchdog is off or meant for another process."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: object) -> bool:
        """Send one message: ``send(READY=1, STATUS="ok")`` -> ``b"READY=1\\nSTATUS=ok"``.
        Returns True if the datagram was sent. A newline in a value is replaced (it would split it)."""
        if not self.address:
            return False
        msg = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, addr)
            self._failed = False
            return True
        except OSError as e:
            if not self._failed:  # log once per outage, not per heartbeat
                log.warning("sd_notify to %s failed: %s", self.address, e)
            self._failed = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        return self.send(RELOADING=1)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_usec(env) -> int:
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0
    return usec if usec > 0 else 0


def strip_environment() -> None:
    """Remove the notification variables so that worker processes (started later through the
    forkserver) cannot speak for the service; the orchestrator keeps its own :class:`Notifier`."""
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)
