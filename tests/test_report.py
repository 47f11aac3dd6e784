"""`beemond report`: per hive and day a PNG and the JSON of exactly what it plots (checked against the
daily CSVs and the audio band power records, gaps as breaks), and the fleet's index.html. (The index in
headless Chromium: scripts/check-report.)"""

from __future__ import annotations

import csv
import json
import math
import re

from beemond import spool
from beemond.core import clock
from test_lab import cli, lab, seal  # noqa: F401  (lab: the fixture)


def climate(times, temps, hums) -> bytes:
    return ("time,temperature_c,humidity_rh\n" + "".join(f"{t},{a:.2f},{b:.2f}\n" for t, a, b in zip(times, temps, hums))).encode()


def make_fleet(tmp_path, lab):
    """hive-07: climate with a 20-minute gap (declared after a restart), weight, audio band power, a swarm
    alert; hive-08: climate only."""
    t = [f"2021-06-19T10:{m:02d}:00.000Z" for m in (0, 1, 2, 3, 4, 25, 26, 27, 28)]
    seal(tmp_path, lab, "hive-07", [
        ("hive_climate", "a.csv", climate(t[:5], [30 + i / 10 for i in range(5)], [55.0] * 5), t[0], t[4], {}),
        ("hive_climate", "b.csv", climate(t[5:], [31 + i / 10 for i in range(4)], [56.0] * 4), t[5], t[8],
         {"after_restart": True, "gap_s": 1260}),
        ("hive_scale", "w.csv", ("time,weight_kg\n" + "".join(f"{x},{40 - i / 100:.2f}\n" for i, x in enumerate(t))).encode(),
         t[0], t[8], {}),
        ("hive_bands", "b1.json", json.dumps({"rms": 0.1, "bands": {"100-300": 0.01, "300-600": 0.001}}).encode(),
         t[0], t[1], {}),
        ("hive_bands", "b2.json", json.dumps({"rms": 0.1, "bands": {"100-300": 0.02, "300-600": 0.002}}).encode(),
         t[2], t[3], {}),
        ("hive_swarm", "s.json", json.dumps({"alert": "swarm", "drop_kg": 1.8}).encode(), t[7], t[7], {}),
    ])
    seal(tmp_path, lab, "hive-08", [
        ("hive_climate", "a.csv", climate(t[:4], [28.0, 28.1, 28.2, 28.3], [60.0] * 4), t[0], t[3], {})])
    r = cli("ingest", lab["upload"], "--identity", lab["identity"], "--trusted-devices", lab["trusted"], "--out", lab["out"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_report_plots_the_csv_values_with_gaps_as_breaks(tmp_path, lab):
    make_fleet(tmp_path, lab)
    out = tmp_path / "report"
    r = cli("report", lab["out"], "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    for host in ("hive-07", "hive-08"):
        png = (out / host / "2021-06-19.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    data = json.loads((out / "hive-07" / "2021-06-19.json").read_text())
    panels = {p["title"]: p for p in data["panels"]}
    assert list(panels) == ["Temperature", "Humidity", "Weight", "Audio band power"]  # no CO2 on this hive
    day = lab["out"] / "hive-07" / "2021-06-19"
    for title, sensor, col in (("Temperature", "hive_climate", "temperature_c"), ("Humidity", "hive_climate", "humidity_rh"),
                               ("Weight", "hive_scale", "weight_kg")):
        table = list(csv.reader(open(day / sensor / f"hive-07@2021-06-19.csv")))
        i = table[0].index(col)
        (s,) = panels[title]["series"]
        assert s["label"] == f"{sensor}.{col}"
        # the plotted points are the CSV's, in order; the only extra entry is one break, in the gap
        assert [(t, v) for t, v in zip(s["t"], s["v"]) if v is not None] == [(row[0], float(row[i])) for row in table[1:]]
        breaks = [k for k, v in enumerate(s["v"]) if v is None]
        assert len(breaks) == 1 and s["t"][breaks[0] - 1] == "2021-06-19T10:04:00.000Z" \
            and s["t"][breaks[0] + 1] == "2021-06-19T10:25:00.000Z"
    bands = {s["label"]: [v for v in s["v"]] for s in panels["Audio band power"]["series"]}
    assert bands == {"hive_bands 100-300 Hz": [round(10 * math.log10(0.01), 3), round(10 * math.log10(0.02), 3)],
                     "hive_bands 300-600 Hz": [-30.0, round(10 * math.log10(0.002), 3)]}
    assert {(g["source"], g["duration_s"]) for g in data["gaps"]} == {("after_restart", "1260"), ("timestamps", "1260")}
    assert [a["alert"] for a in data["alerts"]] == ["swarm"]

    page = (out / "index.html").read_text()
    fleet = json.loads(re.search(r'<script type="application/json" id="fleet">(.*?)</script>', page, re.S)[1])
    rows = {r["host"]: r for r in fleet}
    assert list(rows) == ["hive-07", "hive-08"]
    assert rows["hive-07"]["last_reading"] == "2021-06-19T10:28:00.000Z"
    assert rows["hive-08"]["last_reading"] == "2021-06-19T10:03:00.000Z"
    assert rows["hive-07"]["gaps"] == 1 and rows["hive-07"]["gap_hours"] == 0.35 and rows["hive-08"]["gaps"] == 0
    assert len(rows["hive-07"]["alerts"]) == 1 and not rows["hive-08"]["alerts"]
    uploaded = max(p.stat().st_mtime_ns for p in (lab["upload"] / "hive-07").glob("*.tar.age"))
    assert abs(clock.parse_iso(rows["hive-07"]["last_upload"]).timestamp() - uploaded / 1e9) < 0.001
    assert page.count("<tr>") == 3 and 'href="hive-07/2021-06-19.png"' in page


def test_a_deeply_nested_json_record_does_not_stop_the_report(tmp_path):
    from beemond.lab import report

    day = tmp_path / "data" / "hive-07" / "2021-06-19" / "mic"
    day.mkdir(parents=True)
    (day / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    spool.sidecar_of(day / "deep.json").write_text(json.dumps({"start": "2021-06-19T00:00:00.000Z"}))
    (day / "swarm.json").write_text(json.dumps({"alert": "swarm"}))
    spool.sidecar_of(day / "swarm.json").write_text(json.dumps({"start": "2021-06-19T00:01:00.000Z"}))
    data = report.day_data(day.parent)
    assert [a["alert"] for a in data["alerts"]] == ["swarm"]
