"""``DATA_DIR/README.md``: the data tree's "data and file overview"."""

from __future__ import annotations

from pathlib import Path

from beemond.lab.ledger import LEDGER, REJECTED
from beemond.lab.tables import HOLE_FACTOR, PARQUET
from beemond.core.fsio import atomic_writer

UNITS = {"_c": "degrees Celsius (°C)", "_rh": "relative humidity (%RH)", "_kg": "kilograms (kg)",
         "_ppm": "parts per million (ppm)", "_pa": "pascals (Pa)", "_hpa": "hectopascals (hPa)", "_hz": "hertz (Hz)",
         "_v": "volts (V)", "_lux": "lux (lx)", "_s": "seconds (s)", "_ratio": "ratio (1 = full scale)"}


def write_readme(out: Path, licence: str = "") -> None:
    """``DATA_DIR/README.md``: the data tree's "data and file overview" (what, units, time zone,
    source, licence), in the style of FRDR's README template. Rewritten when its text changes."""
    text = f"""# beemond data tree

## Data and file overview
What: readings and recordings from research beehives, taken by beemond field recorders (one per hive),
sealed on the device into age-encrypted, Ed25519-signed bundles, and unpacked here by `beemond ingest`.
Every record was checked against its bundle's manifest (size and SHA-256) and its bundle's signature
against the hive's trusted device key before it was written here.

Time zone: every time, in names and in data, is UTC (ISO 8601, `Z`), as the device's clock gave it
(a record's metadata says whether the clock was synchronised).

Source: the devices' bundles (`<host>_<start>_<group>_<digest>.tar.age`); each record's
`NAME.meta.json` names the bundle it came from and the key that signed it.

Licence: {licence or "not stated yet: add the licence under which this data is shared (e.g. CC-BY-4.0)."}

## Files
- `<host>/<date>/<sensor>/<record>`: each record as the device wrote it (CSV readings, FLAC/WAV audio,
  JSON analysis results such as audio band power or alerts, JPEG/MP4 images), beside
  `<record>.meta.json` (its manifest entry: sensor, start, end, size, sha256, metadata; bundle; signing key).
  A record whose name another record of that day already had is `NAME~<first 12 hex digits of its SHA-256>.EXT`.
- `<host>/<date>/<sensor>/<host>@<date>.csv`: every reading of that sensor on that UTC day, one row per
  reading, sorted by `time`, no duplicates; archival format, with the FLAC audio.
- `<host>/<date>/<sensor>/gaps.csv`: `start,end,duration_s,source`: stretches without readings.
  `source` is `after_restart` or `device` (declared by the device: `gap_s` seconds since its last durable
  reading) or `timestamps` (a step longer than {HOLE_FACTOR:g} median sampling intervals in the day's CSV).
- `{PARQUET}/host=<host>/sensor=<sensor>/date=<date>/data.parquet` (when ingested with `--parquet`):
  the daily CSVs as Parquet (hive partitioning; e.g. DuckDB
  `read_parquet('{PARQUET}/**/*.parquet', hive_partitioning=true)`). A mirror: the CSVs are the record.
- `{REJECTED}/`: bundles that failed a check, each with `NAME.reason`.
- `{LEDGER}`: what has been ingested (SQLite); `.ingest.lock`: held while an ingest runs.

## Columns and units
The first column of a daily CSV is `time` (UTC). A column's unit is its name's suffix:
""" + "".join(f"- `*{k}`: {v}\n" for k, v in UNITS.items()) + """
An empty cell: the column did not exist yet when that reading was taken, or the sensor gave no value.
"""
    path = out / "README.md"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with atomic_writer(path, "w", encoding="utf-8") as f:
            f.write(text)
