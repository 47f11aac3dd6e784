"""The daemon-wide sections: ``[daemon]``, ``[archive]``, ``[bundle]``, ``[upload]``, ``[metrics]``,
``[telemetry]``, and :class:`Config`, the whole file once loaded. Sensor and processor sections live
in their packages (``beemond/sensors/TYPE/section.py``, ``beemond/processors/TYPE/section.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from beemond.upload.queues import WINDOW_RE, parse_window  # noqa: F401  (re-exported by beemond.config)
from beemond.config.schema import DEFAULT_TEMPLATE, NAME_RE, ConfigError, ProcessorConfig, SensorConfig, opt


@dataclass(frozen=True)
class DaemonConfig:
    host: str = opt("", doc="host name used in names and manifests (default: this machine's)")
    spool_dir: Path = opt(Path("/var/lib/beemond/spool"), path=True, doc="durable queue directory")
    log_level: str = opt("info", choices=("debug", "info", "warning", "error"))
    heartbeat_interval_s: float = opt(5.0, min=0.1, max=300)
    heartbeat_timeout_s: float = opt(60.0, min=1, max=3600)
    restart_backoff_initial_s: float = opt(1.0, min=0.0, max=3600)
    restart_backoff_max_s: float = opt(300.0, min=0.0, max=86400)
    crash_loop_limit: int = opt(10, min=1, max=1000, doc="restarts within the window before giving up")
    crash_loop_window_s: float = opt(600.0, min=1, max=86400)
    failed_retry_s: float = opt(3600.0, min=1, max=7 * 86400,
                                 doc="a sensor or processor failed by its crash loop is tried again this often")
    shutdown_timeout_s: float = opt(60.0, min=1, max=3600)
    # The one space policy (enforced by the uploader, see Uploader.enforce_spool_limits): over a limit,
    # uploaded copies go first, un-uploaded bundles only with drop_oldest_when_full.
    spool_max_bytes: int = opt(0, min=0, max=2**50,
                                doc="0: no limit; else the most the spool (staging, outbox, uploaded copies) may hold")
    spool_min_free_bytes: int = opt(32 * 2**20, min=0, max=2**50,
                                     doc="free space to keep on the spool's file system")
    drop_oldest_when_full: bool = opt(False, doc="over a limit, delete the oldest un-uploaded bundles too "
                                                  "(each logged and counted); false: keep all data")
    journal_sync_s: float = opt(1.0, min=0.0, max=60, doc="a reading is fdatasync'ed to its sensor's journal at "
                                                         "most this long after it was taken (0: each at once)")
    # Where `beemond status` / `reload` / `pause` reach the daemon. Under systemd the example config puts
    # it in the unit's RuntimeDirectory=beemond (0750, group beemond), so that members of the group can
    # ask; the spool itself stays 0700.
    status_socket: Path | None = opt(None, path=True, doc="unix socket of the daemon (default SPOOL/status.sock)")


@dataclass(frozen=True)
class ArchiveConfig:
    filename_template: str = opt(DEFAULT_TEMPLATE, doc="sandboxed Jinja2 template of a record's name")
    default_metadata: dict = opt(factory=dict, doc="metadata every record carries, under its own keys "
                                                    "(e.g. apiary, hive, site); strings, numbers, booleans")
    max_retries: int = opt(3, min=0, max=20, doc="retries of a failed derived-record write (1, 2, 4... s "
                                                  "apart) before it goes to spool/failed/NAME/")


@dataclass(frozen=True)
class BundleConfig:
    max_duration_s: float = opt(300.0, min=1, max=86400, doc="seal a bundle this long after its first record")
    max_bytes: int = opt(100_000_000, min=1024, max=2**40, doc="seal a bundle once its records reach this size")
    recipients: tuple[str, ...] = opt(factory=tuple, doc="age1... / ssh-... public keys or files of them")
    split_by_sensor: bool = opt(True, doc="one bundle per sensor (AppMAIS layout, per-sensor upload windows); false: one for all")
    signing_key: Path | None = opt(None, path=True, secret=True,
                                    doc="Ed25519 device key (beemond keygen --device) signing every bundle")
    signing_key_credential: str = opt("", doc="name of a systemd credential holding the device key")

    def signing_key_path(self) -> Path | None:
        """The device key's file: ``signing_key``, or the credential in ``$CREDENTIALS_DIRECTORY``; None: unsigned."""
        if self.signing_key is not None:
            return self.signing_key
        if self.signing_key_credential:
            return Path(os.environ.get("CREDENTIALS_DIRECTORY", "")) / self.signing_key_credential
        return None




@dataclass(frozen=True)
class UploadConfig:
    protocol: str = opt("ftp", choices=("ftp", "ftps", "sftp", "s3", "local", "none"),
                         doc="none keeps bundles in the outbox; local copies to a mounted remote_dir")
    endpoint: str = opt("", doc="s3: the service's URL, e.g. https://s3.eu-central-1.amazonaws.com or http://10.0.0.5:8333")
    bucket: str = opt("", doc="s3: the bucket (path-style requests); remote_dir is a key prefix in it")
    region: str = opt("us-east-1", doc="s3: the region signed into every request")
    host: str = opt("127.0.0.1")
    port: int = opt(0, min=0, max=65535, doc="0: the protocol's own (21 for ftp and ftps, 22 for sftp)")
    user: str = opt("anonymous")
    password_file: Path | None = opt(None, path=True, secret=True)
    password_credential: str = opt("", doc="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    ca_file: Path | None = opt(None, path=True, doc="ftps: PEM CA bundle trusted instead of the system CAs")
    key_file: Path | None = opt(None, path=True, secret=True, doc="sftp: OpenSSH private key")
    key_credential: str = opt("", doc="sftp: systemd credential holding the private key")
    known_hosts: Path | None = opt(None, path=True, doc="sftp: OpenSSH known_hosts with the server's key (required)")
    remote_dir: str = opt("", doc="directory on the server under which the layout starts (local: absolute path)")
    layout: str = opt("{{ host }}/{{ date }}/{{ sensor }}/{{ name }}",
                       doc="sandboxed Jinja2 template of the remote path (default: AppMAIS layout)")
    timeout_s: float = opt(30.0, min=1, max=3600, doc="a connection that moves no byte this long is dropped "
                                                      "(a transfer may take hours as long as it moves)")
    backoff_initial_s: float = opt(2.0, min=0.01, max=3600)
    backoff_max_s: float = opt(300.0, min=0.01, max=86400)
    shutdown_grace_s: float = opt(10.0, min=0.0, max=3600, doc="time to keep uploading at shutdown")
    backlog_order: str = opt("oldest", choices=("oldest", "newest"))
    rate_limit_bytes_per_s: int = opt(0, min=0, max=2**40, doc="0: unlimited")
    windows: dict[str, str] = opt(factory=dict, doc='sensor -> "HH:MM-HH:MM" local time when its bundles may go')
    keep_uploaded_bytes: int = opt(0, min=0, max=2**50, doc="keep uploaded copies in spool/uploaded/ up to this "
                                                             "size (the [daemon] spool limits evict them first)")

    def password(self) -> str:
        """The password from ``password_file`` or the systemd credential; ``""`` if neither.

        Raises ``beemond.upload.transport.TransportError`` if a credential is named but ``$CREDENTIALS_DIRECTORY``
        is unset (not a file of that name in the working directory), ``OSError`` if it cannot be read.
        """
        from beemond.upload.transport import read_secret

        path = read_secret(self.password_file, self.password_credential)
        return path.read_text().strip() if path is not None else ""

    def check(self, path: Path, key: str = "upload") -> None:
        """Rules across keys and files. Raises :class:`ConfigError`; never quotes a secret."""
        for name, spec in self.windows.items():
            if not NAME_RE.match(name):
                raise ConfigError(path, f"{key}.windows", f"{name!r} is not a sensor name")
            try:
                parse_window(spec)
            except ValueError as e:
                raise ConfigError(path, f"{key}.windows.{name}", str(e)) from None
        if self.protocol == "none":
            return
        for name in ("password_file", "key_file", "ca_file", "known_hosts"):
            value = getattr(self, name)
            if value is not None and not (os.access(value, os.R_OK) and value.is_file()):
                raise ConfigError(path, f"{key}.{name}", f"cannot read {value}")
        if self.password_file is not None and self.password_credential:
            raise ConfigError(path, f"{key}.password_credential", "set password_file or password_credential, not both")
        if self.key_file is not None and self.key_credential:
            raise ConfigError(path, f"{key}.key_credential", "set key_file or key_credential, not both")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(path, f"{key}.backoff_max_s", "must be >= backoff_initial_s")
        if self.protocol != "ftps" and self.ca_file is not None:
            raise ConfigError(path, f"{key}.ca_file", "only used with protocol = \"ftps\"")
        if self.protocol != "sftp":
            for name in ("key_file", "key_credential", "known_hosts"):
                if getattr(self, name):
                    raise ConfigError(path, f"{key}.{name}", "only used with protocol = \"sftp\"")
        if self.protocol == "sftp" and self.known_hosts is None:
            raise ConfigError(path, f"{key}.known_hosts", "required for sftp: an OpenSSH known_hosts file with "
                              "the server's host key (unknown keys are refused, never added)")
        if self.protocol == "s3":
            if not re.match(r"^https?://[^/\s]+(/\S*)?$", self.endpoint):
                raise ConfigError(path, f"{key}.endpoint", "required for s3: http(s)://HOST[:PORT], e.g. "
                                  "https://s3.eu-central-1.amazonaws.com")
            if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", self.bucket):
                raise ConfigError(path, f"{key}.bucket", "required for s3: 3-63 lowercase letters, digits, dots, hyphens")
            if self.user in ("", "anonymous") or (self.password_file is None and not self.password_credential):
                raise ConfigError(path, f"{key}.user", "s3 needs user (the access key id) and password_file or "
                                  "password_credential (the secret access key)")
        elif self.endpoint or self.bucket:
            raise ConfigError(path, f"{key}.{'endpoint' if self.endpoint else 'bucket'}", "only used with protocol = \"s3\"")
        if self.protocol == "local" and not os.path.isabs(self.remote_dir):
            raise ConfigError(path, f"{key}.remote_dir", "protocol = \"local\" needs the absolute path of a mounted directory")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(True, doc="serve /metrics (Prometheus text format)")
    address: str = opt("127.0.0.1", doc="listen address of /metrics; keep it local unless a firewall guards it")
    port: int = opt(9109, min=1, max=65535, doc="TCP port of /metrics (not Prometheus's own 9090)")
    staleness_s: float = opt(600.0, min=1, max=86400, doc="readings older than this are not exported")


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: live readings over MQTT (beemond.telemetry). Bundles stay the record of truth."""

    enabled: bool = opt(True, doc="false: no telemetry even with a broker set")
    broker: str = opt("", doc="the broker's host name or address; set, it turns telemetry on")
    port: int = opt(0, min=0, max=65535, doc="0: 1883, or 8883 with tls")
    tls: bool = opt(False, doc="TLS to the broker (system CAs, or ca_file)")
    ca_file: Path | None = opt(None, path=True, doc="PEM CA bundle trusted instead of the system CAs")
    user: str = opt("", doc="user name; empty: anonymous")
    password_file: Path | None = opt(None, path=True, secret=True)
    password_credential: str = opt("", doc="name of a systemd credential in $CREDENTIALS_DIRECTORY")
    client_id: str = opt("", doc="MQTT client id (default beemond-HOST); the persistent session is keyed on it")
    keepalive_s: int = opt(60, min=5, max=3600)
    session_expiry_s: int = opt(7 * 86400, min=0, max=2**32 - 1,
                                 doc="how long the broker keeps the session (MQTT v5 Session Expiry Interval)")
    reconnect_max_s: int = opt(120, min=1, max=3600, doc="longest wait between reconnection attempts")
    layout: str = opt("beemond", choices=("beemond", "kotori"), doc="topic and payload layout")
    topic: str = opt("beemond/{{ host }}/{{ sensor }}", doc="sandboxed Jinja2 template; /state and /alert are appended")
    status_topic: str = opt("beemond/{{ host }}/status", doc="retained online/offline (the Last Will)")
    home_assistant: bool = opt(True, doc="publish Home Assistant MQTT discovery configs (layout beemond)")
    discovery_prefix: str = opt("homeassistant")
    expire_after_s: int = opt(0, min=0, max=86400 * 7,
                               doc="Home Assistant marks a value unavailable this long after it; 0: 3 intervals of its sensor")
    kotori_realm: str = opt("hiveeyes")
    kotori_network: str = opt("", doc="layout kotori: the network (Hiveeyes: your user name); required")
    kotori_gateway: str = opt("", doc="layout kotori: the gateway (apiary); default: host")
    kotori_node: str = opt("", doc="layout kotori: the node (hive); default: host")
    max_buffer_bytes: int = opt(16 * 2**20, min=65536, max=2**40,
                                 doc="readings kept in spool/telemetry/ while the broker is away; over it the oldest go")

    def password(self) -> str:
        """The password from ``password_file`` or the credential; ``""`` if neither (see UploadConfig.password)."""
        from beemond.upload.transport import read_secret

        path = read_secret(self.password_file, self.password_credential)
        return path.read_text().strip() if path is not None else ""

    @property
    def active(self) -> bool:
        """Telemetry runs: a broker is set and it is not turned off."""
        return self.enabled and bool(self.broker)

    def check(self, path: Path, key: str = "telemetry") -> None:
        if not self.active:
            return
        for name in ("password_file", "ca_file"):
            value = getattr(self, name)
            if value is not None and not (os.access(value, os.R_OK) and value.is_file()):
                raise ConfigError(path, f"{key}.{name}", f"cannot read {value}")
        if self.password_file is not None and self.password_credential:
            raise ConfigError(path, f"{key}.password_credential", "set password_file or password_credential, not both")
        if self.ca_file is not None and not self.tls:
            raise ConfigError(path, f"{key}.ca_file", "only used with tls = true")
        if self.layout == "kotori" and not self.kotori_network:
            raise ConfigError(path, f"{key}.kotori_network", "required with layout = \"kotori\"")
        from beemond.core import names
        from beemond.telemetry.messages import check_topic

        for name in ("topic", "status_topic"):
            try:
                check_topic(getattr(self, name))
            except names.TemplateError as e:
                raise ConfigError(path, f"{key}.{name}", str(e)) from None
        for name in ("discovery_prefix", "kotori_realm", "kotori_network", "kotori_gateway", "kotori_node"):
            if any(c in getattr(self, name) for c in "/+#"):
                raise ConfigError(path, f"{key}.{name}", "one topic level: no /, + or #")


@dataclass(frozen=True)
class Config:
    source: Path
    daemon: DaemonConfig
    archive: ArchiveConfig
    bundle: BundleConfig
    upload: UploadConfig
    sensors: tuple[SensorConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    processors: tuple[ProcessorConfig, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    @property
    def spool(self) -> Path:
        return self.daemon.spool_dir

    @property
    def status_socket(self) -> Path:
        return self.daemon.status_socket or self.daemon.spool_dir / "status.sock"

    def template_for(self, sensor: SensorConfig) -> str:
        return sensor.filename_template or self.archive.filename_template
