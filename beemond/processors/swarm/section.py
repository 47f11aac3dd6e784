"""``[processors.NAME]`` with ``type = "swarm"`` (an example: ``example.toml`` beside this file)."""

from __future__ import annotations

from dataclasses import dataclass

from beemond.config.schema import ProcessorConfig, opt


@dataclass(frozen=True)
class SwarmConfig(ProcessorConfig):
    quantity: str = opt("weight_kilograms", doc="the SAMPLE quantity holding the hive weight")
    drop_kg: float = opt(1.0, min=0.05, max=100, doc="a fall of more than this ...")
    window_s: float = opt(900.0, min=10, max=86400, doc="... within this many seconds raises a swarm alert")
    smoothing: int = opt(3, min=1, max=100, doc="median of this many readings (rejects single spikes)")

    def describe(self) -> str:
        return f"swarm alert on a drop of more than {self.drop_kg:g} kg within {self.window_s:g} s"
