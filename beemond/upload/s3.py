"""S3-compatible object storage (``[upload] protocol = "s3"``): one conditional, checksummed PUT per file.

Exactly once, checked by the server. Each object is written by a single ``PUT`` of its final key
(``remote_dir`` as a key prefix, then the ``layout``) carrying

- ``If-None-Match: *``: the server refuses to replace an existing object (412 Precondition Failed).
  A bundle sent again after a crash between the server's 200 and our local delete gets 412; the
  object is then read back with a ``HEAD`` and its size and SHA-256 (``x-amz-meta-sha256``, stored
  with it) compared with ours: equal means delivered, different means another object holds the name
  (a :class:`PermanentError`: quarantined, never overwritten).
- ``x-amz-checksum-sha256`` (base64 SHA-256 of the body, AWS "Checking object integrity"): the server
  recomputes it and refuses corrupted bytes (400 ``BadDigest``, retried), so a 200 means the server
  holds exactly our bytes. The body's hash is also the signature's payload hash (SigV4
  ``x-amz-content-sha256``), so the file is hashed once before it is sent.

No ``.part`` and no rename: an S3 PUT is atomic (a half-sent object never becomes visible). The
uploader sends the ``.sig`` first, as for every transport.

Why not obstore's ``put``: with ``mode="create"`` (its If-None-Match) obstore does a single,
non-multipart PUT and *materialises the whole payload in memory* first (its documented behaviour,
measured in bench/upload.py: a 200 MB bundle peaks at 276 MB RSS, against 21 MB here), which a 512 MB Pi cannot
afford for 100 MB audio bundles, and its multipart path offers neither the precondition nor a way to
resume an upload across restarts. boto3 costs 40 MB RSS (import and one client, measured here;
this module with http.client and ssl: 9 MB). So this module signs its own requests
(AWS Signature Version 4, header-based; checked against AWS's published example) and streams the file
through ``http.client`` in constant memory, with one keep-alive connection reused across files.

Large bundles: a single streaming PUT, bounded by ``[bundle] max_bytes`` (S3 caps a PUT at 5 GiB).
Multipart with resumption across restarts was weighed and left out: S3's parts are at least 5 MiB and
a part cannot itself resume, so on the field's 10–20 KB/s links with a reset every couple of minutes
(1.2–2.4 MB between resets) a part never completes either; there only small bundles go, whatever the
protocol. On fast links a 100 MB PUT takes seconds. The numbers are in the README's Uploads section.

Credentials: ``user`` is the access key id, ``password_file`` / ``password_credential`` the secret
access key (read at connect, never logged). Errors: connection failures, timeouts (``timeout_s`` on
every socket operation: a stall, not a slow transfer, fails), 5xx, 400 BadDigest, 403 and NoSuchBucket
are transient (the bundle stays and is retried: a wrong key must not quarantine a month of data);
only a key the server refuses as a name (400 InvalidKey/KeyTooLong) or a different object under our
name is permanent.
"""

from __future__ import annotations

import base64
import datetime
import errno
import hashlib
import hmac
import http.client
import logging
import os
import posixpath
import re
import select
import socket
import time
import urllib.parse

from beemond.upload.transport import LocalFileError, PermanentError, TransportError, in_flight, shut

log = logging.getLogger(__name__)

BLOCK = 1024 * 1024
# Bytes per socket write: Python's socket timeout bounds a whole sendall(), so a piece must cross the
# slowest link well within timeout_s (64 KiB: 6.5 s at 10 KB/s); the timeout then means "no progress".
SEND_PIECE = 64 * 1024
HEAD_FIRST_BYTES = 1024 * 1024   # a larger file is looked up before it is sent (a HEAD costs one round trip)
# A kept connection idle this long is replaced before the next request: servers drop idle keep-alive
# connections (S3 after some seconds), and a request on a dropped one would count as a failed upload.
IDLE_REOPEN_S = 10.0
MAX_PUT_BYTES = 5 * 2**30        # S3's limit for a single PUT
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
PERMANENT_CODES = ("InvalidKey", "KeyTooLongError", "InvalidObjectName")


def sigv4_headers(method: str, host: str, path: str, query: str, headers: dict[str, str], payload_sha256: str,
                  access_key: str, secret_key: str, region: str, now: datetime.datetime) -> dict[str, str]:
    """*headers* plus ``host``, ``x-amz-date``, ``x-amz-content-sha256`` and ``authorization``, signed
    with AWS Signature Version 4 (service ``s3``; every header given is signed). *path* is the
    URI-encoded path as it goes on the request line; *query* the canonical query string ("" if none)."""
    amz_date = now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    out = {k.lower(): str(v) for k, v in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    signed = sorted(out)
    canonical = "\n".join([method, path, query, "".join(f"{k}:{' '.join(out[k].split())}\n" for k in signed),
                           ";".join(signed), payload_sha256])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope},SignedHeaders={';'.join(signed)},"
                            f"Signature={signature}")
    return out


def _error_code(body: bytes) -> str:
    m = re.search(rb"<Code>([^<]+)</Code>", body)
    return m[1].decode(errors="replace") if m else ""


class S3Transport:
    """The transport interface of :mod:`beemond.upload.transport` for S3, with :meth:`store` in place of
    ``put``/``size``/``rename`` (``stores_whole = True``: the uploader sends whole objects)."""

    errors: tuple[type[BaseException], ...] = (http.client.HTTPException,)
    stores_whole = True
    resumable = False   # a PUT cannot continue where a cut one stopped (see the module docstring)

    def __init__(self, up):
        self.up = up
        u = urllib.parse.urlsplit(up.endpoint)
        self.https = u.scheme == "https"
        self.hostname = u.hostname or ""
        self.port = u.port or (443 if self.https else 80)
        default = (self.https and self.port == 443) or (not self.https and self.port == 80)
        self.host_header = self.hostname if default else f"{self.hostname}:{self.port}"
        self.base = u.path.rstrip("/")
        self.conn: http.client.HTTPConnection | None = None
        self._secret = ""
        self._used = 0.0   # monotonic time of the last response on self.conn

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def describe(self) -> str:
        return f"s3://{self.up.bucket} at {self.up.endpoint}"

    def permanent(self, e: BaseException) -> bool:
        return isinstance(e, PermanentError)

    def path(self, relative: str) -> str:
        prefix = self.up.remote_dir.strip("/")
        return posixpath.join(prefix, relative) if prefix else relative

    def ensure_dir(self, path: str) -> None:
        """Object keys need no directories."""

    def part_size(self, remote: str) -> int | None:
        """No ``.part`` objects here: None. (A ``.sig`` sent again meets If-None-Match and a HEAD.)"""
        return None

    def in_flight(self) -> int:
        """Bytes written to the connection and not yet acknowledged by the server: the uploader's stall
        guard counts a shrinking queue as progress (a PUT's last megabytes drain for minutes at 10 KB/s)."""
        conn = self.conn
        return in_flight(conn.sock) if conn is not None and conn.sock is not None else 0

    def abort(self) -> None:
        """From another thread: shut the socket down so that a blocked send or read returns."""
        conn = self.conn
        shut(conn.sock if conn is not None else None)

    def connect(self) -> None:
        self._secret = self.up.password()   # read now: a rotated credential is picked up on reconnect
        self._open()
        status, headers, body = self._request("HEAD", "")
        if status == 404:
            self.close()
            raise TransportError(f"bucket {self.up.bucket!r} does not exist at {self.up.endpoint}")
        if status in (301, 400, 403):
            self.close()
            raise TransportError(f"bucket {self.up.bucket!r} at {self.up.endpoint} refused access "
                                 f"(HTTP {status}): check user (the access key id), the secret and region")

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _open(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.hostname, self.port, timeout=self.up.timeout_s)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        self.close()
        self.conn, self._used = conn, time.monotonic()
        return conn

    # ---- requests
    def _target(self, key: str) -> str:
        return urllib.parse.quote(f"{self.base}/{self.up.bucket}" + (f"/{key}" if key else ""), safe="/-_.~")

    def _request(self, method: str, key: str, headers: dict | None = None, body_sha256: str = EMPTY_SHA256,
                 body=None, length: int = 0) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One signed request on the kept connection; *body* is a reader streamed in :data:`BLOCK`\\ s."""
        target = self._target(key)
        signed = sigv4_headers(method, self.host_header, target, "", dict(headers or {}), body_sha256,
                               self.up.user, self._secret, self.up.region,
                               datetime.datetime.now(datetime.timezone.utc))
        conn = self.conn
        if conn is None or time.monotonic() - self._used > IDLE_REOPEN_S:
            conn = self._open()   # the server closed the last one, or may have while it idled
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for k, v in signed.items():
            conn.putheader(k, v)
        if body is not None or method == "PUT":
            conn.putheader("content-length", str(length))
        conn.endheaders()
        if body is not None:
            # A BundleReader paces its chunks by what the socket still holds (about a second's worth
            # each on a slow link), so the stall guard sees steady progress.
            body.sock = conn.sock
            while data := body.read(BLOCK):
                view = memoryview(data)
                for i in range(0, len(view), SEND_PIECE):
                    conn.send(view[i:i + SEND_PIECE])
            self._drain(conn.sock)
        resp = conn.getresponse()
        payload = resp.read()
        self._used = time.monotonic()
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, payload

    def _drain(self, sock) -> None:
        """After a body: wait while the kernel's send queue still shrinks. On a slow link it holds many
        seconds of data (autotuned to megabytes), and the reply's timeout must start only once the
        server has had every byte; a queue that stops shrinking for ``timeout_s`` is a stall."""
        last, since = in_flight(sock), time.monotonic()
        poll = select.poll()
        poll.register(sock, select.POLLERR | select.POLLHUP)
        while last > 0:
            # A reset leaves the queue as it was: it is seen here at once, not after timeout_s.
            if poll.poll(int(min(50, last / 1000))):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
                raise ConnectionResetError(err, os.strerror(err))
            queued = in_flight(sock)
            if queued < last:
                last, since = queued, time.monotonic()
            elif time.monotonic() - since > self.up.timeout_s:
                raise TransportError(f"no progress for {self.up.timeout_s:g} s ({last} bytes not acknowledged)")

    def store(self, f, reader, key: str, size: int) -> None:
        """Store the open local file *f* (read through *reader*, which rate-limits and reports
        progress) as object *key* of *size* bytes, exactly once. Raises :class:`TransportError`
        (retry), :class:`PermanentError` (quarantine), ``OSError`` (connection)."""
        if size > MAX_PUT_BYTES:
            raise PermanentError(f"{size} bytes is over S3's single-PUT limit of 5 GiB; lower [bundle] max_bytes")
        digest = self._sha256(f, reader)
        hexdigest = digest.hex()
        if size >= HEAD_FIRST_BYTES and self._already_there(key, size, hexdigest):
            log.info("%s was already on the server (same size and SHA-256); not sent again", key)
            return
        headers = {"if-none-match": "*", "content-type": "application/octet-stream",
                   "x-amz-checksum-sha256": base64.b64encode(digest).decode(), "x-amz-meta-sha256": hexdigest}
        f.seek(0)
        status, resp_headers, body = self._request("PUT", key, headers, hexdigest, reader, size)
        if status in (200, 201):
            echoed = resp_headers.get("x-amz-checksum-sha256")
            if echoed and echoed != headers["x-amz-checksum-sha256"]:
                raise TransportError(f"{key}: the server reports checksum {echoed}, ours is {headers['x-amz-checksum-sha256']}")
            return
        if status == 412:
            if self._already_there(key, size, hexdigest):
                log.info("%s was already on the server (412 to If-None-Match, same size and SHA-256)", key)
                return
            raise PermanentError(f"another object already holds {key} (412 to If-None-Match; size or SHA-256 differ)")
        raise self._failure(status, body, key)

    def _already_there(self, key: str, size: int, hexdigest: str) -> bool:
        """True if *key* exists with our size and SHA-256; False if absent. Raises PermanentError if it
        exists with other content."""
        status, headers, body = self._request("HEAD", key, {"x-amz-checksum-mode": "ENABLED"})
        if status == 404:
            return False
        if status != 200:
            raise self._failure(status, body, key)
        theirs = headers.get("x-amz-meta-sha256") or ""
        if not theirs and headers.get("x-amz-checksum-sha256"):
            theirs = base64.b64decode(headers["x-amz-checksum-sha256"]).hex()
        if int(headers.get("content-length", -1)) == size and theirs == hexdigest:
            return True
        raise PermanentError(f"another object already holds {key} ({headers.get('content-length')} bytes, "
                             f"sha256 {theirs or 'unknown'}; ours: {size} bytes, {hexdigest})")

    @staticmethod
    def _sha256(f, reader) -> bytes:
        h = hashlib.sha256()
        f.seek(0)
        try:
            while data := f.read(BLOCK):
                h.update(data)
                if reader.progress is not None:
                    reader.progress(0)   # a heartbeat while a large bundle is hashed
        except OSError as e:
            raise LocalFileError(f"cannot read local bundle: {e.strerror or e}") from None
        return h.digest()

    @staticmethod
    def _failure(status: int, body: bytes, key: str) -> Exception:
        code = _error_code(body)
        what = f"HTTP {status}{' ' + code if code else ''} for {key}"
        if code in PERMANENT_CODES:
            return PermanentError(f"the server refuses the name: {what}")
        return TransportError(what)
