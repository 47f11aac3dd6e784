"""Upload of sealed bundles from the outbox, one module per transport.

A transport is a small object with ``connect()``, ``ensure_dir(path)``, ``put(local, remote,
progress)``, ``size(remote) -> int``, ``rename(src, dst)``, ``close()``; it raises
:class:`TransportError` or ``OSError`` on failure. :mod:`beemond.upload.uploader` owns the queues,
the retries and the rule that nothing is deleted before the server confirmed it.
"""


class TransportError(Exception):
    """A transfer failed; the bundle stays in the outbox and is retried."""


def make_transport(cfg):
    """The transport for ``[upload] protocol``."""
    if cfg.upload.protocol == "ftp":
        from beemond.upload.ftp import FtpTransport

        return FtpTransport(cfg.upload)
    raise ValueError(f"no transport for protocol {cfg.upload.protocol!r}")
