"""Swarm detector: a fast fall of the hive's weight.

When a colony swarms, about half of its bees (typically 1–3 kg) leave within minutes; foragers
leaving in the morning take 0.5–1 kg over hours, and nectar comes back through the day. The detector
reads the scale's ``weight_kilograms`` samples, smooths them with a running median of ``smoothing``
readings (one spike, a bump or a bird, cannot fire it), and raises an alert when the smoothed weight
is more than ``drop_kg`` below the highest smoothed weight of the last ``window_s`` seconds (data
time). After an alert the window restarts from the new weight, so one swarm gives one alert.

An alert is a warning log line, an ``alert`` event (counted as ``beemond_alerts_total{alert="swarm"}``)
and a JSON record ``{"alert": "swarm", "drop_kg", "from_kg", "to_kg", "window_s", "over_s"}``.
Every reading also sends ``swarm_drop_kilograms`` (the current fall within the window) as a metric.
"""

from __future__ import annotations

import collections
import logging
import statistics

from beemond import ipc
from beemond.processors.base import ProcessorWorker

log = logging.getLogger(__name__)


class SwarmDetector:
    """The detection rule alone, fed (data time s, kg) in time order; :meth:`feed` returns an alert
    dict or None."""

    def __init__(self, drop_kg: float, window_s: float, smoothing: int = 3):
        self.drop_kg, self.window_s = drop_kg, window_s
        self.recent: collections.deque[float] = collections.deque(maxlen=smoothing)
        self.window: collections.deque[tuple[float, float]] = collections.deque()  # (t, smoothed kg)
        self.drop = 0.0

    def feed(self, t: float, kg: float) -> dict | None:
        self.recent.append(kg)
        level = statistics.median(self.recent)
        while self.window and self.window[0][0] < t - self.window_s:
            self.window.popleft()
        self.window.append((t, level))
        t_peak, peak = max(self.window, key=lambda e: (e[1], e[0]))  # the latest time at the peak
        self.drop = peak - level
        if self.drop <= self.drop_kg:
            return None
        alert = {"alert": "swarm", "drop_kg": round(self.drop, 3), "from_kg": round(peak, 3),
                 "to_kg": round(level, 3), "window_s": self.window_s, "over_s": round(t - t_peak, 1)}
        self.window.clear()
        self.window.append((t, level))
        self.recent.clear()
        self.recent.append(level)
        self.drop = 0.0
        return alert


class SwarmWorker(ProcessorWorker):
    def __init__(self, cfg, proc, channel: ipc.Channel):
        super().__init__(cfg, proc, channel)
        self.detector = SwarmDetector(proc.drop_kg, proc.window_s, proc.smoothing)

    def process_sample(self, values: dict, data_time: float) -> dict | None:
        kg = values.get(self.proc.quantity)
        if kg is None:
            return None
        alert = self.detector.feed(data_time, float(kg))
        self.channel.send(ipc.SAMPLE, sensor=self.proc.sensor, values={"swarm_drop_kilograms": self.detector.drop})
        if alert is None:
            return None
        log.warning("SWARM ALERT on %s: weight fell %.2f kg (%.2f -> %.2f kg) within %.0f s",
                    self.proc.sensor, alert["drop_kg"], alert["from_kg"], alert["to_kg"], alert["over_s"])
        self.channel.send(ipc.ALERT, sensor=self.proc.sensor, alert="swarm",
                          details={k: v for k, v in alert.items() if k != "alert"})
        return alert
