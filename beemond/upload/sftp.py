"""SFTP transport (paramiko; SFTP version 3, draft-ietf-secsh-filexfer-02), one SSH connection reused.

Security: the server's host key must already be in ``known_hosts`` (OpenSSH format, ``[host]:port``
for a non-default port); an unknown key is refused (``RejectPolicy``), never added. Authentication by
private key (``key_file`` or the systemd credential ``key_credential``), else by password; no agent
and no keys from ``~/.ssh`` (``allow_agent=False, look_for_keys=False``), so the daemon uses exactly
what its config names.

Throughput: paramiko is CPU-bound on a Pi, so the cipher list prefers AES-GCM (one pass, no separate
MAC), the channel gets a large window, and writes are pipelined (no round trip per request) with
requests of up to 255 KiB (OpenSSH's sftp-server accepts messages up to 256 KiB) instead of 32 KiB.
Renames use ``posix-rename@openssh.com``, which replaces a stale target atomically.

Resume: a cut transfer continues by opening the remote ``.part`` for writing without truncation and
writing from its current size (each SFTP write carries its offset, so this is exact). Before the
handle is closed (which waits for every pipelined write's status) the socket's send queue is
drained, so that wait is short on a slow link.

Logging: paramiko's transport thread logs a connection that breaks (a reset, EOF during the key
exchange) at ERROR, some of it with a traceback. The same failure reaches the uploader as an
exception, which logs it as one WARNING line, so those records are dropped here (:class:`_Quiet`).
"""

from __future__ import annotations

import errno
import logging

import paramiko
from paramiko.sftp import SFTPError

from beemond.upload.transport import PermanentError, RemoteTransport, TransportError, in_flight, read_secret, shut

log = logging.getLogger(__name__)


class _Quiet(logging.Filter):
    """Drops paramiko's ERROR records about a broken connection (see the module's docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


logging.getLogger("paramiko.transport").addFilter(_Quiet())

WINDOW = 16 * 1024 * 1024
MAX_PACKET = 32768  # OpenSSH's session channels; larger is clamped by the server anyway
REQUEST = 255 * 1024
BLOCK = 1024 * 1024
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


class SftpTransport(RemoteTransport):
    # SFTPError: "Garbage packet received" and the like when a reset cuts a reply in half.
    errors: tuple[type[BaseException], ...] = (paramiko.SSHException, SFTPError, EOFError)
    scheme = "sftp"
    default_port = 22
    resumable = True

    def __init__(self, up):
        super().__init__(up)
        self.client: paramiko.SSHClient | None = None
        self.sftp: paramiko.SFTPClient | None = None

    @property
    def connected(self) -> bool:
        return self.sftp is not None

    def permanent(self, e: BaseException) -> bool:
        return isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno == errno.EACCES)

    def _transport(self, sock, **kw):
        t = paramiko.Transport(sock, default_window_size=WINDOW, **kw)
        opts = t.get_security_options()
        opts.ciphers = [c for c in CIPHERS if c in opts.ciphers] + [c for c in opts.ciphers if c not in CIPHERS]
        return t

    def connect(self) -> None:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.load_host_keys(str(self.up.known_hosts))
        except OSError as e:
            raise TransportError(f"cannot read upload.known_hosts {self.up.known_hosts}: {e.strerror or e}") from None
        key_path = read_secret(self.up.key_file, self.up.key_credential)
        pkey = None
        if key_path is not None:
            try:
                pkey = paramiko.PKey.from_path(key_path)
            except (OSError, paramiko.SSHException, ValueError) as e:
                # The message names the file and the problem, never the key's bytes.
                raise TransportError(f"cannot load the SSH private key {key_path}: "
                                     f"{getattr(e, 'strerror', None) or type(e).__name__}") from None
        where = f"{self.up.host}:{self.port}"
        try:
            client.connect(self.up.host, self.port, username=self.up.user, pkey=pkey,
                           password=None if pkey else (self.up.password() or None),
                           timeout=self.up.timeout_s, banner_timeout=self.up.timeout_s,
                           auth_timeout=self.up.timeout_s, allow_agent=False, look_for_keys=False,
                           transport_factory=self._transport)
            sftp = paramiko.SFTPClient.from_transport(client.get_transport(), window_size=WINDOW,
                                                      max_packet_size=MAX_PACKET)
            sftp.get_channel().settimeout(self.up.timeout_s)
            self.home = sftp.normalize(".")
        except paramiko.BadHostKeyException as e:
            client.close()
            raise TransportError(f"host key of {where} does not match {self.up.known_hosts} "
                                 f"(got {e.key.get_name()} {e.key.fingerprint}); refusing to connect") from None
        except paramiko.AuthenticationException as e:
            client.close()
            raise TransportError(f"authentication as {self.up.user} on {where} failed: {e}") from None
        except paramiko.SSHException as e:
            client.close()
            if "not found in known_hosts" in str(e):
                raise TransportError(f"host key of {where} is not in {self.up.known_hosts}; refusing to "
                                     "connect (check the server's fingerprint, then add its key there)") from None
            raise
        except BaseException:
            client.close()
            raise
        self.client, self.sftp = client, sftp
        self._dirs = set()

    def _make_dir(self, path: str) -> None:
        try:
            self.sftp.stat(path)
        except FileNotFoundError:
            try:
                self.sftp.mkdir(path)
            except PermissionError as e:
                raise PermanentError(f"cannot create remote directory {path}: {e.strerror or e}") from None

    def put(self, reader, remote: str, offset: int = 0) -> None:
        # "r+": no O_TRUNC, so the bytes before *offset* stay; "w" creates or truncates.
        with self.sftp.open(remote, "r+b" if offset else "wb", bufsize=0) as f:
            f.MAX_REQUEST_SIZE = REQUEST  # per file: OpenSSH takes 255 KiB writes, paramiko defaults to 32 KiB
            f.set_pipelined(True)
            f.seek(offset)
            reader.sock = self._sock()
            while data := reader.read(BLOCK):
                f.write(data)
            reader.drain(self._sock())
        # Leaving the block closes the handle, which waits for every pipelined write's status.

    def _sock(self):
        t = self.client.get_transport() if self.client is not None else None
        return t.sock if t is not None else None

    def in_flight(self) -> int:
        sock = self._sock()
        return in_flight(sock) if sock is not None else 0

    def abort(self) -> None:
        # paramiko's socket writes retry on timeouts until the transport is closed; a shut-down
        # socket makes them fail (EOFError) and the reader thread end.
        shut(self._sock())

    def size(self, remote: str) -> int:
        return int(self.sftp.stat(remote).st_size)

    def rename(self, src: str, dst: str) -> None:
        self.sftp.posix_rename(src, dst)

    def close(self) -> None:
        client, self.client, self.sftp = self.client, None, None
        if client is not None:
            client.close()
