"""Staged records: how a sensor or processor worker names a record and writes it into the spool.

Every record is written by its *owner*, the worker that made it (a sensor's, or a processor's for a
derived record). The owner is any object with:

- ``cfg``: the daemon's :class:`beemond.config.Config`;
- ``name``: the sensor's or processor's name (its records go to ``staging/<name>/``, its READY_EVENT
  names it);
- ``staging``: that directory (:meth:`beemond.spool.Spool.staging_dir`);
- ``template``: the sandboxed Jinja2 filename template (``cfg.template_for(section)``);
- ``ext``: the default extension of its records;
- ``channel``: its :class:`beemond.ipc.Channel`;
- optionally ``clock``: a :class:`beemond.core.clock.Clock` whose ``synchronized()`` says whether the wall
  clock was synchronised (else :func:`beemond.core.clock.synchronized`).

Sensors (:mod:`beemond.sensors.base`) and processors (:mod:`beemond.processors.base`) both use these
helpers; neither borrows them from the other. The directories themselves belong to
:mod:`beemond.spool`.

The record writers live here too: :class:`JsonArchiver` and :class:`ArrayArchiver` turn a record
into bytes, :class:`BackgroundWriter` writes records on a thread with retries and a ``failed/``
fallback, :func:`with_default_metadata` merges ``[archive] default_metadata``. The crash-safe
writes under them are :mod:`beemond.core.fsio`'s, the record and sidecar names :mod:`beemond.spool`'s.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from beemond import ipc
from beemond.core import names
from beemond.core.clock import Backoff, synchronized as clock_synchronized
from beemond.config.schema import DEFAULT_TEMPLATE
from beemond.spool import sidecar_of, unique_name, write_record

log = logging.getLogger(__name__)

EVENT_COUNTS = ("overflows", "errors", "missed", "rejected")   # record metadata copied into its READY_EVENT


def staged_twin(staging: Path, rel: str, metadata: dict) -> str | None:
    """The staged record named *rel* (or ``unique_name``'s ``STEM-N.EXT`` of it) holding the same readings
    as *metadata* (start and end, in ms): names have whole seconds, so a name alone may be another record."""
    stem, dot, ext = rel.rpartition(".") if "." in rel.rsplit("/", 1)[-1] else (rel, "", "")
    n = 0
    while (staging / (name := rel if n == 0 else f"{stem}-{n}{dot}{ext}")).exists():
        try:
            other = json.loads(sidecar_of(staging / name).read_bytes())
        except (OSError, ValueError):   # a cut before its sidecar: as before, taken to be this record
            return name
        if all(other.get(k) == metadata.get(k) for k in ("start", "end")):
            return name
        n += 1
    return None


def write_staged(worker, start: datetime, end: datetime, metadata: dict, data_writer=None,
                 tmp: Path | None = None, ext: str | None = None, split_index: int = 0) -> Path:
    """Render the record's name, write it durably into staging and announce it to the orchestrator.

    *ext* overrides ``worker.ext`` (a worker that writes more than one kind of record). *split_index*
    is the template's ``_split_index``: the position of this record among the records made from one
    array (``records.ArrayArchiver`` with ``split_data_array``); 0 otherwise.

    *metadata* gains ``clock_synchronized`` (bool, from the worker's ``clock`` or
    :func:`beemond.core.clock.synchronized`) unless the caller set it for the record's whole span.
    Raises ``OSError`` when the record cannot be written (nothing is announced then).
    """
    metadata = staged_metadata(worker, metadata)
    rel = staged_name(worker, start, end, metadata, ext=ext, split_index=split_index)
    return stage(worker, rel, metadata, data_writer=data_writer, tmp=tmp)


def staged_metadata(worker, metadata: dict) -> dict:
    """A record's final metadata: ``clock_synchronized`` added (see :func:`write_staged`) and
    ``[archive] default_metadata`` under the record's own keys."""
    if "clock_synchronized" not in metadata:
        wc = getattr(worker, "clock", None)
        metadata["clock_synchronized"] = wc.synchronized() if wc is not None else clock_synchronized()
    return with_default_metadata(worker.cfg.archive.default_metadata, metadata)


def staged_name(worker, start: datetime, end: datetime, metadata: dict, ext: str | None = None,
                split_index: int = 0) -> str:
    """The record's name relative to staging, rendered from the sandboxed filename template."""
    cfg = worker.cfg
    variables = {"host": cfg.daemon.host, "sensor": worker.name, "start": names.utc_stamp(start),
                 "end": names.utc_stamp(end), "ext": ext or worker.ext, "date": start.strftime("%Y-%m-%d"),
                 "metadata": metadata, "_split_index": split_index}
    try:
        return names.render_name(worker.template, **variables)
    except names.TemplateError as e:
        # Checked at load with sample values; a template reading record metadata can still fail on a
        # real record. Never drop the record for its name.
        log.error("filename template failed for this record (%s); using the default name", e)
        return names.render_name(DEFAULT_TEMPLATE, **variables)


def stage(worker, rel: str, metadata: dict, data_writer=None, tmp: Path | None = None) -> Path:
    """Write one record named *rel* durably into ``worker.staging`` (never over a staged record of the
    same name) and send its READY_EVENT. The ``write`` of a :class:`beemond.records.BackgroundWriter`.
    Raises ``OSError``."""
    path = write_record(worker.staging, unique_name(worker.staging, rel), metadata,
                        data_writer=data_writer, tmp=tmp)
    # Non-zero counters ride along for the metrics (audio overflows, missed measurements), so the
    # orchestrator never has to read a sidecar.
    counts = {k: metadata[k] for k in EVENT_COUNTS if isinstance(metadata.get(k), int) and metadata[k]}
    worker.channel.send(ipc.READY_EVENT, sensor=worker.name, path=str(path), **counts)
    return path


# ------------------------------------------------------------------------------------------ record writers

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
