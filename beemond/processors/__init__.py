"""On-device processors: workers that turn one sensor's records or samples into derived records and
metrics (audio band power, swarm alerts). See :mod:`beemond.processors.base` for the lifecycle."""

from __future__ import annotations

from beemond.ipc import load_worker_class

# type = "..." -> "module:WorkerClass". One line per processor; the config class is in
# beemond.config.PROCESSOR_TYPES. Imported lazily so each worker loads only its own libraries.
PROCESSORS = {
    "audio_bands": "beemond.processors.audio_bands:AudioBandsWorker",
    "swarm": "beemond.processors.swarm:SwarmWorker",
}


def make_processor_worker(cfg, proc, channel):
    """The worker object for *proc* (a ``ProcessorConfig``). Raises ``ValueError`` for an unknown type."""
    return load_worker_class(PROCESSORS, proc.type, "processor")(cfg, proc, channel)
