"""Config loading: a valid TOML/INI config loads, and every bad config exits 78 with ONE stderr line
that names the file and the offending key (``beemond check-config``, run as a real subprocess)."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from beemond import config
from beemond.bundle import crypto
from beemond.sensors.audio.section import AudioConfig
from beemond.sensors.sht3x.section import SHT3xConfig

URBAN = Path(__file__).resolve().parents[1] / "data/urban-2021/hive_temperature_humidity_2021.csv"


def run_check(path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_config_error(r: subprocess.CompletedProcess, path: Path, key: str | None) -> str:
    """Exit 78, exactly one line on stderr (no traceback), naming the file and (if given) the key."""
    assert r.returncode == config.EX_CONFIG, f"exit {r.returncode}; stderr:\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), f"expected one stderr line, got:\n{r.stderr}"
    line = lines[0]
    assert "Traceback" not in line
    assert str(path) in line, f"file {path} not named in: {line}"
    if key is not None:
        assert key in line, f"key {key!r} not named in: {line}"
    assert r.stdout == "", f"nothing should go to stdout on error, got:\n{r.stdout}"
    return line


# ------------------------------------------------------------------------------------------ fixtures

@dataclasses.dataclass
class Env:
    dir: Path
    tree: dict          # a valid config as a TOML tree (deep-copy before mutating)

    def write(self, tree_or_text, name: str = "beemond.toml") -> Path:
        path = self.dir / name
        if isinstance(tree_or_text, (str, bytes)):
            data = tree_or_text.encode() if isinstance(tree_or_text, str) else tree_or_text
            path.write_bytes(data)
        else:
            path.write_text(tomli_w.dumps(tree_or_text))
        return path


def base_tree(replay_file: str | Path = URBAN) -> dict:
    """A valid config; relative paths (spool, keys, password) are relative to the config file."""
    return {
        "daemon": {"host": "test-hive", "spool_dir": "spool", "log_level": "info",
                   "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 10.0},
        "archive": {"filename_template": "{{ sensor }}_{{ start }}_{{ end }}.{{ ext }}"},
        "sensors": {
            "hive_climate": {
                "type": "sht3x", "backend": "simulated", "bus": 1, "address": 0x44,
                "repeatability": "high", "interval_s": 0.5, "record_window_s": 10.0,
                "replay": {"file": str(replay_file), "time_column": "Date",
                           "temperature_column": "temperature", "humidity_column": "humidity",
                           "filter_column": "Tag number", "filter_value": "3629",
                           "start": "2021-06-19T00:00:00Z", "speedup": 0.0},
            },
            "hive_audio": {"type": "audio", "backend": "simulated", "sample_rate_hz": 16000,
                           "channels": 1, "segment_s": 10.0, "format": "flac", "tone_hz": 250.0},
        },
        "bundle": {"max_duration_s": 15.0, "max_bytes": 20_000_000, "recipients": ["keys/recipient.txt"]},
        "upload": {"protocol": "ftp", "host": "127.0.0.1", "port": 2121, "user": "beemond",
                   "password_file": "ftp-password", "layout": "{{ host }}/{{ date }}/{{ name }}",
                   "backoff_initial_s": 1.0, "backoff_max_s": 10.0, "shutdown_grace_s": 15.0},
    }


@pytest.fixture
def env(tmp_path: Path) -> Env:
    assert URBAN.is_file(), f"test data missing: {URBAN} (clone shared/ beside the project)"
    crypto.keygen(tmp_path / "keys")
    (tmp_path / "ftp-password").write_text("s3cret\n")
    return Env(tmp_path, base_tree())


# ------------------------------------------------------------------------------------------ valid

def test_valid_toml_exits_0(env: Env):
    path = env.write(env.tree)
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.startswith(f"config {path}: ok")
    assert "sensor hive_climate: sht3x (simulated)" in r.stdout
    assert "sensor hive_audio: audio (simulated)" in r.stdout
    assert "s3cret" not in r.stdout  # secrets never shown


def test_an_old_replay_table_naming_a_column_the_sensor_does_not_read_still_loads(env: Env):
    """Before the column-generic replay every ``[replay]`` table had all three *_column keys, and a
    sensor read only its own: a DS18B20 table copied from an SHT3x's (``humidity_column``), an SHT3x
    with a ``pressure_column``. Such a config loaded then and must load now."""
    tree = copy.deepcopy(env.tree)
    tree["sensors"]["hive_climate"]["replay"]["pressure_column"] = "humidity"
    tree["sensors"]["hive_frames"] = {
        "type": "ds18b20", "backend": "simulated", "probes": {"brood": "28-0316a2794eff"},
        "replay": {**tree["sensors"]["hive_climate"]["replay"], "pressure_column": ""}}
    r = run_check(env.write(tree))
    assert r.returncode == 0, r.stderr
    assert "sensor hive_frames: ds18b20 (simulated)" in r.stdout
    cfg = config.load(env.dir / "beemond.toml")
    climate, frames = (s for s in cfg.sensors if s.name in ("hive_climate", "hive_frames"))
    assert climate.replay_columns() == {"temperature_c": "temperature", "humidity_rh": "humidity"}
    assert frames.replay_columns() == {"temperature_c": "temperature"}


def test_valid_toml_typed_values_and_relative_paths(env: Env, monkeypatch):
    tree = copy.deepcopy(env.tree)
    tree["sensors"]["hive_climate"]["replay"]["file"] = os.path.relpath(URBAN, env.dir.resolve())
    path = env.write(tree)
    elsewhere = env.dir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths follow the file, not the working directory
    cfg = config.load(path)
    base = env.dir.resolve()
    assert cfg.source == path.resolve()
    assert cfg.daemon.spool_dir == base / "spool"
    assert cfg.spool == base / "spool"
    assert cfg.upload.password_file == base / "ftp-password"
    assert cfg.upload.password() == "s3cret"
    climate, audio = cfg.sensors
    assert isinstance(climate, SHT3xConfig) and isinstance(audio, AudioConfig)
    assert climate.replay.file == URBAN
    assert climate.address == 0x44 and isinstance(climate.address, int)
    assert climate.interval_s == 0.5 and climate.record_window_s == 10.0
    assert climate.replay.filter_value == "3629"
    assert audio.sample_rate_hz == 16000 and audio.format == "flac"
    assert cfg.bundle.recipients == ("keys/recipient.txt",)
    assert cfg.daemon.heartbeat_interval_s == 1.0 and isinstance(cfg.daemon.heartbeat_interval_s, float)
    # and the CLI agrees, run from another directory
    r = run_check(path, cwd=elsewhere)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------ bad TOML

def _set(*keys_and_value):
    """A mutation setting tree[k1][k2]...[kn] = value."""
    *keys, value = keys_and_value

    def mutate(tree, d):
        node = tree
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value(d) if callable(value) else value
        return tree
    return mutate


def _del(*keys):
    def mutate(tree, d):
        node = tree
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        return tree
    return mutate


def _with_file(name: str, content: str | None, mode: int | None = None):
    """A helper producing a file (or a directory if content is None) in the tmp dir, returning its name."""
    def make(d: Path) -> str:
        p = d / name
        if content is None:
            p.mkdir()
        else:
            p.write_text(content)
            if mode is not None:
                p.chmod(mode)
        return name
    return make


def _both(first, second):
    return lambda tree, d: second(first(tree, d), d)


def _recipients_file(name: str, content: str, mode: int | None = None):
    return _set("bundle", "recipients", lambda d: [_with_file(name, content, mode)(d)])


def _rename_sensor(old: str, new: str):
    def mutate(tree, d):
        tree["sensors"][new] = tree["sensors"].pop(old)
        return tree
    return mutate


def _disable_all_sensors(tree, d):
    for sensor in tree["sensors"].values():
        sensor["enabled"] = False
    return tree


def _replay(key, value):
    return _set("sensors", "hive_climate", "replay", key, value)


def _climate(key, value):
    return _set("sensors", "hive_climate", key, value)


ROOT_SKIP = pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
CLIMATE = "sensors.hive_climate"

BAD = [
    # (id, mutation, key expected in the message[, marks])
    ("unknown-key-in-daemon", _set("daemon", "colour", "blue"), "daemon.colour"),
    ("unknown-key-in-sensor", _climate("intervall_s", 1.0), f"{CLIMATE}.intervall_s"),
    ("unknown-key-in-replay", _replay("colum", "x"), f"{CLIMATE}.replay.colum"),
    ("unknown-section", _set("logging", {"level": "debug"}), "logging"),
    ("section-not-a-table", _set("daemon", "fast"), "daemon"),
    ("unknown-sensor-type", _climate("type", "bme680"), f"{CLIMATE}.type"),
    ("missing-sensor-type", _del("sensors", "hive_climate", "type"), f"{CLIMATE}.type"),
    ("bad-sensor-name", _rename_sensor("hive_climate", "hive climate"), "sensors.hive climate"),
    ("string-for-number", _climate("interval_s", "fast"), f"{CLIMATE}.interval_s"),
    ("bool-for-number", _climate("interval_s", True), f"{CLIMATE}.interval_s"),
    ("float-for-integer", _set("upload", "port", 21.5), "upload.port"),
    ("string-for-bool", _set("sensors", "hive_audio", "enabled", "yes"), "sensors.hive_audio.enabled"),
    ("string-for-list", _set("bundle", "recipients", "keys/recipient.txt"), "bundle.recipients"),
    ("negative-interval", _climate("interval_s", -1.0), f"{CLIMATE}.interval_s"),
    ("address-0x50", _climate("address", 0x50), f"{CLIMATE}.address"),
    ("port-out-of-range", _set("upload", "port", 70000), "upload.port"),
    ("invalid-choice-mp3", _set("sensors", "hive_audio", "format", "mp3"), "sensors.hive_audio.format"),
    ("invalid-log-level", _set("daemon", "log_level", "verbose"), "daemon.log_level"),
    ("bad-host-name", _set("daemon", "host", "bad host!"), "daemon.host"),
    ("heartbeat-timeout-not-above-interval", _set("daemon", "heartbeat_timeout_s", 1.0), "daemon.heartbeat_timeout_s"),
    ("record-window-below-interval", _climate("record_window_s", 0.2), f"{CLIMATE}.record_window_s"),
    ("audio-block-not-below-segment",
     _both(_set("sensors", "hive_audio", "segment_s", 1.0), _set("sensors", "hive_audio", "block_s", 2.0)),
     "sensors.hive_audio.block_s"),
    ("no-sensors", _del("sensors"), "sensors"),
    ("all-sensors-disabled", _disable_all_sensors, "sensors"),
    ("empty-recipients", _set("bundle", "recipients", []), "bundle.recipients"),
    ("missing-recipients", _del("bundle", "recipients"), "bundle.recipients"),
    ("recipient-not-an-age-key", _set("bundle", "recipients", ["age1notakeyatall"]), "bundle.recipients[0]"),
    ("recipient-bad-ssh-key", _set("bundle", "recipients", ["ssh-ed25519 AAAAnotbase64!!"]), "bundle.recipients[0]"),
    ("recipients-file-of-garbage", _recipients_file("junk.txt", "hello world\n"),
     "bundle.recipients[0]"),
    ("recipients-file-only-comments", _recipients_file("empty.txt", "# nothing\n\n"),
     "bundle.recipients[0]"),
    ("recipients-file-missing", _set("bundle", "recipients", ["keys/recipient.txt", "keys/nope.txt"]),
     "bundle.recipients[1]"),
    ("recipients-file-is-a-directory", _set("bundle", "recipients", ["keys"]), "bundle.recipients[0]"),
    ("recipients-file-mode-000", _recipients_file("locked.txt", "# x\n", 0), "bundle.recipients[0]", ROOT_SKIP),
    ("replay-file-missing", _replay("file", "no-such.csv"), f"{CLIMATE}.replay.file"),
    ("replay-file-is-a-directory", _replay("file", _with_file("adir", None)), f"{CLIMATE}.replay.file"),
    ("replay-file-mode-000", _replay("file", _with_file("locked.csv", "Date,temperature,humidity\n", 0)),
     f"{CLIMATE}.replay.file", ROOT_SKIP),
    ("replay-column-missing", _replay("temperature_column", "temp"), f"{CLIMATE}.replay"),
    ("replay-filter-column-missing", _replay("filter_column", "Tag"), f"{CLIMATE}.replay"),
    ("replay-filter-matches-nothing", _replay("filter_value", "9999"), f"{CLIMATE}.replay"),
    ("replay-start-after-last-row", _replay("start", "2030-01-01T00:00:00Z"), f"{CLIMATE}.replay"),
    ("replay-start-not-a-time", _replay("start", "yesterday"), f"{CLIMATE}.replay"),
    ("replay-table-missing", _del("sensors", "hive_climate", "replay"), f"{CLIMATE}.replay"),
    ("replay-columns-unknown-quantity", _replay("columns", {"co2_ppm": "co2"}), f"{CLIMATE}.replay.columns.co2_ppm"),
    ("replay-column-named-twice", _replay("columns", {"temperature_c": "temperature"}),
     f"{CLIMATE}.replay.temperature_column"),
    ("replay-columns-column-missing", _both(_replay("humidity_column", ""), _replay("columns", {"humidity_rh": "rh"})),
     f"{CLIMATE}.replay.columns.humidity_rh"),
    ("replay-columns-not-strings", _replay("columns", {"temperature_c": 5}), f"{CLIMATE}.replay.columns"),
    ("replay-on-hardware-backend", _climate("backend", "hardware"), f"{CLIMATE}.replay"),
    ("template-syntax-error", _set("archive", "filename_template", "{{ sensor }_{{ start }}"), "archive.filename_template"),
    ("template-bad-block", _set("archive", "filename_template", "{% for %}{{ sensor }}"), "archive.filename_template"),
    ("template-undefined-variable", _set("archive", "filename_template", "{{ sensr }}_{{ start }}.csv"),
     "archive.filename_template"),
    ("template-escapes-staging", _set("archive", "filename_template", "../{{ sensor }}"), "archive.filename_template"),
    ("template-escapes-deeper", _set("archive", "filename_template", "a/../../{{ sensor }}.csv"),
     "archive.filename_template"),
    ("template-absolute", _set("archive", "filename_template", "/tmp/{{ sensor }}.csv"), "archive.filename_template"),
    ("template-sandbox-escape", _set("archive", "filename_template", "{{ ''.__class__ }}.csv"),
     "archive.filename_template"),
    ("sensor-template-hidden", _climate("filename_template", ".{{ sensor }}.csv"), f"{CLIMATE}.filename_template"),
    ("sensor-template-sidecar-name", _climate("filename_template", "{{ sensor }}.meta.json"),
     f"{CLIMATE}.filename_template"),
    ("layout-escapes", _set("upload", "layout", "{{ host }}/../../{{ name }}"), "upload.layout"),
    ("layout-syntax-error", _set("upload", "layout", "{{ host }/{{ name }}"), "upload.layout"),
    ("layout-undefined-variable", _set("upload", "layout", "{{ hots }}/{{ name }}"), "upload.layout"),
    ("password-file-missing", _set("upload", "password_file", "nope"), "upload.password_file"),
    ("password-file-and-credential", _set("upload", "password_credential", "ftp"), "upload.password_credential"),
    ("upload-backoff-max-below-initial", _set("upload", "backoff_max_s", 0.5), "upload.backoff_max_s"),
]


@pytest.mark.parametrize("mutate,key", [pytest.param(m, k, id=i, marks=marks) for i, m, k, *marks in BAD])
def test_bad_config_exits_78_naming_the_key(env: Env, mutate, key):
    tree = mutate(copy.deepcopy(env.tree), env.dir)
    path = env.write(tree)
    # the in-process loader agrees with the CLI
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert key in info.value.key, info.value
    assert_config_error(run_check(path), path, key)


def test_toml_syntax_error_names_the_file(env: Env):
    path = env.write(tomli_w.dumps(env.tree) + "\n[daemon\nhost = 'x'\n")
    line = assert_config_error(run_check(path), path, None)
    assert "TOML" in line


def test_toml_not_utf8_names_the_file(env: Env):
    path = env.write(b'[daemon]\nhost = "\xff\xfe"\n')
    assert_config_error(run_check(path), path, None)


def test_missing_config_file_names_the_file(tmp_path: Path):
    path = tmp_path / "nope" / "beemond.toml"
    line = assert_config_error(run_check(path), path, None)
    assert "cannot read" in line


def test_config_file_is_a_directory(tmp_path: Path):
    path = tmp_path / "beemond.toml"
    path.mkdir()
    assert_config_error(run_check(path), path, None)


# ------------------------------------------------------------------------------------------ bugs

def test_nan_number_is_rejected(env: Env):
    tree = _climate("interval_s", float("nan"))(copy.deepcopy(env.tree), env.dir)
    path = env.write(tree)
    assert_config_error(run_check(path), path, f"{CLIMATE}.interval_s")


@pytest.mark.parametrize("value", [["sht3x"], {"name": "sht3x"}], ids=["array", "table"])
def test_unhashable_sensor_type_exits_78(env: Env, value):
    tree = _climate("type", value)(copy.deepcopy(env.tree), env.dir)
    path = env.write(tree)
    assert_config_error(run_check(path), path, f"{CLIMATE}.type")


def test_missing_replay_column_names_the_column_key(env: Env):
    tree = _replay("temperature_column", "temp")(copy.deepcopy(env.tree), env.dir)
    path = env.write(tree)
    assert_config_error(run_check(path), path, f"{CLIMATE}.replay.temperature_column")


# ------------------------------------------------------------------------------------------ INI

INI = """\
# the same config as base_tree(), in the legacy INI dialect
[daemon]
host = test-hive
spool_dir = spool
log_level = info
heartbeat_interval_s = 1
heartbeat_timeout_s = 10

[archive]
filename_template = {{{{ sensor }}}}_{{{{ start }}}}_{{{{ end }}}}.{{{{ ext }}}}

[sensor.hive_climate]
type = sht3x
backend = simulated
bus = 1
address = 0x44
repeatability = high
interval_s = 0.5          ; one replayed row per measurement
record_window_s = 10

[sensor.hive_climate.replay]
file = {replay}
time_column = Date
temperature_column = temperature
humidity_column = humidity
filter_column = Tag number
filter_value = 3629
start = 2021-06-19T00:00:00Z
speedup = 0

[sensor.hive_audio]
type = audio
backend = simulated
sample_rate_hz = 16000
channels = 1
segment_s = 10
format = flac
tone_hz = 250

[bundle]
max_duration_s = 15
max_bytes = 20000000
recipients = keys/recipient.txt

[upload]
protocol = ftp
host = 127.0.0.1
port = 2121
user = beemond
password_file = ftp-password
layout = {{{{ host }}}}/{{{{ date }}}}/{{{{ name }}}}
backoff_initial_s = 1
backoff_max_s = 10
shutdown_grace_s = 15
"""


def test_ini_loads_to_the_same_values_as_toml(env: Env):
    toml_cfg = config.load(env.write(env.tree))
    ini_path = env.write(INI.format(replay=URBAN), name="beemon-config.ini")
    ini_cfg = config.load(ini_path)
    assert ini_cfg.source == ini_path.resolve()
    compared = [f.name for f in dataclasses.fields(config.Config) if f.name != "source"]
    assert compared == ["daemon", "archive", "bundle", "upload", "sensors", "metrics", "processors", "telemetry"]
    for name in compared:
        assert getattr(ini_cfg, name) == getattr(toml_cfg, name), name
    # equality of the dataclasses also implies equal types (0x44 -> int, "1" -> float, ...)
    climate = ini_cfg.sensors[0]
    assert type(climate.address) is int and type(climate.interval_s) is float
    assert type(climate.replay.speedup) is float and climate.replay.loop is True
    r = run_check(ini_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("old,new,key", [
    ("interval_s = 0.5 ", "interval_s = fast ", f"{CLIMATE}.interval_s"),
    ("address = 0x44", "address = 0x50", f"{CLIMATE}.address"),
    ("port = 2121", "port = twenty", "upload.port"),
    ("format = flac", "format = mp3", "sensors.hive_audio.format"),
    ("channels = 1", "channels = 1\nenabled = maybe", "sensors.hive_audio.enabled"),
    ("[archive]", "[archive]\ncolour = blue", "archive.colour"),
], ids=["number", "range", "integer", "choice", "bool", "unknown-key"])
def test_bad_ini_value_exits_78_naming_the_key(env: Env, old, new, key):
    text = INI.format(replay=URBAN)
    assert old in text
    path = env.write(text.replace(old, new, 1), name="beemon-config.ini")
    assert_config_error(run_check(path), path, key)


def test_ini_syntax_error_names_the_file(env: Env):
    path = env.write("host = no-section-header\n" + INI.format(replay=URBAN), name="beemon-config.ini")
    line = assert_config_error(run_check(path), path, None)
    assert "INI" in line
