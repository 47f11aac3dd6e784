"""The exception hierarchy (beemond.errors): one root, a family per concern, and each class still the
builtin it was, so that no existing ``except`` clause changes what it catches."""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import re
from pathlib import Path

import pytest

import beemond
from beemond import errors

ROOT = Path(beemond.__file__).parent

# Class -> (family, the builtin it must still be). The builtin column is what each class was before
# issue 13; changing it changes what some `except` clause catches, so it is a decision, not a
# refactoring. Keyed by class name, not module: the class is found where it is defined (files move).
EXPECTED = {
    "ConfigError": (errors.BeemondError, ValueError),
    "RecipientError": (errors.KeyMaterialError, ValueError),
    "IdentityError": (errors.KeyMaterialError, ValueError),
    "SigningKeyError": (errors.KeyMaterialError, ValueError),
    "DecryptError": (errors.FormatError, Exception),
    "SignatureError": (errors.FormatError, Exception),
    "BundleError": (errors.FormatError, Exception),
    "Rejected": (errors.FormatError, Exception),
    "TemplateError": (errors.FormatError, ValueError),
    "_TooBig": (errors.FormatError, ValueError),
    "RecordError": (errors.SpoolError, Exception),
    "_Cancelled": (errors.BeemondError, Exception),
    "SpoolBusy": (errors.BusyError, OSError),
    "Busy": (errors.BusyError, RuntimeError),
    "TransportError": (errors.UploadError, Exception),
    "PermanentError": (errors.UploadError, Exception),
    "LocalFileError": (errors.UploadError, Exception),
    "CRCError": (errors.TransientSensorError, OSError),
    "ProbeError": (errors.TransientSensorError, OSError),
    "ScaleError": (errors.TransientSensorError, OSError),
    "DeviceMissing": (errors.TransientSensorError, OSError),
    "DeviceError": (errors.SensorError, ValueError),
    "MeasurementInterrupted": (errors.SensorError, Exception),
    "SensorFailure": (errors.PersistentSensorError, RuntimeError),
    "WrongChipError": (errors.PersistentSensorError, RuntimeError),
    "CameraUnavailable": (errors.PersistentSensorError, RuntimeError),
    "CameraStall": (errors.PersistentSensorError, RuntimeError),
    "CameraClosed": (errors.PersistentSensorError, RuntimeError),
    "NotRunning": (errors.ControlError, Exception),
    "NoPermission": (errors.ControlError, Exception),
}

FAMILIES = [errors.KeyMaterialError, errors.SensorError, errors.TransientSensorError, errors.PersistentSensorError,
            errors.FormatError, errors.SpoolError, errors.BusyError, errors.UploadError, errors.ControlError]


BUILTINS = {"Exception", "BaseException", "ValueError", "OSError", "RuntimeError", "TypeError", "KeyError",
            "IOError", "LookupError", "EnvironmentError"}
# Deliberately outside the tree: raised into a runaway template and turned into a TemplateError at once
# (a BaseException, so that no `except Exception` in a Jinja2 filter swallows it).
OUTSIDE = {"_Deadline"}


@pytest.fixture(scope="module")
def definitions() -> dict[str, str]:
    """Every exception class defined in the package -> its module, found by reading the files."""
    family_names = {f.__name__ for f in FAMILIES} | {"BeemondError"}
    found = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "beemond.errors":
            continue
        for m in re.finditer(r"^class (\w+)\(([^)]*)\):", path.read_text(), re.M):
            bases = {b.strip().split(".")[-1] for b in m[2].split(",")}
            if bases & (BUILTINS | family_names) or any(b.endswith(("Error", "Failure")) for b in bases):
                assert m[1] not in found, f"two exception classes named {m[1]}"
                found[m[1]] = module
    return found


def test_every_exception_class_in_the_package_is_listed(definitions):
    """A new exception class must join a family (and this table)."""
    listed = set(EXPECTED) | OUTSIDE
    assert set(definitions) == listed, (f"unlisted: {sorted(set(definitions) - listed)}; "
                                        f"gone: {sorted(listed - set(definitions))}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_class_joins_its_family_and_stays_its_builtin(name, definitions):
    cls = getattr(importlib.import_module(definitions[name]), name)
    family, builtin = EXPECTED[name]
    assert issubclass(cls, errors.BeemondError)
    assert issubclass(cls, family), f"{name} is not a {family.__name__}"
    assert issubclass(cls, builtin), f"{name} is no longer a {builtin.__name__}"


def test_families_have_one_root():
    for family in FAMILIES:
        assert issubclass(family, errors.BeemondError)
    assert errors.BeemondError.__bases__ == (Exception,)
    members = {n: c for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)}
    assert set(members.values()) == {errors.BeemondError, *FAMILIES}


def test_transient_is_a_family_not_an_accident():
    """A driver's transient error is caught both as the family and by the retry's `except OSError`,
    and keeps its errno; a persistent one is neither."""
    from beemond.sensors.ds18b20.chip import ProbeError
    from beemond.sensors.sht3x.chip import CRCError
    from beemond.sensors.base import SensorFailure

    e = ProbeError("crc=00 NO")
    assert isinstance(e, errors.TransientSensorError) and isinstance(e, OSError) and e.errno == errno.EIO
    assert isinstance(CRCError("mismatch"), errors.TransientSensorError)
    failure = SensorFailure("10 in a row")
    assert not isinstance(failure, (OSError, errors.TransientSensorError))
    assert isinstance(failure, errors.PersistentSensorError)


def test_upload_transient_and_permanent():
    from beemond.upload.transport import LocalFileError, PermanentError, TransportError

    assert issubclass(PermanentError, TransportError)  # the uploader handles PermanentError first
    assert issubclass(LocalFileError, PermanentError)
    assert not issubclass(TransportError, OSError)


def test_config_error_is_a_value_error_with_its_one_line():
    from beemond.config import ConfigError

    e = ConfigError("/etc/beemond/beemond.toml", "metrics.address", "must be an IP address")
    assert isinstance(e, ValueError) and isinstance(e, errors.BeemondError)
    assert str(e) == "/etc/beemond/beemond.toml: metrics.address: must be an IP address"


def test_exit_statuses_come_from_sysexits_in_one_place():
    from beemond import cli, config
    from beemond.supervisor import status
    from beemond.upload import backlog

    assert (errors.EX_CONFIG, errors.EX_NOPERM, errors.EX_TEMPFAIL, errors.EX_DATAERR) == (78, 77, 75, 65)
    assert errors.EX_CONFIG == os.EX_CONFIG and errors.EX_NOPERM == os.EX_NOPERM
    assert config.EX_CONFIG is errors.EX_CONFIG and cli.EX_DATAERR is errors.EX_DATAERR
    assert cli.EX_TEMPFAIL is errors.EX_TEMPFAIL and backlog.EX_TEMPFAIL is errors.EX_TEMPFAIL
    assert status.EXIT_NO_PERMISSION is errors.EX_NOPERM and status.EXIT_NOT_RUNNING is errors.EX_NOT_RUNNING


def test_errors_imports_nothing_of_beemond():
    """Every layer may import errors.py: it must not pull anything of beemond's in."""
    text = (ROOT / "errors.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+beemond", text, re.M)
