"""Every exception beemond raises, under one root, and the command line's exit statuses.

The model is gpiozero's ``exc.py``: one root, :class:`BeemondError`; a family per concern; and each
class also inherits the builtin it resembles, so that ``except OSError`` around a bus read still
catches a CRC mismatch, while ``except TransientSensorError`` says what is meant. A class keeps the
builtin it had before it joined its family: no existing ``except`` clause changes what it catches.
A family carries a builtin only where every member has it (``TransientSensorError`` is an
``OSError``, ``ConfigError`` and ``KeyMaterialError`` are ``ValueError``\\ s); in the others each
member adds its own, as gpiozero's ``CompositeDeviceError`` members do.

The classes themselves stay in the module that raises them (``beemond.config.ConfigError``,
``beemond.sensors.sht3x.CRCError``, ...); this module holds the root, the families and the exit
statuses. It imports nothing of beemond's, so every layer may import it.

Exit statuses: the ``EX_*`` constants below, from sysexits.h through :mod:`os` where one exists (the
CLI's contract, see ``beemond.cli``).
"""

from __future__ import annotations

import os

EX_OK = os.EX_OK                  # 0
EX_FAILURE = 1                    # a runtime failure (a full lab disk, an unreadable key file)
EX_NOT_RUNNING = 3                # LSB init-script convention: `beemond status`, no daemon answers
EX_DATAERR = os.EX_DATAERR        # 65: a bundle that fails verification (FormatError)
EX_TEMPFAIL = os.EX_TEMPFAIL      # 75: someone else holds the spool or the lab's data directory (BusyError)
EX_NOPERM = os.EX_NOPERM          # 77: not allowed to reach the daemon's socket or read the config
EX_CONFIG = os.EX_CONFIG          # 78: a bad configuration, one line naming the file and the key


class BeemondError(Exception):
    """The root of every exception beemond raises on purpose."""


class KeyMaterialError(BeemondError, ValueError):
    """A key or recipient that cannot be used: not an age/SSH public key, no secret key in an identity
    file, not an Ed25519 signing key (``beemond.bundle.crypto``)."""


class SensorError(BeemondError):
    """A sensor or its device failed (``beemond.sensors``)."""


class TransientSensorError(SensorError, OSError):
    """One attempt failed and another may not: a bus glitch, a CRC mismatch, a timeout, an unplugged
    device. Retried by the worker (``PolledSensorWorker.measure_once`` retries every ``OSError``: the
    libraries behind the seams, smbus2, pyserial and the w1 sysfs files, report their own as bare
    ``OSError``)."""


class PersistentSensorError(SensorError, RuntimeError):
    """The device failed for good, or not at all yet (no camera, the wrong chip): the worker exits and
    the supervisor restarts it with backoff."""


class FormatError(BeemondError):
    """Data or a name without the form it must have: a bundle that fails verification (signature,
    decryption, manifest), a name template that cannot name a record. The CLI exits 65
    (:data:`EX_DATAERR`) for a bundle."""


class SpoolError(BeemondError):
    """The spool cannot give what was asked: a staged record that cannot be read."""


class BusyError(BeemondError):
    """Someone else holds a lock this command needs (the spool, the lab's data directory); try again
    once they are done. The CLI exits 75 (:data:`EX_TEMPFAIL`)."""


class UploadError(BeemondError):
    """A bundle could not be uploaded (``beemond.upload``): ``TransportError`` is transient (the
    bundle stays in the outbox and is retried with backoff), its subclass ``PermanentError`` is not
    (the bundle is quarantined)."""


class ControlError(BeemondError):
    """A command line client cannot talk to the running daemon (``beemond.supervisor.status``)."""
