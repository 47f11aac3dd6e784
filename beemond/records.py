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
- optionally ``clock``: a :class:`beemond.clock.Clock` whose ``synchronized()`` says whether the wall
  clock was synchronised (else :func:`beemond.clock.synchronized`).

Sensors (:mod:`beemond.sensors.base`) and processors (:mod:`beemond.processors.base`) both use these
helpers; neither borrows them from the other. The directories themselves belong to
:mod:`beemond.spool`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from beemond import archive, ipc
from beemond.clock import synchronized as clock_synchronized
from beemond.config.schema import DEFAULT_TEMPLATE
from beemond.spool import unique_name

log = logging.getLogger(__name__)

EVENT_COUNTS = ("overflows", "errors", "missed", "rejected")   # record metadata copied into its READY_EVENT


def staged_twin(staging: Path, rel: str, metadata: dict) -> str | None:
    """The staged record named *rel* (or ``unique_name``'s ``STEM-N.EXT`` of it) holding the same readings
    as *metadata* (start and end, in ms): names have whole seconds, so a name alone may be another record."""
    stem, dot, ext = rel.rpartition(".") if "." in rel.rsplit("/", 1)[-1] else (rel, "", "")
    n = 0
    while (staging / (name := rel if n == 0 else f"{stem}-{n}{dot}{ext}")).exists():
        try:
            other = json.loads(archive.sidecar_of(staging / name).read_bytes())
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
    array (``archive.ArrayArchiver`` with ``split_data_array``); 0 otherwise.

    *metadata* gains ``clock_synchronized`` (bool, from the worker's ``clock`` or
    :func:`beemond.clock.synchronized`) unless the caller set it for the record's whole span.
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
    return archive.with_default_metadata(worker.cfg.archive.default_metadata, metadata)


def staged_name(worker, start: datetime, end: datetime, metadata: dict, ext: str | None = None,
                split_index: int = 0) -> str:
    """The record's name relative to staging, rendered from the sandboxed filename template."""
    cfg = worker.cfg
    variables = {"host": cfg.daemon.host, "sensor": worker.name, "start": archive.utc_stamp(start),
                 "end": archive.utc_stamp(end), "ext": ext or worker.ext, "date": start.strftime("%Y-%m-%d"),
                 "metadata": metadata, "_split_index": split_index}
    try:
        return archive.render_name(worker.template, **variables)
    except archive.TemplateError as e:
        # Checked at load with sample values; a template reading record metadata can still fail on a
        # real record. Never drop the record for its name.
        log.error("filename template failed for this record (%s); using the default name", e)
        return archive.render_name(DEFAULT_TEMPLATE, **variables)


def stage(worker, rel: str, metadata: dict, data_writer=None, tmp: Path | None = None) -> Path:
    """Write one record named *rel* durably into ``worker.staging`` (never over a staged record of the
    same name) and send its READY_EVENT. The ``write`` of a :class:`beemond.archive.BackgroundWriter`.
    Raises ``OSError``."""
    path = archive.write_record(worker.staging, unique_name(worker.staging, rel), metadata,
                                data_writer=data_writer, tmp=tmp)
    # Non-zero counters ride along for the metrics (audio overflows, missed measurements), so the
    # orchestrator never has to read a sidecar.
    counts = {k: metadata[k] for k in EVENT_COUNTS if isinstance(metadata.get(k), int) and metadata[k]}
    worker.channel.send(ipc.READY_EVENT, sensor=worker.name, path=str(path), **counts)
    return path
