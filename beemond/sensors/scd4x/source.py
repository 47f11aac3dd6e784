"""A simulated hive CO2 signal: a synthetic daily colony-respiration curve.

No file in ``data/`` has a CO2 column (the UrBAN subset has temperature and humidity only), so the
simulated SCD4x takes temperature and humidity from the replayed row and CO2 from this curve, evaluated
at the row's own time, so a replay gives the same CO2 every run::

    h      = hour of day at the hive, (UTC hours + utc_offset_h) mod 24
    CO2(h) = low_ppm + (high_ppm - low_ppm) * (1 + cos(2 * pi * (h - peak_hour) / 24)) / 2

a cosine that is ``high_ppm`` at ``peak_hour`` and ``low_ppm`` twelve hours later.

Order of magnitude and shape, from hive measurements (the defaults are inside these ranges; the curve
is not fitted to any of them):

- Seeley 1974, as cited by the COLOSS BEEBOOK (vol. I, in vitro chapter, 6.5.1): colonies keep CO2
  between 0.1 % and 4.3 % (1 000-43 000 ppm);
- Meikle, Barg & Weiss 2022 (Apidologie, doi:10.1007/s13592-022-00954-1): 1-s hive CO2 records with
  "strong daily cycles" and a 24 h period as the only important one, average daily maxima > 11 000 ppm;
- Newton, Chamberlain, McVeigh & Bencsik 2024 (Appl. Sci. 14:1679, doi:10.3390/app14041679), with
  SCD41 sensors in UK hives: summer CO2 "varies throughout the day and night over ranges that typically
  exceed 5000 ppm"; Newton et al. 2023 (Sensors 23:3588, doi:10.3390/s23073588) relate the CO2 change to
  the foragers leaving the hive in the morning.

The phase (highest before dawn with the foragers home, lowest in the afternoon) follows the last
point and is an assumption of this model, as are the defaults low 2 000 ppm, high 8 000 ppm, peak at
04:00 local time. ``utc_offset_h = -4`` puts the UrBAN rows (Montréal, summer time) on local time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

LOW_PPM = 2000.0
HIGH_PPM = 8000.0
PEAK_HOUR = 4.0
URBAN_UTC_OFFSET_H = -4.0      # Montréal in summer (EDT), where the UrBAN hives stand


@dataclass(frozen=True)
class RespirationCurve:
    """The daily curve above. ``co2_ppm(t)`` needs a timezone-aware *t*; raises ``ValueError`` otherwise."""

    low_ppm: float = LOW_PPM
    high_ppm: float = HIGH_PPM
    peak_hour: float = PEAK_HOUR
    utc_offset_h: float = URBAN_UTC_OFFSET_H

    def co2_ppm(self, t: datetime) -> float:
        if t.tzinfo is None:
            raise ValueError("the respiration curve needs a timezone-aware time")
        utc = t.timestamp() / 3600.0
        h = (utc + self.utc_offset_h) % 24.0
        rise = (1 + math.cos(2 * math.pi * (h - self.peak_hour) / 24)) / 2
        return self.low_ppm + (self.high_ppm - self.low_ppm) * rise
