"""The rules across sections, checked once every table is built: templates compiled, recipients and
the signing key parsed, references between sensors and processors resolved, each GPIO pin claimed
once; and :func:`summary`, the ``check-config`` report.

Everything that loads a library (Jinja2, pyrage, cryptography) or reads an outside file is here and
imported late, so that ``load(..., semantics=False)`` (the orchestrator's) stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import beemond.config.checks as config_checks
from beemond.config.schema import ConfigError
from beemond.config.sections import BundleConfig, Config


def check_semantics(cfg: Config, path: Path) -> None:
    """Cross-field checks that need more than one key, or outside files."""
    from beemond.core.names import TemplateError, check_layout, check_template  # late: keeps `import beemond.config` light
    from beemond.bundle import crypto

    for key, text in [("archive.filename_template", cfg.archive.filename_template),
                      *((f"sensors.{s.name}.filename_template", s.filename_template)
                        for s in cfg.sensors if s.filename_template)]:
        try:
            check_template(text, cfg.archive.default_metadata)
        except TemplateError as e:
            raise ConfigError(path, key, str(e)) from None
    try:
        check_layout(cfg.upload.layout)
    except TemplateError as e:
        raise ConfigError(path, "upload.layout", str(e)) from None

    if not cfg.bundle.recipients:
        raise ConfigError(path, "bundle.recipients", "at least one age recipient (age1...) or recipients file is required")
    for i, item in enumerate(cfg.bundle.recipients):
        try:
            crypto.load_recipients([item], base=path.parent.resolve())
        except crypto.RecipientError as e:
            raise ConfigError(path, f"bundle.recipients[{i}]", str(e)) from None

    b = cfg.bundle
    if b.signing_key is not None and b.signing_key_credential:
        raise ConfigError(path, "bundle.signing_key_credential", "set signing_key or signing_key_credential, not both")
    if b.signing_key_path() is not None:
        try:
            crypto.load_signing_key(b.signing_key_path())
        except crypto.SigningKeyError as e:
            key = "bundle.signing_key" if b.signing_key is not None else "bundle.signing_key_credential"
            raise ConfigError(path, key, str(e)) from None

    cfg.upload.check(path)
    cfg.telemetry.check(path)
    for key, message in config_checks.semantic_problems(cfg, path):
        raise ConfigError(path, key, message)

    d = cfg.daemon
    if d.restart_backoff_max_s < d.restart_backoff_initial_s:
        raise ConfigError(path, "daemon.restart_backoff_max_s", "must be >= restart_backoff_initial_s")

    names = {t.name for t in cfg.sensors}
    by_name = {t.name: t for t in cfg.sensors}
    pins: dict[int, str] = {}
    for s in cfg.sensors:
        key = f"sensors.{s.name}"
        s.check(path, key)
        for other in s.subscribes_to():
            if other not in names:
                # name the key that holds the reference, when one does
                where = next((f.name for f in dataclasses.fields(s) if f.name != "name" and getattr(s, f.name) == other), "")
                raise ConfigError(path, f"{key}.{where}" if where else key,
                                  f"refers to sensor {other!r}, which is not configured (or not enabled)")
        s.check_sources(path, key, by_name)
        for sub, targets in s.capture_targets().items():
            for other in targets:
                if other not in names:
                    raise ConfigError(path, f"{key}.{sub}", f"no sensor {other!r} is configured (or enabled); "
                                      f"configured: {', '.join(sorted(names))}")
        for sub, pin in s.gpio_pins().items():
            if pin in pins:
                raise ConfigError(path, f"{key}.{sub}", f"GPIO{pin} is already used by {pins[pin]}")
            pins[pin] = f"{key}.{sub}"

    sensors = {s.name: s for s in cfg.sensors}
    for p in cfg.processors:
        key = f"processors.{p.name}"
        # A processor's records go to staging/<name>/ and it is supervised under its name: both must
        # be free.
        if p.name in sensors or p.name in ("aggregator", "uploader", "orchestrator", "telemetry"):
            raise ConfigError(path, key, f"name {p.name!r} is already taken by a sensor or a daemon worker")
        if p.sensor not in sensors:
            raise ConfigError(path, f"{key}.sensor", f"{p.sensor!r} is not a configured (enabled) sensor; "
                                                    f"sensors: {', '.join(sensors)}")
        if p.filename_template:
            try:
                check_template(p.filename_template, cfg.archive.default_metadata)
            except TemplateError as e:
                raise ConfigError(path, f"{key}.filename_template", str(e)) from None
        p.check(path, key, sensors[p.sensor])


def _signer(b: BundleConfig) -> str:
    from beemond.bundle import crypto

    return crypto.fingerprint(crypto.load_signing_key(b.signing_key_path()).public_key())


def summary(cfg: Config) -> str:
    """A short human summary for ``beemond check-config`` (never shows secrets)."""
    lines = [f"config {cfg.source}: ok",
             f"  host {cfg.daemon.host}, spool {cfg.daemon.spool_dir}"]
    for s in cfg.sensors:
        lines.append(f"  sensor {s.name}: {s.type} ({s.backend}), {s.describe()}")
    b = cfg.bundle
    lines.append(f"  bundles: every {b.max_duration_s:g} s or {b.max_bytes} bytes, "
                 f"{len(b.recipients)} recipient entr{'y' if len(b.recipients) == 1 else 'ies'}, "
                 + (f"signed by {_signer(b)}" if b.signing_key_path() is not None else "unsigned"))
    for p in cfg.processors:
        lines.append(f"  processor {p.name}: {p.type} of {p.sensor}, {p.describe()}")
    t = cfg.telemetry
    if t.active:
        lines.append(f"  telemetry: mqtt{'s' if t.tls else ''}://{t.broker}:{t.port or (8883 if t.tls else 1883)} "
                     f"layout {t.layout}{', Home Assistant discovery' if t.home_assistant and t.layout == 'beemond' else ''}")
    m = cfg.metrics
    lines.append(f"  metrics: http://{m.address}:{m.port}/metrics" if m.enabled else "  metrics: off")
    u = cfg.upload
    if u.protocol == "none":
        lines.append("  upload: none (bundles stay in the outbox)")
    else:
        where = u.remote_dir if u.protocol == "local" else f"s3://{u.bucket}/{u.remote_dir.strip('/')} at {u.endpoint}" \
            if u.protocol == "s3" else f"{u.protocol}://{u.user}@{u.host}:{u.port or 'default'}/{u.remote_dir.strip('/')}"
        lines.append(f"  upload: {where} layout {u.layout}")
        if u.rate_limit_bytes_per_s:
            lines.append(f"  upload rate limit: {u.rate_limit_bytes_per_s} bytes/s")
        for name, spec in u.windows.items():
            lines.append(f"  upload window {name}: {spec} local time")
    return "\n".join(lines)
