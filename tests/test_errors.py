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

# module:Class -> (family, the builtin it must still be). The builtin column is what each class was
# before issue 13; changing it changes what some `except` clause catches, so it is a decision, not a
# refactoring.
EXPECTED = {
    "beemond.config:ConfigError": (errors.BeemondError, ValueError),
    "beemond.crypto:RecipientError": (errors.KeyMaterialError, ValueError),
    "beemond.crypto:IdentityError": (errors.KeyMaterialError, ValueError),
    "beemond.crypto:SigningKeyError": (errors.KeyMaterialError, ValueError),
    "beemond.crypto:DecryptError": (errors.FormatError, Exception),
    "beemond.crypto:SignatureError": (errors.FormatError, Exception),
    "beemond.bundle_format:BundleError": (errors.FormatError, Exception),
    "beemond.lab.ingest:Rejected": (errors.FormatError, Exception),
    "beemond.archive:TemplateError": (errors.FormatError, ValueError),
    "beemond.archive:_TooBig": (errors.FormatError, ValueError),
    "beemond.aggregator:RecordError": (errors.SpoolError, Exception),
    "beemond.aggregator:_Cancelled": (errors.BeemondError, Exception),
    "beemond.spool:SpoolBusy": (errors.BusyError, OSError),
    "beemond.lab.ingest:Busy": (errors.BusyError, RuntimeError),
    "beemond.upload:TransportError": (errors.UploadError, Exception),
    "beemond.upload:PermanentError": (errors.UploadError, Exception),
    "beemond.upload:LocalFileError": (errors.UploadError, Exception),
    "beemond.sensors.sht3x:CRCError": (errors.TransientSensorError, OSError),
    "beemond.sensors.ds18b20:ProbeError": (errors.TransientSensorError, OSError),
    "beemond.sensors.scale:ScaleError": (errors.TransientSensorError, OSError),
    "beemond.sensors.audio:DeviceMissing": (errors.TransientSensorError, OSError),
    "beemond.sensors.audio:DeviceError": (errors.SensorError, ValueError),
    "beemond.sensors.base:SensorFailure": (errors.PersistentSensorError, RuntimeError),
    "beemond.sensors.bme280:WrongChipError": (errors.PersistentSensorError, RuntimeError),
    "beemond.sensors.camera:CameraUnavailable": (errors.PersistentSensorError, RuntimeError),
    "beemond.sensors.camera:CameraStall": (errors.PersistentSensorError, RuntimeError),
    "beemond.sensors.emulators.camera:CameraClosed": (errors.PersistentSensorError, RuntimeError),
    "beemond.status:NotRunning": (errors.ControlError, Exception),
    "beemond.status:NoPermission": (errors.ControlError, Exception),
}

FAMILIES = [errors.KeyMaterialError, errors.SensorError, errors.TransientSensorError, errors.PersistentSensorError,
            errors.FormatError, errors.SpoolError, errors.BusyError, errors.UploadError, errors.ControlError]


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_each_class_joins_its_family_and_stays_its_builtin(spec):
    cls = _load(spec)
    family, builtin = EXPECTED[spec]
    assert issubclass(cls, errors.BeemondError)
    assert issubclass(cls, family), f"{spec} is not a {family.__name__}"
    assert issubclass(cls, builtin), f"{spec} is no longer a {builtin.__name__}"


def test_every_exception_class_in_the_package_is_listed():
    """A new exception class must join a family (and this table): grep every `class X(...)` whose
    bases end in Error/Exception/a family, in every module (imports not needed)."""
    family_names = {f.__name__ for f in FAMILIES} | {"BeemondError"}
    builtins = {"Exception", "ValueError", "OSError", "RuntimeError", "TypeError", "KeyError", "IOError",
                "LookupError", "EnvironmentError"}
    found = set()
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "beemond.errors":
            continue
        for m in re.finditer(r"^class (\w+)\(([^)]*)\):", path.read_text(), re.M):
            bases = {b.strip().split(".")[-1] for b in m[2].split(",")}
            if bases & (builtins | family_names) or any(b.endswith(("Error", "Failure")) for b in bases):
                found.add(f"{module}:{m[1]}")
    assert found == set(EXPECTED), f"unlisted: {sorted(found - set(EXPECTED))}; gone: {sorted(set(EXPECTED) - found)}"


def test_families_have_one_root():
    for family in FAMILIES:
        assert issubclass(family, errors.BeemondError)
    assert errors.BeemondError.__bases__ == (Exception,)
    members = {n: c for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)}
    assert set(members.values()) == {errors.BeemondError, *FAMILIES}


def test_transient_is_a_family_not_an_accident():
    """A driver's transient error is caught both as the family and by the retry's `except OSError`,
    and keeps its errno; a persistent one is neither."""
    from beemond.sensors.ds18b20 import ProbeError
    from beemond.sensors.sht3x import CRCError
    from beemond.sensors.base import SensorFailure

    e = ProbeError("crc=00 NO")
    assert isinstance(e, errors.TransientSensorError) and isinstance(e, OSError) and e.errno == errno.EIO
    assert isinstance(CRCError("mismatch"), errors.TransientSensorError)
    failure = SensorFailure("10 in a row")
    assert not isinstance(failure, (OSError, errors.TransientSensorError))
    assert isinstance(failure, errors.PersistentSensorError)


def test_upload_transient_and_permanent():
    from beemond.upload import LocalFileError, PermanentError, TransportError

    assert issubclass(PermanentError, TransportError)  # the uploader handles PermanentError first
    assert issubclass(LocalFileError, PermanentError)
    assert not issubclass(TransportError, OSError)


def test_config_error_is_a_value_error_with_its_one_line():
    from beemond.config import ConfigError

    e = ConfigError("/etc/beemond/beemond.toml", "metrics.address", "must be an IP address")
    assert isinstance(e, ValueError) and isinstance(e, errors.BeemondError)
    assert str(e) == "/etc/beemond/beemond.toml: metrics.address: must be an IP address"


def test_exit_statuses_come_from_sysexits_in_one_place():
    from beemond import cli, config, status
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
