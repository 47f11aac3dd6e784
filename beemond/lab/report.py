"""``beemond report DATA_DIR --out DIR``: pictures of an ingested data tree (:mod:`beemond.lab.ingest`).

Per hive and UTC day, ``DIR/<host>/<date>.png``: one panel per quantity present, over the day's time
(UTC): temperature (°C), relative humidity (%RH), weight (kg), CO₂ (ppm) from the daily CSVs (columns
``*temperature_c``, ``*_rh``, ``*weight_kg``, ``*co2_ppm``), and audio band power (dB re full scale²,
from the audio band power records' ``bands``). A gap is drawn as a gap: the line breaks wherever the day's
``gaps.csv`` lists one or two readings lie more than :data:`~beemond.lab.tables.HOLE_FACTOR` sampling intervals apart,
never interpolated across, and a listed gap is shaded. Beside each PNG, ``<date>.json`` holds exactly the
arrays that were plotted (``{"panels": [{"title", "unit", "series": [{"label", "t": [ISO...],
"v": [number or null (a break)]}]}], "gaps": [...]}``), so what a picture shows can be checked
against the CSVs without reading pixels.

``DIR/index.html``: a static page of the fleet, one row per hive: last reading, last upload (the newest
bundle's modification time in the upload tree, from the ledger), gaps (count and hours), alerts (records
with an ``"alert"`` key, e.g. a swarm), and links to its days' pictures. The same rows are embedded as
JSON (``<script type="application/json" id="fleet">``).

Needs matplotlib (``beemond[lab]``); imported here only, never on a device.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from beemond import spool
from beemond.core import fsio
from beemond.core.clock import parse_iso, utc_iso
from beemond.lab.ledger import LEDGER
from beemond.lab.tables import GAPS, HOLE_FACTOR
from beemond.core.names import HOST_RE

DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
QUANTITIES = [  # (title, unit, column test)
    ("Temperature", "°C", lambda c: c.endswith("temperature_c")),
    ("Humidity", "%RH", lambda c: c.endswith("_rh")),
    ("Weight", "kg", lambda c: c == "weight_kg" or c.endswith("_weight_kg")),
    ("CO₂", "ppm", lambda c: c.endswith("co2_ppm")),
]


def _t(text: str) -> float | None:
    try:
        return parse_iso(text).timestamp()
    except (ValueError, TypeError):
        return None


def _with_breaks(points: list[tuple[float, str, float]], gaps: list[tuple[float, float]]):
    """Sorted (t, iso, value) -> (isos, values) with a None between two points that straddle a listed
    gap or lie more than HOLE_FACTOR median steps apart."""
    points = sorted(points)
    steps = [b[0] - a[0] for a, b in zip(points, points[1:]) if b[0] > a[0]]
    limit = HOLE_FACTOR * sorted(steps)[len(steps) // 2] if steps else math.inf
    ts, vs = [], []
    for i, (t, iso, v) in enumerate(points):
        if i:
            prev = points[i - 1][0]
            if t - prev > limit or any(prev <= g0 < t or prev < g1 <= t for g0, g1 in gaps):
                ts.append(iso)
                vs.append(None)
        ts.append(iso)
        vs.append(v)
    return ts, vs


def day_data(day_dir: Path) -> dict:
    """The panels of one host's day (see the module docstring), from ``DATA_DIR/<host>/<date>/``."""
    host, date = day_dir.parent.name, day_dir.name
    gaps, alerts = [], []
    for g in sorted(day_dir.glob(f"*/{GAPS}")):
        for row in list(csv.reader(open(g, newline="", encoding="utf-8")))[1:]:
            if len(row) >= 4:
                gaps.append({"sensor": g.parent.name, "start": row[0], "end": row[1], "duration_s": row[2],
                             "source": row[3]})
    spans = [(_t(g["start"]), _t(g["end"])) for g in gaps]
    spans = [(a, b) for a, b in spans if a is not None and b is not None]
    panels = []
    for title, unit, test in QUANTITIES:
        series = []
        for daily in sorted(day_dir.glob(f"*/{host}@{date}.csv")):
            table = list(csv.reader(open(daily, newline="", encoding="utf-8")))
            if not table or table[0][:1] != ["time"]:
                continue
            for i, col in enumerate(table[0]):
                if i == 0 or not test(col):
                    continue
                pts = []
                for r in table[1:]:
                    t = _t(r[0])
                    try:
                        v = float(r[i]) if i < len(r) and r[i] != "" else None
                    except ValueError:
                        v = None
                    if t is not None and v is not None and math.isfinite(v):
                        pts.append((t, r[0], v))
                if pts:
                    ts, vs = _with_breaks(pts, spans)
                    series.append({"label": f"{daily.parent.name}.{col}", "t": ts, "v": vs})
        if series:
            panels.append({"title": title, "unit": unit, "series": series})
    bands: dict[str, list] = {}
    for rec in sorted(day_dir.glob("*/*.json")):
        if rec.name.endswith(spool.META_SUFFIX):
            continue
        try:
            body = json.loads(rec.read_text(encoding="utf-8"))
            meta = json.loads(spool.sidecar_of(rec).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # a record nested deeper than the parser's stack
            continue
        start = meta.get("start", "")
        if not isinstance(body, dict) or _t(start) is None:
            continue
        if isinstance(body.get("alert"), str):
            alerts.append({"time": start, "alert": body["alert"], "sensor": rec.parent.name,
                           "detail": {k: v for k, v in body.items() if k not in ("alert", "metadata")}})
        if isinstance(body.get("bands"), dict):
            for band, power in body["bands"].items():
                if isinstance(power, (int, float)) and power > 0:
                    bands.setdefault(f"{rec.parent.name} {band} Hz", []).append(
                        (_t(start), start, round(10 * math.log10(power), 3)))
    if bands:
        series = []
        for label, pts in sorted(bands.items()):
            ts, vs = _with_breaks(pts, spans)
            series.append({"label": label, "t": ts, "v": vs})
        panels.append({"title": "Audio band power", "unit": "dB FS²", "series": series})
    return {"host": host, "date": date, "panels": panels, "gaps": gaps, "alerts": alerts}


def plot_day(data: dict, png: Path) -> None:
    """Draw *data* (:func:`day_data`) into *png*: exactly the arrays in *data*, None as a break."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    n = max(1, len(data["panels"]))
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n + 0.8), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], data["panels"]):
        for s in panel["series"]:
            x = [parse_iso(t) for t in s["t"]]
            y = [math.nan if v is None else v for v in s["v"]]
            ax.plot(x, y, label=s["label"], linewidth=1.2)
        for g in data["gaps"]:
            a, b = _t(g["start"]), _t(g["end"])
            if a is not None and b is not None and b > a:
                ax.axvspan(datetime.fromtimestamp(a, timezone.utc), datetime.fromtimestamp(b, timezone.utc),
                           color="0.85", zorder=0)
        ax.set_ylabel(f"{panel['title']} ({panel['unit']})", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    if not data["panels"]:
        axes[0, 0].text(0.5, 0.5, "no readings", ha="center", va="center")
    axes[-1, 0].xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=timezone.utc))
    axes[-1, 0].set_xlabel("time (UTC)")
    fig.suptitle(f"{data['host']} {data['date']}")
    fig.tight_layout()
    tmp = fsio.temp_name(png.parent, png.name)
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    os.replace(tmp, png)


def _last_uploads(data_dir: Path) -> dict[str, str]:
    """{host: newest bundle mtime (upload time) as ISO} from the ledger; {} without one."""
    path = data_dir / LEDGER
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT b.host, max(f.mtime_ns) FROM bundles b JOIN files f ON f.name = b.name "
                          "GROUP BY b.host").fetchall()
    finally:
        db.close()
    return {h: utc_iso(datetime.fromtimestamp(ns / 1e9, timezone.utc)) for h, ns in rows if ns}


def build(data_dir, out) -> Path:
    """Write every day's PNG and JSON and ``index.html`` into *out*; returns the index's path.
    Raises ``OSError``."""
    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uploads = _last_uploads(data_dir)
    fleet = []
    for host_dir in sorted(p for p in data_dir.iterdir() if p.is_dir() and HOST_RE.match(p.name)):
        days = sorted(p for p in host_dir.iterdir() if p.is_dir() and DATE_RE.match(p.name))
        if not days:
            continue
        row = {"host": host_dir.name, "last_reading": "", "last_upload": uploads.get(host_dir.name, ""),
               "gaps": 0, "gap_hours": 0.0, "alerts": [], "days": []}
        (out / host_dir.name).mkdir(exist_ok=True)
        for day in days:
            data = day_data(day)
            plot_day(data, out / host_dir.name / f"{day.name}.png")
            with fsio.atomic_writer(out / host_dir.name / f"{day.name}.json", "w", sync_dir=False) as f:
                json.dump(data, f, indent=1)
            last = max((t for p in data["panels"] for s in p["series"] for t, v in zip(s["t"], s["v"]) if v is not None),
                       default="")
            row["last_reading"] = max(row["last_reading"], last)
            # one gap may be listed twice (declared by the device, and seen in the times): count it once
            unique = {(g["start"], g["end"]): float(g["duration_s"] or 0) for g in data["gaps"]}
            row["gaps"] += len(unique)
            row["gap_hours"] += sum(unique.values()) / 3600
            row["alerts"] += data["alerts"]
            row["days"].append(day.name)
        row["gap_hours"] = round(row["gap_hours"], 2)
        fleet.append(row)
    index = out / "index.html"
    with fsio.atomic_writer(index, "w", encoding="utf-8") as f:
        f.write(render_index(fleet))
    return index


def render_index(fleet: list[dict]) -> str:
    def cell(text) -> str:
        return f"<td>{html.escape(str(text))}</td>"

    rows = []
    for r in fleet:
        alerts = "; ".join(f"{a['alert']} at {a['time']}" for a in r["alerts"][-3:]) or "none"
        days = " ".join(f'<a href="{html.escape(r["host"])}/{d}.png">{d}</a>' for d in reversed(r["days"]))
        rows.append("<tr>" + cell(r["host"]) + cell(r["last_reading"] or "none") + cell(r["last_upload"] or "unknown")
                    + cell(f"{r['gaps']} ({r['gap_hours']} h)") + cell(f"{len(r['alerts'])}: {alerts}")
                    + f"<td>{days}</td></tr>")
    latest = [f'<figure><img src="{html.escape(r["host"])}/{r["days"][-1]}.png" alt="{html.escape(r["host"])} '
              f'{r["days"][-1]}" width="800"></figure>' for r in fleet if r["days"]]
    data = json.dumps(fleet).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>beemond fleet</title>
<style>body{{font-family:sans-serif;margin:1em 2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:4px 8px;text-align:left}} th{{background:#f3d36b}}</style></head>
<body><h1>beemond fleet: {len(fleet)} hive(s)</h1>
<p>Times are UTC. Last upload: the newest bundle received from the hive. Gaps: stretches without readings
(from the devices' restarts and from holes in the readings' times).</p>
<table id="hives"><thead><tr><th>Hive</th><th>Last reading</th><th>Last upload</th><th>Gaps</th><th>Alerts</th>
<th>Days</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Latest day per hive</h2>
{chr(10).join(latest)}
<script type="application/json" id="fleet">{data}</script>
</body></html>
"""
