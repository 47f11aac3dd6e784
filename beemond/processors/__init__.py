"""On-device processors: workers that turn one sensor's records or samples into derived records and
metrics (audio band power, swarm alerts). See :mod:`beemond.processors.base` for the lifecycle."""

from __future__ import annotations

import importlib

# type = "..." -> "module:WorkerClass". One line per processor; the config class is in
# beemond.config.PROCESSOR_TYPES. Imported lazily so each worker loads only its own libraries.
PROCESSORS = {
    "audio_bands": "beemond.processors.audio_bands:AudioBandsWorker",
    "swarm": "beemond.processors.swarm:SwarmWorker",
}


def make_processor_worker(cfg, proc, channel):
    """The worker object for *proc* (a ``ProcessorConfig``). Raises ``ValueError`` for an unknown type."""
    try:
        module, cls = PROCESSORS[proc.type].split(":")
    except KeyError:
        raise ValueError(f"no processor of type {proc.type!r}") from None
    return getattr(importlib.import_module(module), cls)(cfg, proc, channel)
