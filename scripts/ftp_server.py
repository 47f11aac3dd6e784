#!/usr/bin/env python3
"""A local FTP server (pyftpdlib) for the demo and the tests: one user, one root, 127.0.0.1 only.

    python scripts/ftp_server.py --root DIR --port PORT --user U --password-file FILE
                                 [--tls-cert PEM --tls-key PEM] [--readonly SUBDIR]

``--tls-cert``/``--tls-key``: FTPS (explicit TLS, required on control and data channels).
``--readonly SUBDIR``: list and download only under ROOT/SUBDIR (uploads there get 550).

Prints ``ready PORT`` on stdout once it listens (``--port 0`` picks a free port).
"""

import argparse
import logging
import sys
from pathlib import Path

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--user", default="beemond")
    p.add_argument("--password-file", required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--readonly", action="append", default=[])
    p.add_argument("--no-rest", action="store_true", help="no REST (nor REST STREAM in FEAT): a server that cannot resume")
    args = p.parse_args()
    Path(args.root).mkdir(parents=True, exist_ok=True)
    auth = DummyAuthorizer()
    auth.add_user(args.user, Path(args.password_file).read_text().strip(), args.root, perm="elradfmwMT")
    for sub in args.readonly:
        (Path(args.root) / sub).mkdir(parents=True, exist_ok=True)
        auth.override_perm(args.user, str(Path(args.root) / sub), "elr", recursive=True)
    handler = FTPHandler
    if args.tls_cert:
        from pyftpdlib.handlers import TLS_FTPHandler

        handler = TLS_FTPHandler
        handler.certfile, handler.keyfile = args.tls_cert, args.tls_key
        handler.tls_control_required = handler.tls_data_required = True
    handler.authorizer = auth
    if args.no_rest:
        handler.proto_cmds = {k: v for k, v in handler.proto_cmds.items() if k != "REST"}
    handler.passive_ports = None
    logging.basicConfig(level=logging.WARNING)
    server = FTPServer(("127.0.0.1", args.port), handler)
    print(f"ready {server.address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close_all()
    sys.exit(0)


if __name__ == "__main__":
    main()
