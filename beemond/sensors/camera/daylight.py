"""Daylight-only schedules: is the sun up at a place and a UTC time? Computed locally, no network.

Sunrise and sunset come from ``astral`` (``astral.sun.sunrise`` / ``sunset``: the NOAA solar
calculator's equations, the upper limb at the horizon with 0.833° of standard refraction). A window is
``[sunrise + sunrise_offset_min, sunset + sunset_offset_min]``.

Local days and UTC days differ (in Auckland the sun sets on the UTC date it rose the day before), so
the rule is: daylight iff the latest sunrise/sunset event at or before *t*, among the days around
*t*, is a sunrise. Where there is none (polar day or polar night: astral raises ``ValueError``), the
sun's elevation at *t* decides: above the horizon is a polar day, below a polar night.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone


class Daylight:
    """The daylight schedule at (*latitude*, *longitude*) in degrees north and east."""

    def __init__(self, latitude: float, longitude: float, sunrise_offset_min: float = 0.0,
                 sunset_offset_min: float = 0.0):
        from astral import Observer

        self.observer = Observer(latitude=latitude, longitude=longitude)
        self.rise_offset = timedelta(minutes=sunrise_offset_min)
        self.set_offset = timedelta(minutes=sunset_offset_min)

    def sun_times(self, day: date) -> tuple[datetime | None, datetime | None]:
        """(sunrise, sunset) in UTC computed for *day*; ``None`` for an event that does not happen."""
        from astral.sun import sunrise, sunset

        times = []
        for fn in (sunrise, sunset):
            try:
                times.append(fn(self.observer, day, tzinfo=timezone.utc))
            except ValueError:  # "Sun is always below/above the horizon on this day"
                times.append(None)
        return times[0], times[1]

    def events(self, t: datetime) -> list[tuple[datetime, bool]]:
        """Sorted window edges around *t*: (time, True for a window start / False for an end)."""
        out = []
        for delta in range(-2, 3):
            rise, set_ = self.sun_times((t.astimezone(timezone.utc) + timedelta(days=delta)).date())
            if rise is not None:
                out.append((rise + self.rise_offset, True))
            if set_ is not None:
                out.append((set_ + self.set_offset, False))
        return sorted(set(out))

    def is_daylight(self, t: datetime) -> bool:
        """True if *t* (an aware datetime) falls inside a daylight window."""
        before = [is_start for when, is_start in self.events(t) if when <= t]
        if before:
            return before[-1]
        from astral.sun import elevation

        return elevation(self.observer, t) > 0.0
