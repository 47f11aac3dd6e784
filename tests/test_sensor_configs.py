"""The shipped configs show every sensor type (issue 3, item 8): config/beemond.toml has each one, active
or commented out for a Pi, and each commented example is valid once uncommented; config/simulated.toml
runs every type simulated. Loaded by the real loader (beemond.config.load)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tomli_w

from beemond import config, registry
from conftest import ROOT, make_config

TABLE = re.compile(r"^# \[sensors\.[a-z0-9_.]+\]\s*$")


def uncomment_sensor_tables(text: str) -> str:
    """Every ``# [sensors.X]`` example with its commented keys, uncommented (up to a non-comment line)."""
    out, inside = [], False
    for line in text.splitlines():
        if TABLE.match(line):
            inside = True
        elif not line.startswith("#"):
            inside = False
        out.append(line[2:] if inside and line.startswith("# ") else ("" if inside and line == "#" else line))
    return "\n".join(out) + "\n"


def test_every_sensor_in_beemond_toml_is_valid_when_uncommented(tmp_path: Path, keys):
    # Only the sensors are under test: the rest points at /etc and a lab server that are not here.
    tree = _pi_tree(tmp_path, keys)
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(tree))
    cfg = config.load(path)
    assert {s.type for s in cfg.sensors} == set(registry.SENSORS)
    assert all(s.backend == "hardware" for s in cfg.sensors)
    cam = next(s for s in cfg.sensors if s.type == "camera")
    assert cam.daylight_only and (cam.latitude, cam.longitude) == (50.63, 3.06)


def test_simulated_toml_runs_every_sensor_type_simulated(tmp_path: Path, keys, password_file):
    # An override of one of the SCD4x's keys keeps it in make_config's fast hive.
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{"sensors.hive_co2.enabled": True}))
    assert {s.type for s in cfg.sensors} == set(registry.SENSORS)
    assert all(s.backend == "simulated" and s.enabled for s in cfg.sensors)


def _example(table: str, kind: str) -> dict:
    """The ``example.toml`` of *kind*'s package (``beemond/sensors/TYPE/`` or ``beemond/processors/TYPE/``)."""
    package = registry.package(registry.SENSORS if table == "sensors" else registry.PROCESSORS, kind)
    return tomllib.loads((ROOT / package.replace(".", "/") / "example.toml").read_text())


def _pi_tree(tmp_path: Path, keys) -> dict:
    """config/beemond.toml with every sensor uncommented, pointed at this test's spool and keys."""
    tree = tomllib.loads(uncomment_sensor_tables((ROOT / "config" / "beemond.toml").read_text()))
    tree["daemon"]["spool_dir"] = str(tmp_path / "spool")
    tree["bundle"] = {"recipients": [str(keys["recipient"])]}
    tree["upload"] = {"protocol": "none"}
    return tree


def test_each_package_has_an_example_snippet_that_loads(tmp_path: Path, keys):
    """Every registered sensor and processor package holds an example.toml: one table of its type,
    valid when it takes the place of the table of that name in the Pi's config."""
    for table, kinds in (("sensors", registry.SENSORS), ("processors", registry.PROCESSORS)):
        for kind in kinds:
            example = _example(table, kind)
            assert set(example) == {table}, f"{kind}: only [{table}.NAME] tables"
            (name, snippet), = example[table].items()
            assert snippet["type"] == kind
            tree = _pi_tree(tmp_path, keys)
            tree.setdefault(table, {})[name] = snippet
            path = tmp_path / f"{kind}.toml"
            path.write_text(tomli_w.dumps(tree))
            loaded = {item.name: item for item in getattr(config.load(path), table)}
            section = registry.section(kinds, kind, table)
            assert type(loaded[name]) is section, (kind, type(loaded[name]))


def test_replay_columns_map_quantities_to_any_csv_columns(tmp_path: Path, keys, password_file):
    from beemond.sensors.replay import CsvReplay

    data = tmp_path / "hive.csv"
    data.write_text("when,celsius,rh,hpa_x100\n2021-06-19T00:00:00Z,31.5,60.25,100900\n"
                    "2021-06-19T00:01:00Z,31.75,,101000\n2021-06-19T00:02:00Z,32.0,59.5,101100\n")
    replay = {"file": str(data), "time_column": "when",
              "columns": {"temperature_c": "celsius", "humidity_rh": "rh", "pressure_pa": "hpa_x100"}}
    cfg = config.load(make_config(tmp_path, keys, password_file, 21, **{
        "sensors.hive_air.replay": replay, "sensors.hive_climate.replay": {
            "file": str(data), "time_column": "when", "columns": {"temperature_c": "celsius", "humidity_rh": "rh"}}}))
    air = next(s for s in cfg.sensors if s.name == "hive_air")
    assert air.replay_columns() == {"temperature_c": "celsius", "humidity_rh": "rh", "pressure_pa": "hpa_x100"}
    rows = CsvReplay.from_config(air.replay, air.replay_columns()).rows
    # the row with an empty humidity cell is skipped, never invented
    assert [(r.temperature_c, r.humidity_rh, r.pressure_pa) for r in rows] == [(31.5, 60.25, 100900.0),
                                                                                (32.0, 59.5, 101100.0)]
    climate = next(s for s in cfg.sensors if s.name == "hive_climate")
    assert climate.replay_columns() == {"temperature_c": "celsius", "humidity_rh": "rh"}   # no pressure read
    assert CsvReplay.from_config(climate.replay, climate.replay_columns()).rows[0].get("pressure_pa") is None


def test_a_replay_without_columns_reads_the_urban_defaults(tmp_path: Path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21))
    frames = next(s for s in cfg.sensors if s.type == "ds18b20")
    assert frames.replay_columns() == {"temperature_c": "temperature"}        # a DS18B20 reads no humidity
    air = next(s for s in cfg.sensors if s.type == "bme280")
    assert air.replay_columns() == {"temperature_c": "temperature", "humidity_rh": "humidity"}
