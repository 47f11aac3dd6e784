"""The capture schedule as pure functions of the wall clock (no waiting for real hours), its config
checks, and one real-time run of the simulated audio worker on a short schedule."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from audio_peers import AudioThread
from beemond import config
from beemond.core import clock
from beemond.sensors.audio.schedule import LATE_S, CaptureWindow, parse_hhmm
from conftest import make_config, wait_for

UTC = timezone.utc
APPMAIS = CaptureWindow(time(8), time(20), 300, UTC)   # 60 s every 300 s, 08:00-20:00


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_appmais_slots():
    assert APPMAIS.next_start(at("2026-06-01T07:00:00")) == at("2026-06-01T08:00:00")
    assert APPMAIS.next_start(at("2026-06-01T08:00:00")) == at("2026-06-01T08:00:00")
    assert APPMAIS.next_start(at("2026-06-01T08:00:00.001")) == at("2026-06-01T08:05:00")
    assert APPMAIS.next_start(at("2026-06-01T19:54:00")) == at("2026-06-01T19:55:00")   # the last slot
    assert APPMAIS.next_start(at("2026-06-01T19:55:01")) == at("2026-06-02T08:00:00")
    assert APPMAIS.next_start(at("2026-06-01T23:59:59")) == at("2026-06-02T08:00:00")
    assert APPMAIS.in_window(at("2026-06-01T12:00:00")) and not APPMAIS.in_window(at("2026-06-01T20:00:00"))


def test_every_s_is_aligned_to_the_window_opening():
    w = CaptureWindow(time(8), time(9), 420, UTC)   # 7 min: does not divide the hour
    assert w.next_start(at("2026-06-01T08:10:00")) == at("2026-06-01T08:14:00")
    assert w.next_start(at("2026-06-01T08:56:00.5")) == at("2026-06-02T08:00:00")   # 09:03 is past the end


def test_window_crossing_midnight():
    w = CaptureWindow(time(22), time(4), 3600, UTC)
    assert w.next_start(at("2026-06-01T21:00:00")) == at("2026-06-01T22:00:00")
    assert w.next_start(at("2026-06-01T23:30:00")) == at("2026-06-02T00:00:00")
    assert w.next_start(at("2026-06-02T01:10:00")) == at("2026-06-02T02:00:00")    # the window of June 1
    assert w.next_start(at("2026-06-02T03:30:00")) == at("2026-06-02T22:00:00")    # 04:00 is the end
    assert w.in_window(at("2026-06-02T03:59:00")) and not w.in_window(at("2026-06-02T04:00:00"))
    whole_day = CaptureWindow(time(0), time(0), 300, UTC)
    assert whole_day.next_start(at("2026-06-01T23:58:00")) == at("2026-06-02T00:00:00")


def test_local_time_follows_dst():
    w = CaptureWindow(time(8), time(20), 300, ZoneInfo("Europe/Berlin"))
    assert w.next_start(at("2026-03-28T12:00:00")) == at("2026-03-28T12:00:00")  # 13:00 CET
    assert w.next_start(at("2026-03-28T20:00:00")) == at("2026-03-29T06:00:00")  # 08:00 CEST


def test_clock_jumps_neither_burst_nor_wait_negative():
    due = at("2026-06-01T08:05:00")
    # On time, or a little late: capture.
    assert APPMAIS.step(at("2026-06-01T08:05:00.003"), due) == (True, due)
    assert APPMAIS.step(due + timedelta(seconds=LATE_S), due) == (True, due)
    # NTP sync jumps the clock 72 min forward: the missed slots are skipped, not made up.
    jumped = at("2026-06-01T09:17:30")
    assert APPMAIS.step(jumped, due) == (False, at("2026-06-01T09:20:00"))
    assert APPMAIS.wait_s(jumped, due) == 0.0
    # ...or back to the epoch's default date: the next slot comes from the new clock; the wait is finite.
    back = at("2026-01-01T00:00:10")
    capture, new_due = APPMAIS.step(back, due)
    assert not capture and new_due == at("2026-01-01T08:00:00")
    assert APPMAIS.wait_s(back, new_due) == 8 * 3600 - 10
    # After a capture the next slot follows the one captured, even if the capture ran over it.
    assert APPMAIS.after(due) == at("2026-06-01T08:10:00")


def _simulate_day(window, capture_s, jumps):
    """The worker's loop on a simulated clock: wait (step/wait_s), capture capture_s, ask again.
    *jumps*: {wall time: seconds the clock jumps at the first look after it}. Returns capture starts."""
    now, end, due, starts = at("2026-06-01T00:00:00"), at("2026-06-02T00:00:00"), None, []
    while now < end:
        for when, by in list(jumps.items()):
            if now >= when:
                now += timedelta(seconds=by)
                del jumps[when]
        capture, new_due = window.step(now, due)
        if capture:
            starts.append(now)
            now += timedelta(seconds=capture_s)
            due = window.after(due)
        else:
            due = new_due
            now += timedelta(seconds=min(window.wait_s(now, due), 5.0))  # receive() wakes for heartbeats
    return starts


def test_a_simulated_day_with_an_ntp_jump():
    assert len(_simulate_day(APPMAIS, 60, {})) == 144   # 08:00 to 19:55
    starts = _simulate_day(APPMAIS, 60, {at("2026-06-01T10:02:00"): 3600})
    assert len(starts) == 144 - 12
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 300, "never a burst"


@pytest.mark.parametrize("key,value,message", [
    ("window_start", "8:00", "HH:MM"),
    ("window_end", "24:00", "HH:MM"),
    ("timezone", "Mars/Olympus", "unknown IANA time zone"),
    ("capture_s", 400, "must be <= every_s"),
    ("schedule", "hourly", "allowed: continuous, window"),
])
def test_bad_schedule_config(tmp_path, keys, password_file, key, value, message):
    path = make_config(tmp_path, keys, password_file, 21, **{"sensors.hive_audio.schedule": "window",
                                                             f"sensors.hive_audio.{key}": value})
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.key == f"sensors.hive_audio.{key}" and message in str(err.value)


def test_parse_hhmm():
    assert parse_hhmm("00:00") == time(0) and parse_hhmm("23:59") == time(23, 59)


def test_simulated_worker_captures_on_the_schedule_slots(tmp_path, keys, password_file):
    # Whole-day window, 0.5 s every 2 s: slots on even UTC seconds. The microphone's supply is switched
    # by GPIO5 (gpiozero MockFactory behind the simulated backend): on for each capture only.
    with AudioThread(make_config(tmp_path, keys, password_file, 21, **{
            "sensors.hive_audio.schedule": "window", "sensors.hive_audio.window_start": "00:00",
            "sensors.hive_audio.window_end": "00:00", "sensors.hive_audio.timezone": "UTC",
            "sensors.hive_audio.capture_s": 0.5, "sensors.hive_audio.every_s": 2,
            "sensors.hive_audio.block_s": 0.05, "sensors.hive_audio.power_pin": 5})) as run:
        pin = run.worker.power.device.pin
        wait_for(lambda: len(run.metadata()) >= 2, 10, "two scheduled captures")
        wait_for(lambda: not pin.state, 2, "the power to go off after the capture")
        states = [s.state for s in pin.states]
    assert run.error is None, run.error
    switched = [b for a, b in zip(states, states[1:]) if a != b]
    assert switched[:4] == [True, False, True, False], "on for each capture, off in between"
    full = [m for m in run.metadata() if m["frames"] == 4000]   # 0.5 s at 8000 Hz; shutdown may cut a last one
    assert len(full) >= 2
    slots = [clock.parse_iso(m["schedule"]["slot"]) for m in full]
    for m, slot in zip(full, slots):
        assert m["trigger"] == "schedule" and slot.microsecond == 0 and slot.second % 2 == 0
        assert abs((clock.parse_iso(m["start"]) - slot).total_seconds()) < 0.5, "captured at its slot"
    assert (slots[1] - slots[0]).total_seconds() == 2
