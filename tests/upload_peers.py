"""Real upload peers for the tests: a self-signed CA, pyftpdlib FTPS, vsftpd FTPS, OpenSSH sshd, and a
TCP proxy that resets connections. Each runs on a free 127.0.0.1 port, is stopped by the PID we
started, and is waited for with a deadline (see ../shared/TESTBED.md)."""

from __future__ import annotations

import os
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import FtpServer, free_port
from link_proxy import reset_socket

VSFTPD = shutil.which("vsftpd") or ("/usr/sbin/vsftpd" if os.path.exists("/usr/sbin/vsftpd") else None)
SSHD = "/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None
SSH_KEYGEN = shutil.which("ssh-keygen")
OPENSSL = shutil.which("openssl")


def wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    """Until something accepts on 127.0.0.1:*port*, or fail (also if *proc* exited)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"{what} exited with {proc.returncode}: {out}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not listening on {port} after {timeout} s")
            time.sleep(0.05)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def make_cert(directory: Path, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA): (cert.pem, key.pem)."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
                    "-addext", f"subjectAltName=IP:{cn}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def ftps_server(root: Path, password_file: Path, cert: Path, key: Path, *extra: str) -> FtpServer:
    return FtpServer(root, password_file, extra_args=("--tls-cert", str(cert), "--tls-key", str(key), *extra)).start()


class Vsftpd:
    """Debian's vsftpd with FTPS required and TLS session reuse on the data channel (its default).
    Anonymous uploads into ``ROOT/incoming`` (vsftpd authenticates named users through PAM and real
    accounts, which a test must not create)."""

    def __init__(self, directory: Path, cert: Path, key: Path):
        if VSFTPD is None:
            pytest.skip("vsftpd is not installed (scripts/setup installs it)")
        self.root = directory / "root"
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True)
        os.chmod(self.root, 0o755)  # vsftpd refuses an anonymous root the ftp user could write
        shutil.chown(self.incoming, "ftp", "ftp")
        Path("/var/run/vsftpd/empty").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = directory / "vsftpd.conf"
        self.conf.write_text("\n".join([
            "listen=YES", "listen_address=127.0.0.1", f"listen_port={self.port}", "background=NO",
            "seccomp_sandbox=NO", "anonymous_enable=YES", "local_enable=NO", "write_enable=YES",
            "anon_upload_enable=YES", "anon_mkdir_write_enable=YES", "anon_other_write_enable=YES",
            f"anon_root={self.root}", "no_anon_password=YES", "anon_umask=022",
            "ssl_enable=YES", "allow_anon_ssl=YES", "force_anon_logins_ssl=YES", "force_anon_data_ssl=YES",
            "require_ssl_reuse=YES", "ssl_ciphers=HIGH", f"rsa_cert_file={cert}", f"rsa_private_key_file={key}",
            "secure_chroot_dir=/var/run/vsftpd/empty", "xferlog_enable=NO", "pasv_enable=YES", ""]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Vsftpd":
        self.proc = subprocess.Popen([VSFTPD, str(self.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        wait_port(self.port, 10, self.proc, "vsftpd")
        return self

    def stop(self) -> None:
        stop(self.proc)


class Sshd:
    """OpenSSH sshd with its own host key, our client key authorized, SFTP only; a known_hosts file
    with its host key for ``[127.0.0.1]:PORT``."""

    def __init__(self, directory: Path):
        if SSHD is None or SSH_KEYGEN is None:
            pytest.skip("OpenSSH sshd is not installed (scripts/setup installs openssh-server)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = directory / "host_ed25519"
        self.client_key = directory / "client_ed25519"
        for k in (self.host_key, self.client_key):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        (directory / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.known_hosts = directory / "known_hosts"
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        self.conf = directory / "sshd_config"
        self.conf.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {directory / 'sshd.pid'}", f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sshd":
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        wait_port(self.port, 10, self.proc, "sshd")
        return self

    def stop(self) -> None:
        stop(self.proc)


class ResetProxy:
    """A TCP proxy on 127.0.0.1 to *target_port* that resets each connection (both sides) after a
    random number of bytes in [min_bytes, max_bytes], until *resets* connections have been reset."""

    def __init__(self, target_port: int, min_bytes: int, max_bytes: int, resets: int, seed: int = 4):
        self.target_port = target_port
        self.min_bytes, self.max_bytes, self.max_resets = min_bytes, max_bytes, resets
        self.rng = random.Random(seed)
        self.resets = 0
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> "ResetProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        try:   # close() alone does not wake a thread blocked in accept() on Linux
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            budget = self.rng.randint(self.min_bytes, self.max_bytes) if self.resets < self.max_resets else None
            threading.Thread(target=self._pump, args=(client, budget), daemon=True).start()

    def tamper(self, data: bytes, offset: int) -> bytes:
        """The client's bytes *data*, starting at *offset* of its stream, as the server gets them."""
        return data

    def _pump(self, client: socket.socket, budget: int | None) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            reset_socket(client)
            return
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        moved = sent = 0
        try:
            while not self.stopped.is_set():
                for key, _ in sel.select(0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client:
                        data, sent = self.tamper(data, sent), sent + len(data)
                    if budget is not None and moved + len(data) >= budget:
                        key.data.sendall(data[: budget - moved])
                        self.resets += 1
                        return
                    key.data.sendall(data)
                    moved += len(data)
        except OSError:
            pass
        finally:
            sel.close()
            reset_socket(client)
            reset_socket(upstream)
