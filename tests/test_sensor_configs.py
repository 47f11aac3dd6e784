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
    tree = tomllib.loads(uncomment_sensor_tables((ROOT / "config" / "beemond.toml").read_text()))
    # Only the sensors are under test: the rest points at /etc and a lab server that are not here.
    tree["daemon"]["spool_dir"] = str(tmp_path / "spool")
    tree["bundle"] = {"recipients": [str(keys["recipient"])]}
    tree["upload"] = {"protocol": "none"}
    path = tmp_path / "beemond.toml"
    path.write_text(tomli_w.dumps(tree))
    cfg = config.load(path)
    assert {s.type for s in cfg.sensors} == set(registry.SENSORS)
    assert all(s.backend == "hardware" for s in cfg.sensors)
    cam = next(s for s in cfg.sensors if s.type == "camera")
    assert cam.daylight_only and (cam.latitude, cam.longitude) == (50.63, 3.06)


def test_simulated_toml_runs_every_sensor_type_simulated(tmp_path: Path, keys, password_file):
    cfg = config.load(make_config(tmp_path, keys, password_file, 21))
    assert {s.type for s in cfg.sensors} == set(registry.SENSORS)
    assert all(s.backend == "simulated" and s.enabled for s in cfg.sensors)
