"""Record names, record writers and crash-safe writes.

Every file beemond creates goes through :func:`atomic_writer` (:mod:`beemond.spool`, re-exported here):
write to a hidden temporary name in the target directory, flush, ``fsync``, ``rename`` over the final
name, ``fsync`` the directory. A power cut at any line leaves either the old state or the new one, never
a torn file; a leftover temporary file (``.NAME.tmp-PID``) is ignored by every reader and removed by
:func:`remove_stale_temps`.

A record in ``spool/staging/<sensor>/`` is a data file plus a metadata sidecar ``NAME.meta.json``
written after it. A data file without its sidecar is a record whose writer died between the two
renames: the aggregator still bundles it (flagged ``recovered``), so nothing written is lost.

Names come from sandboxed Jinja2 templates (``jinja2.sandbox.ImmutableSandboxedEnvironment``) with
``StrictUndefined``, so a typo in a template is an error at config load rather than an empty string
in a file name.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import jinja2
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The crash-safe file primitives and the staged-record names live with the spool; re-exported here
# for the record writers that have always called them as archive.*.
from beemond.spool import (META_SUFFIX, TMP_MARK, atomic_writer, fsync_dir, is_internal,  # noqa: F401
                           remove_stale_temps, sidecar_of, temp_name, write_record, write_sidecar)
from beemond.clock import parse_iso, utc_iso  # noqa: F401  (the orchestrator's status needs it without Jinja2)
from beemond.clock import Backoff
# Name checks the lab shares without Jinja2; re-exported for the callers of archive.*.
from beemond.names import TemplateError, safe_relative  # noqa: F401

log = logging.getLogger(__name__)


# A name is a few hundred bytes at most. A template that would make more, or compute for long, is a
# mistake to report at config load, not a gigabyte allocated on a 512 MB Pi at the first record:
TEMPLATE_MAX_CHARS = 2000   # the template's source
NAME_MAX_CHARS = 1024       # a rendered name (Linux: 255 bytes per component, 4096 per path)
OPERAND_MAX = 10_000        # the largest number a call, filter, repetition or exponent may take
CHECK_TIME_S = 1.0          # the trial render at load (a loop or a recursive macro that runs away)
_WIDE_FORMAT = re.compile(r"%[^a-zA-Z%]*(\*|\d{5,})|\{[^{}]*:[^{}]*(\{|\d{5,})")  # "%99999d", "{:>{w}}"


class _TooBig(TemplateError):
    """A number or format in a template that would make a result larger than any name."""


def _bounded(*values) -> None:
    """Raise :class:`_TooBig` for a number over :data:`OPERAND_MAX` or a format string with a field
    width or precision of 5+ digits (or one taken from an argument)."""
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > OPERAND_MAX:
            raise _TooBig(f"{v!r} is larger than a name template may use ({OPERAND_MAX})")
        if isinstance(v, str) and _WIDE_FORMAT.search(v):
            raise _TooBig(f"format {v[:40]!r} asks for a field wider than a name")


class _NameSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox with size limits: every call, filter, ``*``, ``**`` and ``%`` gets
    its numbers checked against :data:`OPERAND_MAX` (``"x" * 10**9``, ``9**9**9``, ``"x"|center(10**9)``
    and ``"%999999999d" % 1`` would each allocate or compute in one C call, before any time limit)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "%" and isinstance(left, str):
            _bounded(left)
        elif operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(n, int) and len(seq) * n > OPERAND_MAX:
                raise _TooBig(f"a repetition longer than {OPERAND_MAX}")
        else:
            _bounded(right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        # range(N) and a string's ljust/center/zfill/expandtabs(N): a number argument sizes the result.
        # Not other calls (metadata.get("id", 123456)) and not str.format's arguments: they are
        # values, and its format string was checked at wrap_str_format.
        sizes = __obj is _env.globals.get("range") or isinstance(getattr(__obj, "__self__", None), str)
        if sizes and not getattr(__obj, "_format_checked", False):
            _bounded(*(a for a in (*args, *kwargs.values()) if not isinstance(a, str)))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _bounded(value.__self__)
            wrapped._format_checked = True
        return wrapped


def _checked_filter(name: str, f):
    """*f* with its size arguments bounded: ``center(width)``, ``indent(width)``, ``truncate(length)``;
    never the value filtered (a record's metadata may hold any number), and for ``format`` only the
    format string."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # (context or environment,) value

    @functools.wraps(f)
    def checked(*args, **kwargs):
        if name == "format":
            _bounded(*(a for a in args[skip - 1:skip] if isinstance(a, str)))
        else:
            _bounded(*(a for a in (*args[skip:], *kwargs.values()) if not isinstance(a, str)))
        return f(*args, **kwargs)
    return checked


_env = _NameSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
_env.filters = {name: _checked_filter(name, f) for name, f in _env.filters.items()}
_env.globals.pop("lipsum", None)  # paragraphs of Latin are no part of a name


def utc_stamp(t: datetime) -> str:
    """ISO 8601 basic format in UTC, e.g. ``20210619T000458Z``: sortable, and safe in any file system."""
    return t.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# Trial values for load-time checks. Record metadata differs per sensor, so any key is accepted there
# (a name built from a key a record lacks falls back to the default template at write time).
_SAMPLE = {"host": "hive", "sensor": "s", "group": "all", "start": "20210619T000000Z", "end": "20210619T001000Z",
           "ext": "csv", "date": "2021-06-19", "_split_index": 0, "name": "b.tar.age",
           "metadata": collections.defaultdict(lambda: "x")}


@functools.lru_cache(maxsize=64)  # a name is rendered per record and per upload; compiling costs ~1 ms
def _compile(text: str) -> jinja2.Template:
    if len(text) > TEMPLATE_MAX_CHARS:
        raise TemplateError(f"template longer than {TEMPLATE_MAX_CHARS} characters")
    try:
        tree = _env.parse(text)
        # No loader: these would only fail later, at the first record.
        for node in tree.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport,
                                   jinja2.nodes.Extends)):
            raise TemplateError(f"template uses {type(node).__name__.lower()}: a name template is one template")
        return _env.from_string(tree)
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:  # RecursionError: 1,000 nested brackets
        raise TemplateError(f"template does not compile: {e}") from None


def render_name(template: str, **variables: Any) -> str:
    """Render a record name and check it stays inside its directory.

    Returns a relative POSIX path (it may contain ``/`` for sub-directories). Raises
    :class:`TemplateError` for an undefined variable, an absolute path, a ``..`` or hidden
    component, or a name that collides with beemond's own temporary and sidecar names.
    """
    template_ = _compile(template)
    try:
        parts, size = [], 0
        for chunk in template_.generate(**variables):
            size += len(chunk)
            if size > NAME_MAX_CHARS:
                raise TemplateError(f"template renders a name longer than {NAME_MAX_CHARS} characters")
            parts.append(chunk)
    except _TooBig as e:
        raise TemplateError(f"template failed to render: {e}") from None
    except TemplateError:
        raise
    except Exception as e:  # a template is code: 1/0, "a" + 1, a recursive macro, an undefined name
        raise TemplateError(f"template failed to render: {type(e).__name__}: {e}") from None
    return safe_relative("".join(parts).strip())


# What the uploader gives a layout (Uploader.remote_path): a bundle's name carries no record metadata.
_LAYOUT_SAMPLE = {"host": "hive", "name": "hive_20210619T000000Z_all_0123456789ab.tar.age", "sensor": "all",
                  "group": "all", "date": "2021-06-19", "start": "20210619T000000Z", "end": "20210619T000000Z",
                  "ext": "tar.age", "metadata": {}, "_split_index": 0}


class _Deadline(BaseException):
    """Raised into a trial render that runs past :data:`CHECK_TIME_S`; a BaseException (the one class
    outside beemond.errors' tree, never seen outside :func:`_time_limit`), so that no ``except
    Exception`` in a filter swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Abort Python code run in this thread after *seconds* (a trace function: no signal, any thread)."""
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Deadline()
        return trace
    old = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    except _Deadline:
        raise TemplateError(f"template takes longer than {seconds:g} s to render a name") from None
    finally:
        sys.settrace(old)


def check_template(text: str, metadata: dict | None = None) -> None:
    """Compile and trial-render a filename template with sample values (config-load check), within
    :data:`CHECK_TIME_S`. *metadata*: known record metadata (``[archive] default_metadata``); any other
    key reads as ``"x"``. Raises :class:`TemplateError`."""
    sample = {**_SAMPLE, "metadata": collections.defaultdict(lambda: "x", metadata or {})}
    with _time_limit(CHECK_TIME_S):
        render_name(text, **sample)


def check_layout(text: str) -> None:
    """Compile and trial-render a remote layout template with what a bundle carries (``host``,
    ``date``, ``name``, ``sensor``/``group``, ``start``, ``end``, ``ext``; ``metadata`` is empty).
    Raises :class:`TemplateError`."""
    try:
        with _time_limit(CHECK_TIME_S):
            render_name(text, **_LAYOUT_SAMPLE)
    except TemplateError as e:
        if "UndefinedError" in str(e):
            carried = ", ".join(k for k in _LAYOUT_SAMPLE if k[0] != "_" and k != "metadata")
            raise TemplateError(f"{e}; a bundle carries only {carried} (no record metadata)") from None
        raise


class ArrayArchiver:
    """Arrays as NumPy ``.npy`` records (format version 1.0, ``numpy.lib.format``; no pickles).

    With ``split_data_array`` an array of shape ``(N, ...)`` becomes N records, one per index along
    axis 0 (one per frame of a burst), each named with ``_split_index`` = its index; without it the
    whole array is one record with ``_split_index`` 0. NumPy is imported on first use, so importing
    this module stays light for the workers that never save arrays.
    """

    ext = "npy"

    def __init__(self, split_data_array: bool = False):
        self.split_data_array = split_data_array

    def parts(self, array) -> Iterator[tuple[int, Any]]:
        """``(_split_index, array)`` pairs, one per record to write."""
        if self.split_data_array and getattr(array, "ndim", 0) >= 1:
            for i in range(array.shape[0]):
                yield i, array[i]
        else:
            yield 0, array

    @staticmethod
    def writer(array):
        """A ``data_writer`` for :func:`write_record` that saves *array* as ``.npy``."""
        import numpy as np

        def write(f) -> None:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        return write


# ------------------------------------------------------------------------------------------ record writers

def member_name(sensor: str, start: datetime, end: datetime, ext: str) -> str:
    """A record's name in a bundle, ``<sensor>_<from>_<to><ext>`` (UTC, ISO 8601 basic, e.g.
    ``hive_climate_20210619T000458Z_20210619T001458Z.csv``); *ext* starts with a dot. It is what the
    default ``filename_template`` renders (wacryptolib's TarfileRecordAggregator names its members so)."""
    if not ext.startswith("."):
        raise ValueError(f"extension must start with a dot, got {ext!r}")
    return safe_relative(f"{sensor}_{utc_stamp(start)}_{utc_stamp(end)}{ext}")


def with_default_metadata(default: dict, metadata: dict) -> dict:
    """*metadata* merged over *default* (``[archive] default_metadata``): a record's own keys win, and a
    table present in both is merged one level down the same way."""
    merged = dict(default)
    for key, value in metadata.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class JsonArchiver:
    """A JSON record writer. With ``merge_metadata`` (the default) the record's metadata is stored in
    the JSON record itself under the key ``"metadata"`` (a dict record gains that key; any other record
    becomes ``{"data": record, "metadata": ...}``); without it the file holds the record alone and the
    metadata lives only in the ``NAME.meta.json`` sidecar. UTF-8, keys sorted; values JSON cannot hold
    (datetimes) are written with ``str()``."""

    ext = "json"

    def __init__(self, merge_metadata: bool = True):
        self.merge_metadata = merge_metadata

    def render(self, data, metadata: dict) -> bytes:
        if self.merge_metadata:
            if isinstance(data, dict):
                if "metadata" in data:
                    raise ValueError("a record with its own 'metadata' key cannot take merged metadata")
                data = {**data, "metadata": metadata}
            else:
                data = {"data": data, "metadata": metadata}
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()

    def data_writer(self, data, metadata: dict):
        """A ``data_writer`` for :func:`write_record` / :class:`BackgroundWriter`."""
        body = self.render(data, metadata)
        return lambda f: f.write(body)


class BackgroundWriter:
    """Writes records on a thread, so a sensor's loop never waits on the SD card, and never drops one.

    ``write(relname, metadata, data_writer)`` is any writer callable (e.g. :func:`write_record` bound to
    a staging directory, or a sensor's ``write_staged``); it raises ``OSError`` on failure. A failed write
    is re-queued after ``retry_delay_s`` (doubling) up to ``max_retries`` times; after the last retry the
    record is written to *failed_dir* (``spool/failed/<sensor>/``) with ``write_error`` in its metadata
    and an ERROR log line. If even that fails (the disk is gone) the record stays queued and both are
    tried again every ``max_retry_delay_s``; one still queued when :meth:`close` gives up is logged as
    lost, by name. *data_writer* is called once per attempt, so it must be repeatable (bytes in memory).
    """

    def __init__(self, write, failed_dir: Path, max_retries: int = 3, retry_delay_s: float = 1.0,
                 max_retry_delay_s: float = 60.0, name: str = "record-writer"):
        self.write, self.failed_dir = write, Path(failed_dir)
        self.max_retries, self.retry_delay_s, self.max_retry_delay_s = max_retries, retry_delay_s, max_retry_delay_s
        self.written: list[Path] = []
        self.failed: list[Path] = []
        self._jobs: list[dict] = []
        self._seq = 0
        self._closing = False
        self._busy = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, relname: str, metadata: dict, data_writer) -> None:
        with self._cv:
            self._seq += 1
            self._jobs.append({"relname": relname, "metadata": metadata, "data_writer": data_writer,
                               "attempts": 0, "due": 0.0, "seq": self._seq})
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs) + self._busy

    def close(self, timeout: float = 30.0) -> int:
        """Finish the queue (retries included) within *timeout* s; then log what is left as lost.
        Returns the number of records lost."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        with self._cv:
            lost, self._jobs = self._jobs, []
            self._closing = True
        for job in lost:
            log.error("record %s could not be written before shutdown (%d attempt(s)); lost", job["relname"],
                      job["attempts"])
        return len(lost)

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                ready = [j for j in self._jobs if j["due"] <= now]
                if not ready:
                    if self._closing and not self._jobs:
                        return
                    wait = min((j["due"] for j in self._jobs), default=None)
                    self._cv.wait(None if wait is None else max(0.0, wait - now))
                    continue
                job = min(ready, key=lambda j: j["seq"])
                self._jobs.remove(job)
                self._busy = True
                self._cv.release()
                try:
                    again = self._attempt(job)
                finally:
                    self._cv.acquire()
                    self._busy = False
                if again:
                    self._jobs.append(job)

    def _attempt(self, job: dict) -> bool:
        """One try; True to re-queue."""
        if job["attempts"] <= self.max_retries:
            try:
                self.written.append(self.write(job["relname"], job["metadata"], job["data_writer"]))
                return False
            except OSError as e:
                job["attempts"] += 1
                job["error"] = e
                if job["attempts"] <= self.max_retries:
                    delay = Backoff(self.retry_delay_s, self.max_retry_delay_s).delay(job["attempts"])
                    job["due"] = time.monotonic() + delay
                    log.warning("writing record %s failed (%s); retry %d of %d in %g s", job["relname"],
                                   e.strerror or e, job["attempts"], self.max_retries, delay)
                    return True
        error = job["error"]
        try:
            path = write_record(self.failed_dir, job["relname"], {**job["metadata"], "write_error": str(error)},
                                data_writer=job["data_writer"])
        except OSError as e:
            job["due"] = time.monotonic() + self.max_retry_delay_s
            log.error("record %s: staging failed %d times (%s) and %s is not writable either (%s); "
                         "kept in memory, retrying in %g s", job["relname"], job["attempts"],
                         error.strerror or error, self.failed_dir, e.strerror or e, self.max_retry_delay_s)
            job["attempts"] = 0  # a later success may still go to staging
            return True
        self.failed.append(path)
        log.error("record %s could not be written after %d attempts (%s); moved to %s", job["relname"],
                     job["attempts"], error.strerror or error, path)
        return False
