"""FTP and FTPS transports (``ftplib``: RFC 959, SIZE from RFC 3659, FTPS per RFC 4217), one
connection reused across files.

Paths are absolute from the login directory, so a reconnect cannot land the next upload elsewhere.
The password is read from its file at connect time and never logged.

FTPS: explicit TLS (``AUTH TLS``), ``PROT P`` so the data channel is encrypted too, the server
certificate verified against the system CAs or ``ca_file`` (and its name against ``host``). The data
connection resumes the control connection's TLS session (RFC 4217 §10.2 lets a server insist, and
vsftpd's default ``require_ssl_reuse=YES`` does: stock ``ftplib`` gets ``522``), which also stops a
third party from hijacking the data port.

Resume: where the server's ``FEAT`` lists ``REST STREAM`` (RFC 3659 §5; pyftpdlib and vsftpd both
do, vsftpd for any user it lets write), a cut ``STOR`` continues with ``REST N`` + ``STOR``, which
writes from byte N of the existing ``.part`` without truncating it. Without it every retry starts
from 0. After the last chunk the data socket's send queue is drained before it is closed, so the wait
for the server's ``226`` is short and bounded whatever the link's speed.
"""

from __future__ import annotations

import ftplib
import logging
import ssl

from beemond.upload.transport import PermanentError, RemoteTransport, TransportError, in_flight, shut

log = logging.getLogger(__name__)

BLOCK = 256 * 1024
# Replies that refuse one file for good: 550 (no permission / not allowed), 553 (name not allowed).
PERMANENT_CODES = ("550", "553")


class FtpTransport(RemoteTransport):
    errors: tuple[type[BaseException], ...] = (ftplib.Error, EOFError)
    scheme = "ftp"
    default_port = 21

    def __init__(self, up):
        super().__init__(up)
        self.ftp: ftplib.FTP | None = None
        self.data = None  # the data connection of the transfer in progress
        self.resumable = False

    @property
    def connected(self) -> bool:
        return self.ftp is not None

    def permanent(self, e: BaseException) -> bool:
        return isinstance(e, ftplib.error_perm) and str(e)[:3] in PERMANENT_CODES

    def _client(self) -> ftplib.FTP:
        return ftplib.FTP(timeout=self.up.timeout_s)

    def _secure(self, ftp) -> None:
        """FTPS: protect the data channel (after login)."""

    def connect(self) -> None:
        ftp = self._client()
        try:
            ftp.connect(self.up.host, self.port)
            ftp.login(self.up.user, self.up.password())
            self._secure(ftp)
            ftp.voidcmd("TYPE I")  # SIZE is defined for binary transfers only
            self.home = ftp.pwd() or "/"
            self.resumable = "REST STREAM" in self._features(ftp)
        except BaseException:
            ftp.close()
            raise
        self.ftp = ftp
        self._dirs = set()

    @staticmethod
    def _features(ftp) -> set[str]:
        """The server's ``FEAT`` lines (RFC 2389), upper-cased; empty if it does not know FEAT."""
        try:
            reply = ftp.sendcmd("FEAT")
        except ftplib.error_perm:
            return set()
        return {line.strip().upper() for line in reply.splitlines()[1:-1]}

    def _make_dir(self, path: str) -> None:
        try:
            self.ftp.mkd(path)
        except ftplib.error_perm as e:
            # 550 both for "exists" and "not allowed": tell them apart by entering it.
            try:
                self.ftp.cwd(path)
            except ftplib.error_perm:
                raise PermanentError(f"cannot create remote directory {path}: {str(e).strip()}") from None

    def put(self, reader, remote: str, offset: int = 0) -> None:
        # ftplib's storbinary, with a send loop whose every call may time out on its own (sendall's
        # timeout covers the whole chunk) and the send queue drained before the 226 is awaited.
        if offset and not self.resumable:
            raise TransportError(f"server cannot resume (no REST STREAM in FEAT): {remote}")
        conn = self.ftp.transfercmd(f"STOR {remote}", offset or None)
        self.data = reader.sock = conn
        try:
            while chunk := reader.read(BLOCK):
                view = memoryview(chunk)
                while view:
                    view = view[conn.send(view):]
            reader.drain(conn)
            if isinstance(conn, ssl.SSLSocket):
                conn.unwrap()
        finally:
            self.data = None
            conn.close()
        self.ftp.voidresp()

    def in_flight(self) -> int:
        return in_flight(self.data) if self.data is not None else 0

    def abort(self) -> None:
        shut(self.data)
        if self.ftp is not None:
            shut(self.ftp.sock)

    def part_size(self, remote: str) -> int | None:
        try:
            value = self.ftp.size(remote)
        except ftplib.error_perm:  # 550: no such file (or not a plain file: the upload replaces it)
            return None
        return int(value) if value is not None else None

    def size(self, remote: str) -> int:
        try:
            value = self.ftp.size(remote)
        except ftplib.error_perm as e:  # "550 no such file" here is a lost upload, not a refusal
            raise TransportError(f"SIZE {remote} failed: {str(e).strip()}") from None
        if value is None:
            raise TransportError(f"server did not report the size of {remote}")
        return int(value)

    def rename(self, src: str, dst: str) -> None:
        self.ftp.rename(src, dst)

    def close(self) -> None:
        ftp, self.ftp = self.ftp, None
        if ftp is None:
            return
        try:
            ftp.quit()
        except (*ftplib.all_errors, EOFError):
            ftp.close()


class _SessionReusingFTP_TLS(ftplib.FTP_TLS):
    """``FTP_TLS`` whose data connections resume the control connection's TLS session."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


class FtpsTransport(FtpTransport):
    errors = (ftplib.Error, EOFError)  # ssl.SSLError (a bad certificate, ...) is an OSError
    scheme = "ftps"

    def _client(self) -> ftplib.FTP:
        try:
            context = ssl.create_default_context(cafile=str(self.up.ca_file) if self.up.ca_file else None)
        except OSError as e:
            raise TransportError(f"cannot load upload.ca_file {self.up.ca_file}: {e.strerror or e}") from None
        return _SessionReusingFTP_TLS(context=context, timeout=self.up.timeout_s)

    def connect(self) -> None:
        try:
            super().connect()
        except ssl.SSLCertVerificationError as e:
            raise TransportError(f"TLS certificate of {self.up.host}:{self.port} rejected: {e.verify_message} "
                                 f"(trusted: {self.up.ca_file or 'system CAs'})") from None

    def _secure(self, ftp) -> None:
        ftp.prot_p()
