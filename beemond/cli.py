"""Command line: ``beemond run | status | reload | pause | resume | check-config | keygen | decrypt | verify |
ingest | report | upload --backlog``.

Exit status: 0 success; 1 runtime failure; 3 (``status``, ``reload``, ``pause``, ``resume``) the daemon is not
running; 77 (``EX_NOPERM``) not allowed to reach the daemon's socket or read the config; 65 (``EX_DATAERR``)
a bundle that fails verification; 75 (``EX_TEMPFAIL``) ``upload --backlog`` while the daemon holds the
spool, ``ingest`` while another ingest holds the data directory; 78 (``EX_CONFIG``) a bad configuration,
with one line naming the file, the key and what is allowed (``reload``: the daemon rejected the file and
keeps its running config).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from beemond import __version__

from beemond.errors import EX_DATAERR, EX_TEMPFAIL
DEFAULT_CONFIG = "/etc/beemond/beemond.toml"


def _load_config(path: str, loader=None):
    from beemond import config

    try:
        return (loader or config.load)(path)
    except config.ConfigError as e:
        print(f"beemond: config error: {e}", file=sys.stderr)
        raise SystemExit(config.EX_CONFIG) from None


def cmd_run(args) -> int:
    from beemond.core import journal
    from beemond.supervisor.orchestrator import Orchestrator

    orch = _load_config(args.config, lambda path: Orchestrator.from_file(path, duration=args.duration))
    journal.setup("orchestrator", orch.cfg.daemon.log_level)
    return orch.run()


def _ask(args, request: dict, timeout: float = 5.0) -> dict:
    """*request* to the daemon whose config is ``args.config``. Reads only the socket's location from
    the config (no recipients, no keys), so members of group beemond can ask. Exits 3 when no daemon
    answers, 77 without permission, 78 when the config names no usable location."""
    from beemond import config
    from beemond.supervisor import status

    try:
        path = config.status_socket(args.config)
        return status.query(path, timeout=timeout, request=request)
    except config.ConfigError as e:
        if isinstance(e.__cause__, PermissionError):
            print(status.no_permission(args.config), file=sys.stderr)
            raise SystemExit(status.EXIT_NO_PERMISSION) from None
        print(f"beemond: config error: {e}", file=sys.stderr)
        raise SystemExit(config.EX_CONFIG) from None
    except status.NoPermission as e:
        print(e, file=sys.stderr)
        raise SystemExit(status.EXIT_NO_PERMISSION) from None
    except status.NotRunning as e:
        print(e, file=sys.stderr)
        raise SystemExit(status.EXIT_NOT_RUNNING) from None


def cmd_status(args) -> int:
    import json

    from beemond.supervisor import status

    st = _ask(args, {"cmd": "status"})
    print(json.dumps(st, indent=1, sort_keys=True) if args.json else status.format_status(st))
    return 0


def cmd_control(args) -> int:
    got = _ask(args, {"cmd": "stop" if args.command == "pause" else "start", "worker": args.worker})
    print(got.get("message", got), file=sys.stdout if got.get("ok") else sys.stderr)
    return 0 if got.get("ok") else 1


def cmd_reload(args) -> int:
    from beemond import config
    from beemond.supervisor import status

    got = _ask(args, {"cmd": "reload"}, timeout=status.RELOAD_TIMEOUT_S + 10)
    if got.get("ok"):
        print(got.get("message", "reloaded"))
        return 0
    if "file" in got:
        print(f"beemond: reload rejected, the running config is kept: {got['file']}: {got.get('key') or '-'}: "
              f"{got.get('message')}", file=sys.stderr)
        return config.EX_CONFIG
    print(f"beemond: reload failed: {got.get('message', got)}", file=sys.stderr)
    return 1


def cmd_check_config(args) -> int:
    from beemond import config

    print(config.summary(_load_config(args.config)))
    return 0


def cmd_keygen(args) -> int:
    from beemond.bundle import crypto

    if args.device:
        import socket

        try:
            priv, pub, line = crypto.device_keygen(args.out, comment=socket.gethostname().split(".")[0])
        except FileExistsError:
            print(f"beemond: {os.path.join(args.out, crypto.DEVICE_KEY_NAME)} exists; refusing to overwrite a "
                  "device key", file=sys.stderr)
            return 1
        print(f"device signing key (stays on the device; [bundle] signing_key): {priv}")
        print(f"public key (give it to the lab: ingest --trusted-devices DIR): {pub}")
        print(line)
        return 0
    try:
        ident, rcpt, public = crypto.keygen(args.out)
    except FileExistsError:
        print(f"beemond: {os.path.join(args.out, 'identity.txt')} exists; refusing to overwrite a private key",
              file=sys.stderr)
        return 1
    print(f"identity (keep it in the lab, never on the device): {ident}")
    print(f"recipient (put it in [bundle] recipients): {rcpt}")
    print(public)
    return 0


def _trusted(path: str):
    from beemond.bundle import crypto

    try:
        return crypto.load_trusted_keys(path)
    except (OSError, ValueError) as e:
        print(f"beemond: device key: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _verify(bundle: str, trusted, signature: str | None = None) -> str | None:
    """The signer's fingerprint, or None (reported) for a bad signature."""
    from beemond.bundle import crypto

    try:
        fp, label, _digest = crypto.verify_file(bundle, trusted, signature)
    except crypto.SignatureError as e:
        print(f"beemond: {bundle}: signature check failed ({e.reason}): {e}", file=sys.stderr)
        return None
    except FileNotFoundError as e:
        print(f"beemond: {e.filename}: no such file", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{bundle}: good signature by {label} ({fp})")
    return fp


def cmd_verify(args) -> int:
    return 0 if _verify(args.bundle, _trusted(args.device_key), args.signature) else EX_DATAERR


def cmd_decrypt(args) -> int:
    from beemond.bundle import crypto, format as bundle_format

    trusted = _trusted(args.device_key) if args.device_key is not None else None
    try:
        identities = crypto.load_identities(args.identity)
        # One read: the signature (with --device-key) is checked over the very bytes decrypted, and
        # nothing reaches --out before it and every manifest hash matched.
        manifest = bundle_format.extract_bundle(args.bundle, identities, args.out, trusted=trusted,
                                                limits=_limits(args))
    except crypto.IdentityError as e:
        print(f"beemond: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"beemond: {e.filename}: no such file", file=sys.stderr)
        return 1
    except OSError as e:  # the lab's own disk (full, read-only), an unreadable bundle: nothing was published
        print(f"beemond: {args.bundle}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""),
              file=sys.stderr)
        return 1
    except crypto.SignatureError as e:
        print(f"beemond: {args.bundle}: signature check failed ({e.reason}): {e}", file=sys.stderr)
        return EX_DATAERR
    except crypto.DecryptError as e:
        print(f"beemond: {args.bundle}: cannot decrypt (wrong identity, or a damaged or truncated file): {e}",
              file=sys.stderr)
        return EX_DATAERR
    except bundle_format.BundleError as e:
        print(f"beemond: {args.bundle}: verification failed ({e.reason}): {e}", file=sys.stderr)
        return EX_DATAERR
    n = len(manifest["records"])
    print(f"{args.bundle}: {n} record(s) from {manifest['host']}, {manifest.get('start')} .. {manifest.get('end')}, "
          f"all hashes match; written to {args.out}")
    return 0


def _limits(args):
    from beemond.bundle import format as bundle_format

    d = bundle_format.DEFAULT_LIMITS
    return bundle_format.Limits(max_bundle_bytes=args.max_bundle_bytes or d.max_bundle_bytes,
                                max_member_bytes=args.max_record_bytes or d.max_member_bytes,
                                max_total_bytes=args.max_bundle_bytes or d.max_total_bytes)


def cmd_ingest(args) -> int:
    from beemond.bundle import crypto
    from beemond.lab import ingest

    if args.parquet:
        try:
            import duckdb  # noqa: F401
        except ImportError:
            print("beemond: --parquet needs DuckDB: pip install 'beemond[lab]'", file=sys.stderr)
            return 1
    verbose = args.verbose

    def show(line: str) -> None:
        if verbose or line.startswith(("rejected", "  ", "error", "ledger")):
            print(line, flush=True)

    opts = ingest.Options(parquet=args.parquet, push=args.push, limits=_limits(args), licence=args.licence)
    try:
        report = ingest.run(args.upload_tree, args.identity, args.trusted_devices, args.out, print=show,
                            jobs=args.jobs, options=opts)
    except ingest.Busy as e:
        print(f"beemond: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except (crypto.IdentityError, ValueError, OSError) as e:
        print(f"beemond: {e}", file=sys.stderr)
        return 1
    push = f"; {report.pushed} reading(s) pushed" if args.push else ""
    print(f"ingested {len(report.ingested)} bundle(s), {report.records} record(s), {report.rows} new row(s); "
          f"{len(report.skipped)} already ingested; {len(report.rejected)} rejected{push}")
    for e in sorted(set(report.push_errors))[:3]:
        print(f"beemond: push failed (kept for the next run): {e}", file=sys.stderr)
    if report.rejected:
        return EX_DATAERR
    return 1 if report.push_errors else 0


def cmd_report(args) -> int:
    try:
        from beemond.lab import report
    except ImportError as e:
        print(f"beemond: report needs the lab extra ({e.name}): pip install 'beemond[lab]'", file=sys.stderr)
        return 1
    try:
        index = report.build(args.data_dir, args.out)
    except OSError as e:
        print(f"beemond: {e}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    return 0


def cmd_upload(args) -> int:
    from beemond.upload.backlog import upload_backlog

    return upload_backlog(_load_config(args.config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beemond", description="Field recorder daemon for research beehives.")
    p.add_argument("--version", action="version", version=f"beemond {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    r.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="stop gracefully after this many seconds")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="the running daemon's workers, readings, backlog and uploads")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    s.add_argument("--json", action="store_true", help="print the full status as JSON")
    s.set_defaults(func=cmd_status)

    rl = sub.add_parser("reload", help="make the running daemon load its config file again and wait for "
                                       "the verdict (systemctl reload runs this)")
    rl.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    rl.set_defaults(func=cmd_reload)

    for name, what in (("pause", "stop recording or processing (the open record is closed)"),
                       ("resume", "start a paused sensor or processor again")):
        x = sub.add_parser(name, help=f"{what}; until resumed or restarted")
        x.add_argument("worker", metavar="NAME", help="a sensor or processor name")
        x.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
        x.set_defaults(func=cmd_control)

    c = sub.add_parser("check-config", help="validate a config file and print a summary")
    c.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check_config)

    k = sub.add_parser("keygen", help="create an age identity (for the lab) and its recipient, or with "
                                      "--device the device's Ed25519 signing key")
    k.add_argument("--out", required=True, metavar="DIR")
    k.add_argument("--device", action="store_true",
                   help="create DIR/device_ed25519 (mode 0600) and DIR/device_ed25519.pub (OpenSSH formats)")
    k.set_defaults(func=cmd_keygen)

    d = sub.add_parser("decrypt", help="decrypt a bundle, unpack it and check every manifest hash")
    d.add_argument("bundle")
    d.add_argument("--identity", required=True, metavar="FILE")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--device-key", metavar="PUB", help="verify BUNDLE.sig against this public key file (or "
                   "directory of *.pub) over the same bytes; write nothing on a bad signature")
    _limit_args(d)
    d.set_defaults(func=cmd_decrypt)

    v = sub.add_parser("verify", help="check a bundle's detached signature (BUNDLE.sig)")
    v.add_argument("bundle")
    v.add_argument("--device-key", required=True, metavar="PUB",
                   help="the device's public key file (device_ed25519.pub), or a directory of *.pub files")
    v.add_argument("--signature", metavar="SIG", help="signature file (default BUNDLE.sig)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("ingest", help="verify, decrypt and unpack every bundle of an upload tree into a data tree")
    i.add_argument("upload_tree")
    i.add_argument("--identity", required=True, metavar="FILE")
    i.add_argument("--trusted-devices", required=True, metavar="DIR", help="directory of device *.pub files")
    i.add_argument("--out", required=True, metavar="DATA_DIR")
    i.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (one host per process)")
    i.add_argument("--parquet", action="store_true", help="mirror the daily CSVs as Parquet (beemond[lab])")
    i.add_argument("--push", metavar="URL", help="send new readings as InfluxDB line protocol to URL "
                   "(e.g. http://127.0.0.1:8428/write)")
    i.add_argument("--licence", default="", help="the data's licence, named in DATA_DIR/README.md")
    i.add_argument("-v", "--verbose", action="store_true", help="one line per bundle")
    _limit_args(i)
    i.set_defaults(func=cmd_ingest)

    rp = sub.add_parser("report", help="plots per hive and day, and an HTML index of the fleet (beemond[lab])")
    rp.add_argument("data_dir", metavar="DATA_DIR")
    rp.add_argument("--out", required=True, metavar="DIR")
    rp.set_defaults(func=cmd_report)

    u = sub.add_parser("upload", help="upload the outbox's backlog in the foreground (daemon stopped)")
    u.add_argument("--backlog", action="store_true", required=True, help="upload every bundle waiting in the outbox")
    u.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    u.set_defaults(func=cmd_upload)
    return p


def _limit_args(p) -> None:
    p.add_argument("--max-bundle-bytes", type=int, default=0, metavar="N",
                   help="refuse a bundle, or a bundle's records together, over N bytes (default 1 GiB)")
    p.add_argument("--max-record-bytes", type=int, default=0, metavar="N",
                   help="refuse a bundle with a record over N bytes (default 1 GiB)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING, format="beemond: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
