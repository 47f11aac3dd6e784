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
import functools
import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import jinja2
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


_env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                     keep_trailing_newline=False)


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
    try:
        return _env.from_string(text)
    except jinja2.TemplateError as e:
        raise TemplateError(f"template does not compile: {e}") from None


def render_name(template: str, **variables: Any) -> str:
    """Render a record name and check it stays inside its directory.

    Returns a relative POSIX path (it may contain ``/`` for sub-directories). Raises
    :class:`TemplateError` for an undefined variable, an absolute path, a ``..`` or hidden
    component, or a name that collides with beemond's own temporary and sidecar names.
    """
    try:
        name = _compile(template).render(**variables).strip()
    except jinja2.TemplateError as e:
        raise TemplateError(f"template failed to render: {e}") from None
    return safe_relative(name)


def check_template(text: str) -> None:
    """Compile and trial-render a filename template with sample values (config-load check)."""
    render_name(text, **_SAMPLE)


def check_layout(text: str) -> None:
    """Compile and trial-render a remote layout template (``host``, ``date``, ``name``, ``sensor``)."""
    render_name(text, **_SAMPLE)


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
