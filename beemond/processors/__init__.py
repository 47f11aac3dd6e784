"""On-device processors: workers that turn one sensor's records or samples into derived records and
metrics (audio band power, swarm alerts). See :mod:`beemond.processors.base` for the lifecycle."""

from __future__ import annotations

from beemond import registry


def make_processor_worker(cfg, proc, channel):
    """The worker object for *proc* (a ``ProcessorConfig``). Raises ``ValueError`` for an unknown type."""
    return registry.lookup(registry.PROCESSORS, proc.type, "processor")(cfg, proc, channel)
