"""Command line: ``beemond run | status | pause | resume | check-config | keygen | decrypt``.

Exit status: 0 success; 1 runtime failure; 3 (``status``) the daemon is not running; 65 (``EX_DATAERR``)
a bundle that fails verification; 78 (``EX_CONFIG``) a bad configuration, with one line naming the
file, the key and what is allowed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from beemond import __version__

EX_DATAERR = 65
DEFAULT_CONFIG = "/etc/beemond/beemond.toml"


def _load_config(path: str):
    from beemond import config

    try:
        return config.load(path)
    except config.ConfigError as e:
        print(f"beemond: config error: {e}", file=sys.stderr)
        raise SystemExit(config.EX_CONFIG) from None


def cmd_run(args) -> int:
    from beemond import journal
    from beemond.orchestrator import Orchestrator

    cfg = _load_config(args.config)
    journal.setup("orchestrator", cfg.daemon.log_level)
    return Orchestrator(cfg, duration=args.duration).run()


def cmd_status(args) -> int:
    import json

    from beemond import status

    cfg = _load_config(args.config)
    try:
        st = status.query(cfg.spool)
    except status.NotRunning as e:
        print(e, file=sys.stderr)
        return status.EXIT_NOT_RUNNING
    print(json.dumps(st, indent=1, sort_keys=True) if args.json else status.format_status(st))
    return 0


def cmd_control(args) -> int:
    from beemond import status

    cfg = _load_config(args.config)
    try:
        got = status.query(cfg.spool, request={"cmd": "stop" if args.command == "pause" else "start",
                                                "worker": args.worker})
    except status.NotRunning as e:
        print(e, file=sys.stderr)
        return status.EXIT_NOT_RUNNING
    print(got.get("message", got), file=sys.stdout if got.get("ok") else sys.stderr)
    return 0 if got.get("ok") else 1


def cmd_check_config(args) -> int:
    from beemond import config

    print(config.summary(_load_config(args.config)))
    return 0


def cmd_keygen(args) -> int:
    from beemond import crypto

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


def cmd_decrypt(args) -> int:
    import tarfile

    from beemond import aggregator, crypto

    try:
        identities = crypto.load_identities(args.identity)
        manifest = aggregator.extract_bundle(args.bundle, identities, args.out)
    except crypto.IdentityError as e:
        print(f"beemond: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"beemond: {e.filename}: no such file", file=sys.stderr)
        return 1
    except crypto.DecryptError as e:
        print(f"beemond: {args.bundle}: cannot decrypt (wrong identity, or a damaged or truncated file): {e}",
              file=sys.stderr)
        return EX_DATAERR
    except (aggregator.BundleError, tarfile.TarError, ValueError) as e:
        print(f"beemond: {args.bundle}: verification failed: {e}", file=sys.stderr)
        return EX_DATAERR
    n = len(manifest["records"])
    print(f"{args.bundle}: {n} record(s) from {manifest['host']}, {manifest['start']} .. {manifest['end']}, "
          f"all hashes match; written to {args.out}")
    return 0


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

    for name, what in (("pause", "stop recording or processing (the open record is closed)"),
                       ("resume", "start a paused sensor or processor again")):
        x = sub.add_parser(name, help=f"{what}; until resumed or restarted")
        x.add_argument("worker", metavar="NAME", help="a sensor or processor name")
        x.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
        x.set_defaults(func=cmd_control)

    c = sub.add_parser("check-config", help="validate a config file and print a summary")
    c.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    c.set_defaults(func=cmd_check_config)

    k = sub.add_parser("keygen", help="create an age identity (for the lab) and its recipient")
    k.add_argument("--out", required=True, metavar="DIR")
    k.set_defaults(func=cmd_keygen)

    d = sub.add_parser("decrypt", help="decrypt a bundle, unpack it and check every manifest hash")
    d.add_argument("bundle")
    d.add_argument("--identity", required=True, metavar="FILE")
    d.add_argument("--out", required=True, metavar="DIR")
    d.set_defaults(func=cmd_decrypt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING, format="beemond: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
