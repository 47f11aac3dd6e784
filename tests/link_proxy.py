"""A slow, resetting link on 127.0.0.1: a TCP proxy that caps throughput and resets connections.

    proxy = LinkProxy(server_port, rate=12_000, reset_every_s=120, ftp=True).start()
    ... connect to 127.0.0.1:proxy.port ...
    proxy.reset()          # RST every connection now (both sides), as a dropped mobile link does
    proxy.stalled.set()    # nothing moves (no reset either) until .clear()
    proxy.sent_up          # bytes read from the clients (what crossed the link towards the server)
    proxy.stop()

The cap is a token bucket per direction shared by every connection (one radio link), applied to the
proxy's own reads: it reads from a socket only what the bucket grants, and its sockets' receive
buffers are small (``RCVBUF``), so the kernel cannot swallow a whole small bundle at loopback speed
and the sender's send queue fills as it would behind a slow link.

``ftp=True``: the proxy reads the server's replies on each control connection and rewrites ``227``
(PASV) and ``229`` (EPSV) to a port of its own, which it forwards to the server's data port, so data
connections cross the same slow link and are reset with the rest. (FTPS encrypts the control channel:
its replies cannot be rewritten, so FTPS data would bypass the proxy; the tests use plain FTP here.)

Used by tests/test_upload.py and bench/field_upload.py. Threads, one per connection; stop() joins them.
"""

from __future__ import annotations

import re
import selectors
import socket
import struct
import threading
import time

RCVBUF = 8192
PASV_RE = re.compile(rb"^227 .*?\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)")
EPSV_RE = re.compile(rb"^229 .*?\(\|\|\|(\d+)\|\)")


class Bucket:
    """Bytes per second for one direction of the link; ``rate <= 0``: unlimited."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.grain = max(512, int(self.rate / 20)) if self.rate > 0 else 65536
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def grant(self, want: int) -> int:
        """Up to *want* bytes, at least one, after waiting for the credit."""
        if self.rate <= 0:
            return want
        want = min(want, self.grain)
        with self.lock:
            now = time.monotonic()
            self.tokens = min(float(self.grain), self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens < want:
                wait = (want - self.tokens) / self.rate
                time.sleep(wait)
                self.tokens += wait * self.rate
                self.last = time.monotonic()
            self.tokens -= want
        return want

    def refund(self, n: int) -> None:
        """Give back credit granted but not used (a read returned fewer bytes)."""
        if self.rate > 0 and n > 0:
            with self.lock:
                self.tokens = min(float(self.grain), self.tokens + n)


def reset_socket(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, like a dropped mobile link."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _small(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock


class LinkProxy:
    """127.0.0.1:port -> 127.0.0.1:target_port through a link of *rate* bytes/s each way that resets
    every connection every *reset_every_s* seconds (0: only on :meth:`reset`)."""

    def __init__(self, target_port: int, rate: float = 0, reset_every_s: float = 0, ftp: bool = False,
                 down_rate: float | None = None):
        self.target_port, self.ftp, self.reset_every_s = target_port, ftp, reset_every_s
        self.up = Bucket(rate)
        self.down = Bucket(rate if down_rate is None else down_rate)
        self.sent_up = 0  # bytes read from clients
        self.sent_down = 0
        self.resets = 0
        self.connections = 0
        self.generation = 0  # bumped by reset(): pumps of an older generation reset their sockets
        self.stopped = threading.Event()
        self.stalled = threading.Event()  # set: nothing moves either way until cleared
        self.listener = self._listen()
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket()
        _small(s)  # inherited by accepted sockets, so set before listen (tcp(7): before connect/listen)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        return s

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    def start(self) -> "LinkProxy":
        self._spawn(self._accept, self.listener, self.target_port, True)
        if self.reset_every_s > 0:
            self._spawn(self._resetter)
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        for t in list(self.threads):
            t.join(5)

    def reset(self) -> None:
        """Reset every connection open now (control and data)."""
        self.generation += 1

    def _resetter(self) -> None:
        while not self.stopped.wait(self.reset_every_s):
            self.reset()

    def _accept(self, listener: socket.socket, port: int, control: bool, once: bool = False) -> None:
        listener.settimeout(0.2)
        gen = self.generation
        while not self.stopped.is_set() and (not once or gen == self.generation):
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            self._spawn(self._pump, client, port, control and self.ftp)
            if once:
                break
        if once:
            listener.close()

    def _data_port(self, port: int) -> int:
        """A one-shot listener forwarding to the server's data *port*; returns our port."""
        listener = self._listen()
        self._spawn(self._accept, listener, port, False, True)
        return listener.getsockname()[1]

    def _rewrite(self, line: bytes) -> bytes:
        if m := PASV_RE.match(line):
            port = self._data_port(int(m[5]) * 256 + int(m[6]))
            return b"227 Entering Passive Mode (127,0,0,1,%d,%d).\r\n" % (port // 256, port % 256)
        if m := EPSV_RE.match(line):
            return b"229 Entering Extended Passive Mode (|||%d|)\r\n" % self._data_port(int(m[1]))
        return line

    def _pump(self, client: socket.socket, port: int, rewrite: bool) -> None:
        gen = self.generation
        try:
            upstream = _small(socket.socket())
            upstream.connect(("127.0.0.1", port))
        except OSError:
            reset_socket(client)
            return
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (upstream, self.up, True))
        sel.register(upstream, selectors.EVENT_READ, (client, self.down, False))
        pending = b""  # a control reply line not complete yet
        cut = True
        try:
            while not self.stopped.is_set() and gen == self.generation:
                for key, _ in sel.select(0.05):
                    dest, bucket, is_up = key.data
                    if self.stalled.is_set():
                        time.sleep(0.05)  # a link that carries nothing, yet does not break
                        continue
                    granted = bucket.grant(65536)
                    data = key.fileobj.recv(granted)
                    bucket.refund(granted - len(data))
                    if not data:
                        cut = False
                        return
                    if is_up:
                        self.sent_up += len(data)
                    else:
                        self.sent_down += len(data)
                    if rewrite and not is_up:
                        pending += data
                        *lines, pending = pending.split(b"\n")
                        data = b"".join(self._rewrite(x + b"\n") for x in lines)
                    dest.sendall(data)
                    if gen != self.generation:
                        break
            if gen != self.generation:
                self.resets += 1
        except OSError:
            pass
        finally:
            sel.close()
            if cut:
                reset_socket(client)
                reset_socket(upstream)
            else:
                client.close()
                upstream.close()
