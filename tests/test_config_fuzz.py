"""A fuzz set of malformed configs (issue 13, "bad input, closed for good"): every one must make
``beemond check-config`` exit 78 with one stderr line naming the file (and, where the mutation has
one, the key), nothing on stdout, never a traceback.

The cases are mutations of two small valid configs (a TOML one with every sensor type, a processor
of each kind and an upload; an INI one in the legacy form of config/beemon-config.ini) and of the
shipped examples, from a seed list: wrong types, unknown keys and sections, out-of-range and huge
numbers, non-finite numbers, bad and runaway name templates, an upload layout reading record
metadata, duplicate names, names a path cannot hold, truncated files, bad UTF-8, NUL bytes, deep
nesting, INI sections that shadow keys. Each runs in-process through ``beemond.cli.main`` (an
uncaught exception fails the test: that would be the traceback); a few run as real subprocesses.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from beemond import cli, config
from beemond.core import names
from conftest import set_dotted

ROOT = Path(__file__).resolve().parents[1]
# An age recipient whose identity nobody keeps (as in config/simulated.toml): parses, seals to no one.
RECIPIENT = "age1fv46ddmd28x6qqd0ph7xq7clhl37dpflzgc04758cjc6lmhvpdwq7rkpq9"

BASE = {
    "daemon": {"host": "fuzz-hive", "spool_dir": "SPOOL", "heartbeat_interval_s": 5, "heartbeat_timeout_s": 60},
    "archive": {"filename_template": "{{ sensor }}_{{ start }}_{{ end }}.{{ ext }}",
                "default_metadata": {"apiary": "urban", "hive": 3629}},
    "sensors": {
        "climate": {"type": "sht3x", "bus": 1, "address": 0x44, "interval_s": 60, "record_window_s": 600},
        "air": {"type": "bme280", "address": 0x76, "pressure_oversampling": 4},
        "frames": {"type": "ds18b20", "probes": {"brood": "28-0316a2794eff", "top": "28-00000a1b2c3d"}},
        "scale": {"type": "scale", "temperature_sensor": "climate", "compensation_kg_per_c": 0.005},
        "mic": {"type": "audio", "sample_rate_hz": 48000, "segment_s": 60},
        "cam": {"type": "camera", "still_interval_s": 60},
        "button": {"type": "gpio", "status_led_pin": 22,
                   "inputs": {"entrance": {"pin": 17, "kind": "button", "targets": ["cam"]}}},
    },
    "processors": {"bands": {"type": "audio_bands", "sensor": "mic", "bands": ["100-300", "300-600"]},
                   "swarm": {"type": "swarm", "sensor": "scale"}},
    "bundle": {"max_duration_s": 300, "recipients": [RECIPIENT]},
    "upload": {"protocol": "ftp", "host": "127.0.0.1", "user": "beemond",
               "layout": "{{ host }}/{{ date }}/{{ sensor }}/{{ name }}"},
    "metrics": {"address": "127.0.0.1", "port": 9109},
}

INI_BASE = """\
[daemon]
host = fuzz-hive
spool_dir = SPOOL

[archive]
filename_template = {{ sensor }}_{{ start }}_{{ end }}.{{ ext }}

[sensor.climate]
type = sht3x
bus = 1
address = 0x44
interval_s = 60
record_window_s = 600

[sensor.mic]
type = audio
device = USB
sample_rate_hz = 48000

[bundle]
recipients = RECIPIENT

[upload]
protocol = ftp
host = 127.0.0.1
user = hive07
layout = {{ host }}/{{ date }}/{{ name }}
"""


def _set(tree: dict, dotted: str, value) -> dict:
    """A copy of *tree* with one key set (None: removed)."""
    tree = copy.deepcopy(tree)
    set_dotted(tree, dotted, value)
    return tree


# (dotted key, bad value): wrong types
WRONG_TYPES = [
    ("daemon.heartbeat_interval_s", "fast"), ("daemon.heartbeat_interval_s", [5]), ("daemon.host", 42),
    ("daemon.spool_dir", 7), ("daemon.spool_dir", ""), ("daemon.drop_oldest_when_full", "yes"),
    ("daemon.crash_loop_limit", 2.5), ("daemon.log_level", "loud"), ("archive.filename_template", ["a"]),
    ("archive.default_metadata", "apiary"), ("archive.default_metadata.site", [1, 2]),
    ("sensors.climate.bus", "one"), ("sensors.climate.address", "0x44"), ("sensors.climate.backend", "virtual"),
    ("sensors.climate.enabled", 1), ("sensors.climate.replay", "file.csv"), ("sensors.frames.probes", ["28-0316a2794eff"]),
    ("sensors.frames.probes.brood", 28), ("sensors.scale.parity", "X"), ("sensors.mic.channels", True),
    ("sensors.mic.format", "mp3"), ("sensors.cam.format", "png"), ("sensors.button.inputs", {"entrance": 17}),
    ("sensors.button.inputs.entrance.targets", "cam"), ("sensors.button.inputs.entrance.kind", "lever"),
    ("bundle.recipients", RECIPIENT), ("bundle.recipients", [1]), ("bundle.split_by_sensor", "no"),
    ("upload.protocol", "http"), ("upload.port", "21"), ("upload.windows", {"mic": 5}),
    ("metrics.enabled", "on"), ("metrics.port", 9109.5), ("processors.bands.bands", "100-300"),
    ("processors.swarm.drop_kg", "1kg"),
]

# unknown keys and sections, and keys that moved
UNKNOWN = [
    ("daemon.spool", "/tmp"), ("archive.template", "x"), ("sensors.climate.intervall_s", 60),
    ("sensors.mic.samplerate", 44100), ("bundle.recipient", RECIPIENT), ("upload.password", "hunter2"),
    ("metrics.bind", "127.0.0.1"), ("upload.min_free_bytes", 1), ("logging.level", "info"), ("sensor.x.type", "sht3x"),
    ("processors.bands.window", 10), ("sensors.button.inputs.entrance.pull", True),
]

# out of range, non-finite and huge numbers
OUT_OF_RANGE = [
    ("daemon.heartbeat_interval_s", 0), ("daemon.heartbeat_interval_s", -1), ("daemon.heartbeat_timeout_s", 1),
    ("daemon.spool_max_bytes", -5), ("daemon.spool_max_bytes", 2**62), ("daemon.crash_loop_limit", 10**30),
    ("daemon.restart_backoff_initial_s", float("inf")), ("daemon.restart_backoff_max_s", float("nan")),
    ("daemon.restart_backoff_max_s", 0.5), ("sensors.climate.address", 0x40), ("sensors.climate.bus", 256),
    ("sensors.climate.interval_s", 1e308), ("sensors.climate.record_window_s", 1),
    ("sensors.air.pressure_oversampling", 3), ("sensors.air.pressure_pa", -1e9), ("sensors.scale.stopbits", 1.2),
    ("sensors.scale.max_kg", -10), ("sensors.mic.sample_rate_hz", 2**64), ("sensors.mic.block_s", 100),
    ("sensors.cam.width", 641), ("sensors.cam.jpeg_quality", 0), ("sensors.button.inputs.entrance.pin", 40),
    ("sensors.button.status_led_pin", 17), ("upload.port", 70000), ("upload.backoff_max_s", 0.01),
    ("metrics.port", 0), ("bundle.max_bytes", 10), ("processors.bands.bands", ["600-100"]),
    ("processors.bands.bands", ["100-30000"]), ("processors.swarm.smoothing", 10**100),
]

# name templates and the upload layout: fail at render, or run away
TEMPLATES = [
    "{{ 1 / 0 }}", "{{ 10 // (start|length - start|length) }}", "{{ sensor + 1 }}", "{{ nope }}",
    "{% for i in range(10**9) %}x{% endfor %}", "{{ 'x' * 10**9 }}", "{{ 9 ** 99999 }}", "{{ 'x'|center(10**9) }}",
    "{{ '%0999999999d' % 1 }}", "{{ '{:>999999999}'.format(1) }}", "{% include 'other.j2' %}",
    "{% extends 'base' %}", "{% import 'm' as m %}{{ sensor }}", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% macro m(n) %}{% if n %}{{ m(n-1) }}{{ m(n-1) }}{% endif %}{% endmacro %}{{ m(60) }}",
    "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}x", "{{ sensor", "{% if %}",
    "../{{ name }}", "/abs/{{ sensor }}", "{{ sensor }}/.hidden", "", "   ", "{{ sensor }}.meta.json",
    "{% for i in range(5000) %}ab{% endfor %}", "{{ sensor.__class__ }}", "{{ metadata.hive / 0 }}",
    "{{ metadata.apiary + 1 }}", "{{ '{' * 3000 }}", "x" * 3000,
]
LAYOUTS = ["{{ metadata.hive }}/{{ name }}", "{{ host }}/{{ metadata['site'] }}/{{ name }}", "{{ name|int(1/0) }}",
           "{{ record }}/{{ name }}"]

NAMES = [  # duplicate and unusable names
    ("processors.climate", {"type": "swarm", "sensor": "scale"}), ("processors.uploader", {"type": "swarm", "sensor": "scale"}),
    ("sensors.hive climate", {"type": "sht3x"}), ("sensors.hïve", {"type": "sht3x"}), ("sensors." + "a" * 80, {"type": "sht3x"}),
    ("sensors.-x", {"type": "sht3x"}), ("sensors.cam2", {"type": "camera", "power_pin": 17}),
    ("sensors.frames.probes.top", "28-0316a2794eff"), ("processors.bands.sensor", "nowhere"),
    ("sensors.scale.temperature_sensor", "scale"), ("sensors.scale.temperature_sensor", "mic"),
    ("sensors.button.inputs.entrance.targets", ["ghost"]), ("daemon.host", "hive/07"), ("daemon.host", "x" * 100),
    ("upload.windows.mic", "25:00-26:00"), ("sensors.nothing", {"backend": "simulated"}),
]

SEMANTIC = [  # rules that need the whole file or the machine
    ("metrics.address", "localhost"), ("metrics.address", "999.1.1.1"), ("metrics.address", ""),
    ("metrics.address", "eth0"), ("metrics.address", "127.0.0.1:9109"),
    ("daemon.spool_dir", "/proc/beemond/spool"), ("daemon.spool_dir", "/sys/beemond"),
    ("daemon.spool_dir", "/proc"), ("bundle.recipients", ["age1notakey"]), ("bundle.recipients", []),
    ("bundle.recipients", ["/nonexistent/recipients.txt"]), ("upload.password_file", "/nonexistent/pw"),
    ("upload.protocol", "sftp"), ("upload.ca_file", "/etc/hostname"),
    ("sensors.mic.window_start", "8am"), ("sensors.mic.timezone", "Mars/Olympus"),
    ("sensors.scale.line_regex", "(unclosed"), ("sensors.scale.line_regex", "\\d+"),
    ("sensors.cam.daylight_only", True),
]


def _cases(tmp: Path) -> list[tuple[str, bytes, str, str | None]]:
    """(id, file suffix, content, the key the error line must name or None)."""
    spool = str(tmp / "spool")
    base = _set(BASE, "daemon.spool_dir", spool)
    out = []

    def toml(cid, tree, key):
        out.append((cid, ".toml", tomli_w.dumps(tree).encode(), key))

    for i, (k, v) in enumerate(WRONG_TYPES):
        # a value inside a table of strings is reported as the table
        toml(f"type-{i}-{k}", _set(base, k, v), k.removesuffix(".brood").removesuffix(".site"))
    for i, (k, v) in enumerate(UNKNOWN):
        toml(f"unknown-{i}-{k}", _set(base, k, v), k.split(".")[0] if k.startswith(("logging", "sensor.")) else k)
    for i, (k, v) in enumerate(OUT_OF_RANGE):
        expect = {"daemon.heartbeat_timeout_s": "daemon.heartbeat_timeout_s",
                  "sensors.climate.record_window_s": "sensors.climate.record_window_s",
                  "sensors.button.status_led_pin": "sensors.button"}.get(k, k)
        toml(f"range-{i}-{k}", _set(base, k, v), expect)
    for i, text in enumerate(TEMPLATES):
        toml(f"template-{i}", _set(base, "archive.filename_template", text), "archive.filename_template")
    for i, text in enumerate(TEMPLATES[:8]):
        toml(f"sensor-template-{i}", _set(base, "sensors.mic.filename_template", text), "sensors.mic.filename_template")
        toml(f"processor-template-{i}", _set(base, "processors.swarm.filename_template", text),
             "processors.swarm.filename_template")
    for i, text in enumerate([*LAYOUTS, *TEMPLATES[:6]]):
        toml(f"layout-{i}", _set(base, "upload.layout", text), "upload.layout")
    for i, (k, v) in enumerate(NAMES):
        toml(f"name-{i}", _set(base, k, v), None)
    for i, (k, v) in enumerate(SEMANTIC):
        toml(f"semantic-{i}-{k}", _set(base, k, v), None)
    a_file = tmp / "a-file"
    a_file.write_text("not a directory\n")
    toml("spool-is-a-file", _set(base, "daemon.spool_dir", str(a_file)), "daemon.spool_dir")
    toml("spool-below-a-file", _set(base, "daemon.spool_dir", str(a_file / "spool")), "daemon.spool_dir")
    for section in ("daemon", "sensors", "processors", "bundle"):
        toml(f"scalar-{section}", {**base, section: 5}, section)
    toml("no-sensors", {k: v for k, v in base.items() if k != "sensors"}, "sensors")
    toml("no-type", _set(base, "sensors.climate.type", None), "sensors.climate.type")

    text = tomli_w.dumps(base)
    for i, key in enumerate(("host =", "address =", "recipients =", "layout =", "bands =")):
        cut = text.index(key) + len(key)
        out.append((f"truncated-{i}", ".toml", text[:cut].encode(), None))
    out.append(("truncated-mid-table", ".toml", text[:text.index("[sensors.air]") + 6].encode(), None))
    raw = text.encode()
    out.append(("bad-utf8", ".toml", raw.replace(b"fuzz-hive", b"fuzz-\xff\xfehive"), None))
    out.append(("latin1-file", ".toml", raw.replace(b"fuzz-hive", "fuzz-hïve".encode("latin-1")), None))
    out.append(("nul-byte", ".toml", raw.replace(b"fuzz-hive", b"fuzz\x00hive"), None))
    out.append(("utf16", ".toml", text.encode("utf-16"), None))
    out.append(("duplicate-key", ".toml", raw.replace(b'host = "fuzz-hive"', b'host = "a"\nhost = "b"'), None))
    out.append(("duplicate-table", ".toml", raw + b"\n[daemon]\nlog_level = \"info\"\n", None))
    out.append(("deep-array", ".toml", raw + b"\n[x]\ny = " + b"[" * 5000 + b"]" * 5000 + b"\n", None))
    out.append(("deep-inline-table", ".toml", b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000 + b"\n" + raw, None))
    out.append(("binary", ".toml", bytes(range(256)) * 4, None))
    out.append(("empty", ".toml", b"", "sensors"))
    out.append(("huge-int-literal", ".toml", raw.replace(b"port = 9109", b"port = " + b"9" * 5000), None))
    out.append(("long-line", ".toml", raw + b"\n# " + b"x" * 200_000 + b"\n[y]\n", "y"))

    ini = INI_BASE.replace("SPOOL", spool).replace("RECIPIENT", RECIPIENT)

    def ini_case(cid, content, key):
        out.append((cid, ".ini", content.encode() if isinstance(content, str) else content, key))

    ini_case("ini-shadow", ini.replace("type = sht3x\n", "type = sht3x\nreplay = x.csv\n")
             + "\n[sensor.climate.replay]\nfile = x.csv\n", "sensors.climate.replay")
    ini_case("ini-shadow-reversed", "[sensor.climate.replay]\nfile = x.csv\n\n" +
             ini.replace("type = sht3x\n", "type = sht3x\nreplay = x.csv\n"), "sensors.climate.replay")
    ini_case("ini-shadow-section", ini + "\n[sensor]\nclimate = 1\n", "sensors.climate")
    ini_case("ini-same-table-twice", ini + "\n[sensors.climate]\nbus = 2\n", "sensors.climate")
    ini_case("ini-shadow-inputs", ini + "\n[sensor.b]\ntype = gpio\ninputs = x\n[sensor.b.inputs.door]\npin = 5\n",
             "sensors.b.inputs")
    ini_case("ini-duplicate-section", ini + "\n[daemon]\nlog_level = info\n", None)
    ini_case("ini-duplicate-option", ini.replace("bus = 1\n", "bus = 1\nbus = 2\n"), None)
    ini_case("ini-no-header", "host = x\n" + ini, None)
    ini_case("ini-bad-bool", ini.replace("[upload]\n", "[upload]\nkeep_uploaded_bytes = 0\n").replace(
        "[sensor.mic]\n", "[sensor.mic]\nenabled = maybe\n"), "sensors.mic.enabled")
    ini_case("ini-bad-int", ini.replace("address = 0x44", "address = 0x"), "sensors.climate.address")
    ini_case("ini-float-for-int", ini.replace("bus = 1", "bus = 1.5"), "sensors.climate.bus")
    ini_case("ini-unknown-key", ini.replace("bus = 1", "buss = 1"), "sensors.climate.buss")
    ini_case("ini-unknown-section", ini + "\n[sensors_extra]\na = 1\n", "sensors_extra")
    ini_case("ini-template", ini.replace("{{ sensor }}_{{ start }}", "{{ sensor }}_{{ 1/0 }}"), "archive.filename_template")
    ini_case("ini-layout-metadata", ini.replace("layout = {{ host }}", "layout = {{ metadata.hive }}/{{ host }}"),
             "upload.layout")
    ini_case("ini-metrics-address", ini + "\n[metrics]\naddress = localhost\n", "metrics.address")
    ini_case("ini-spool-proc", ini.replace(f"spool_dir = {spool}", "spool_dir = /proc/1/spool"), "daemon.spool_dir")
    ini_case("ini-bad-utf8", ini.encode().replace(b"fuzz-hive", b"fuzz\xc3hive"), None)
    ini_case("ini-truncated", ini[:ini.index("[bundle]")], "bundle.recipients")
    ini_case("ini-default-section", "[DEFAULT]\ntype = sht3x\n" + ini, "DEFAULT")
    ini_case("ini-empty-part", ini + "\n[sensor..x]\ntype = sht3x\n", None)
    ini_case("ini-dot-section", ini + "\n[.]\na = 1\n", None)
    ini_case("ini-interpolation-like", ini.replace("host = fuzz-hive", "host = %(x)s"), "daemon.host")
    ini_case("ini-nan", ini.replace("interval_s = 60", "interval_s = nan"), "sensors.climate.interval_s")
    ini_case("ini-huge", ini.replace("interval_s = 60", "interval_s = 1e999"), "sensors.climate.interval_s")
    ini_case("ini-nul", ini.replace("host = fuzz-hive", "host = fuzz\x00hive"), None)

    examples = {"simulated": ROOT / "config" / "simulated.toml"}
    sim = tomllib.loads(examples["simulated"].read_text())
    for s in sim["sensors"].values():
        if "replay" in s:
            s["replay"]["file"] = str((ROOT / "config" / s["replay"]["file"]).resolve())
    sim["daemon"]["spool_dir"] = spool
    for i, (k, v) in enumerate([("sensors.hive_climate.replay.temperature_column", "celsius"),
                                ("sensors.hive_frames.replay_filter_values.attic", "1"),
                                ("sensors.hive_scale.simulation.base_kg", "heavy"),
                                ("processors.hive_swarm.sensor", "hive_nowhere"),
                                ("sensors.hive_climate.replay.timezone", "Europe/Nowhere")]):
        toml(f"simulated-{i}-{k}", _set(sim, k, v), k)
    return out


def _ids(tmp: Path) -> list[str]:
    return [c[0] for c in _cases(tmp)]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_bases_are_valid(tmp_path: Path, capsys):
    """Every case is one mutation of a config that passes: what fails is the mutation."""
    spool = str(tmp_path / "spool")
    for name, suffix, content in (("base", ".toml", tomli_w.dumps(_set(BASE, "daemon.spool_dir", spool))),
                                  ("base", ".ini", INI_BASE.replace("SPOOL", spool).replace("RECIPIENT", RECIPIENT))):
        path = tmp_path / f"{name}{suffix}"
        path.write_text(content)
        assert cli.main(["check-config", str(path)]) == 0, capsys.readouterr().err
        assert "ok" in capsys.readouterr().out


def test_fuzz_set_exits_78_with_one_line_naming_the_file(tmp_path: Path, capsys):
    cases = _cases(tmp_path)
    assert len(cases) >= 100
    failures = []
    for cid, suffix, content, key in cases:
        path = tmp_path / f"{cid.replace('/', '_')[:60]}{suffix}"
        path.write_bytes(content)
        try:
            cli.main(["check-config", str(path)])
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:  # the traceback a user would have seen
            capsys.readouterr()
            failures.append(f"{cid}: traceback {type(e).__name__}: {str(e)[:200]}")
            continue
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        problem = None
        if code != config.EX_CONFIG:
            problem = f"exit {code}"
        elif len(lines) != 1 or not lines[0].startswith(f"beemond: config error: {path}"):
            problem = f"stderr {captured.err!r}"
        elif key is not None and f": {key}" not in lines[0]:
            problem = f"key {key!r} not named: {lines[0]}"
        elif captured.out:
            problem = f"stdout {captured.out!r}"
        if problem:
            failures.append(f"{cid}: {problem}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


SUBPROCESS = ["template-0", "ini-shadow", "layout-0", "semantic-0-metrics.address", "deep-array", "bad-utf8"]


@pytest.mark.parametrize("cid", SUBPROCESS)
def test_fuzz_cases_as_real_subprocesses(tmp_path: Path, cid: str):
    """The same as the user sees it: a real `beemond check-config` process, its exit status and stderr."""
    case = next(c for c in _cases(tmp_path) if c[0] == cid)
    _, suffix, content, key = case
    path = tmp_path / f"case{suffix}"
    path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == config.EX_CONFIG, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(path) in r.stderr and (key is None or key in r.stderr), r.stderr
    assert r.stdout == ""


def test_simulated_example_passes_on_a_fresh_clone(capsys):
    """config/simulated.toml names no file that only scripts/demo creates (its key, its FTP password)."""
    assert cli.main(["check-config", str(ROOT / "config" / "simulated.toml")]) == 0
    cfg = config.load(ROOT / "config" / "simulated.toml")
    demo_run = (ROOT / "demo-run").resolve()
    named = [cfg.upload.password_file, cfg.bundle.signing_key, *(Path(r) for r in cfg.bundle.recipients if "/" in r)]
    assert not [p for p in named if p is not None and demo_run in Path(p).resolve().parents]


def test_layout_check_gives_what_the_uploader_gives():
    """A layout the check accepts renders in Uploader.remote_path; one reading record metadata (which a
    bundle's name does not carry) is refused by both."""
    from types import SimpleNamespace

    from beemond.upload.uploader import Uploader

    bundle = Path("outbox/hive-07_20210619T000458Z_hive_climate_0123456789ab.tar.age")
    for layout, ok in (("{{ host }}/{{ date }}/{{ sensor }}/{{ name }}", True), ("{{ group }}/{{ start }}-{{ end }}.{{ ext }}", True),
                       ("{{ metadata.hive }}/{{ name }}", False)):
        up = SimpleNamespace(up=SimpleNamespace(layout=layout), transport=SimpleNamespace(path=lambda rel: rel))
        if ok:
            names.check_layout(layout)
            assert Uploader.remote_path(up, bundle).endswith(bundle.name) or ".tar.age" in Uploader.remote_path(up, bundle)
        else:
            with pytest.raises(names.TemplateError, match="no record metadata"):
                names.check_layout(layout)
            with pytest.raises(names.TemplateError):
                Uploader.remote_path(up, bundle)


def test_spool_on_tmpfs_loads_with_a_warning(tmp_path: Path, caplog):
    """tmpfs works but loses the spool at a power cut: a warning naming the key, not an error."""
    from beemond.config import checks as config_checks

    shm = Path("/dev/shm")
    if config_checks.filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(_set(BASE, "daemon.spool_dir", str(shm / "beemond-test-spool"))))
    with caplog.at_level("WARNING"):
        config.load(path)
    assert any("daemon.spool_dir" in r.getMessage() and "tmpfs" in r.getMessage() for r in caplog.records)


def test_filesystem_type_reads_mountinfo(tmp_path: Path, monkeypatch):
    """The longest mount point that holds the path wins; escaped spaces in mount points are decoded."""
    from beemond.config import checks as config_checks

    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
                    "25 22 0:5 / /proc rw,nosuid shared:12 - proc proc rw\n"
                    "30 22 0:40 / /media/my\\040disk rw - vfat /dev/sda1 rw\n")
    monkeypatch.setattr(config_checks, "MOUNTINFO", info)
    assert config_checks.filesystem_type(Path("/proc/self")) == "proc"
    assert config_checks.filesystem_type(Path("/media/my disk/x")) == "vfat"
    assert config_checks.filesystem_type(Path("/procfoo")) == "ext4"


def test_templates_are_tried_with_the_configured_metadata(tmp_path: Path):
    """[archive] default_metadata is the sample a template is tried with: a number stays a number."""
    ok = _set(_set(BASE, "daemon.spool_dir", str(tmp_path / "spool")),
              "archive.filename_template", "hive{{ metadata.hive + 1 }}_{{ sensor }}_{{ start }}.{{ ext }}")
    path = tmp_path / "ok.toml"
    path.write_text(tomli_w.dumps(ok))
    config.load(path)
    bad = _set(ok, "archive.default_metadata.hive", "3629")  # a string now: "3629" + 1 fails
    path.write_text(tomli_w.dumps(bad))
    with pytest.raises(config.ConfigError, match="archive.filename_template.*TypeError"):
        config.load(path)


def test_a_name_template_keeps_record_values_of_any_size():
    """The size limits bound widths and repetitions, never the record's own values."""
    name = names.render_name('{{ metadata.id }}_{{ "%d"|format(metadata.id) }}_{{ "{}".format(metadata.id) }}_'
                             '{{ metadata.get("x", 99999) }}.csv', metadata={"id": 10**12})
    assert name == "1000000000000_1000000000000_1000000000000_99999.csv"


@pytest.mark.parametrize("template", [
    "{{ sensor }}_{{ metadata.sample_rate_hz|default(44100) }}Hz_{{ start }}.{{ ext }}",  # a default is a value
    "{{ sensor }}_{{ metadata.sample_rate_hz|int(48000) }}Hz_{{ start }}.{{ ext }}",
    "{{ sensor }}_{{ start }}_{{ '%06d' % (_split_index * 100000 + metadata.hive) }}.{{ ext }}",
    "{{ sensor }}_{{ (metadata.hive * 86400) % 86400 }}_{{ start }}.{{ ext }}",  # seconds in a day
    "{{ sensor }}_{{ [1, 2, 3]|select('lt', 50000)|join('-') }}_{{ start }}.{{ ext }}",
])
def test_numbers_that_size_nothing_are_not_bounded(tmp_path: Path, template: str):
    """The size limits are for widths, repetitions, ranges and exponents: a default value, a
    multiplication or a modulo of plain numbers makes no large name and loads (check-config exits 0)."""
    ok = _set(_set(BASE, "daemon.spool_dir", str(tmp_path / "spool")), "archive.filename_template", template)
    path = tmp_path / "ok.toml"
    path.write_text(tomli_w.dumps(ok))
    config.load(path)
    name = names.render_name(template, sensor="s", start="20210619T000000Z", ext="csv", _split_index=2,
                             metadata={"hive": 3629, "sample_rate_hz": 96000})
    assert name.startswith("s_") and name.endswith(".csv")


AUTOMOUNT = """\
import os, subprocess, sys
point = sys.argv[1]
r, w = os.pipe()  # the automount daemon's end: nobody reads it, and nothing here triggers a mount
os.set_inheritable(w, True)
subprocess.run(["mount", "-t", "autofs", "-o", f"fd={w},pgrp={os.getpgrp()},minproto=5,maxproto=5,direct",
                "beemond-test", point], pass_fds=(w,), check=True)
sys.exit(subprocess.run([sys.executable, "-m", "beemond", "check-config", sys.argv[2]]).returncode)
"""


def test_spool_on_an_automount_point_loads(tmp_path: Path):
    """A spool on a disk that systemd mounts at first access (fstab ``x-systemd.automount``, a USB
    disk on a Pi) sits on an autofs mount until the daemon first writes there: autofs stands for the
    file system it will mount, and says nothing about it. Real autofs mount, in a mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    point = tmp_path / "usb-disk"
    point.mkdir()
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(_set(BASE, "daemon.spool_dir", str(point))))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", AUTOMOUNT, str(point),
                        str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if "CalledProcessError" in r.stderr:  # mount(8) refused (no autofs in this kernel, a container)
        pytest.skip(f"cannot mount autofs here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_the_placeholder_recipient_is_named_at_load(tmp_path: Path):
    """config/simulated.toml's recipient is a key nobody can decrypt with: check-config still passes
    (a fresh clone), and says so, so that a hive config copied from it does not seal a season of
    recordings to no one in silence."""
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(ROOT / "config" / "simulated.toml")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bundle.recipients[0]" in r.stderr and "placeholder" in r.stderr and "Traceback" not in r.stderr


def test_a_runaway_telemetry_topic_is_refused_within_the_time_limit(tmp_path: Path):
    """The MQTT topic is a name template too, rendered for every reading: one that computes for ever
    exits 78 at load, as a filename template does, instead of hanging check-config and the daemon."""
    runaway = "hive/{% for i in range(9999) %}{% for j in range(9999) %}{% for k in range(9999) %}{% endfor %}" \
              "{% endfor %}{% endfor %}{{ sensor }}"
    tree = _set(_set(_set(BASE, "daemon.spool_dir", str(tmp_path / "spool")), "telemetry.broker", "127.0.0.1"),
                "telemetry.topic", runaway)
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(tree))
    r = subprocess.run([sys.executable, "-m", "beemond", "check-config", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 78, r.stderr
    assert "telemetry.topic" in r.stderr and "longer than" in r.stderr and "Traceback" not in r.stderr


UNICODE_MOUNT = """\
import os, subprocess, sys
base = sys.argv[1]
os.makedirs(f"{base}/run")
os.makedirs(f"{base}/disk/spool")
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", f"{base}/run"], check=True)
point = f"{base}/run/media/Donn\\u00e9es ruche"  # a USB disk with its label, where udisks mounts it
os.makedirs(point)
subprocess.run(["mount", "--bind", f"{base}/disk", point], check=True)
sys.exit(subprocess.run([sys.executable, "-m", "beemond", "check-config", sys.argv[2]]).returncode)
"""


def test_a_disk_mounted_under_a_non_ascii_label_is_not_taken_for_its_parent(tmp_path: Path):
    """mountinfo escapes a space as \\\\040 and leaves UTF-8 as it is: a spool on a disk mounted under
    /run/media/USER/LABEL (tmpfs) is on the disk, not on tmpfs (no power-cut warning). Real mounts, in
    a mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    base = tmp_path / "m"
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(_set(BASE, "daemon.spool_dir", str(base / "run/media/Données ruche/spool"))))
    r = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", UNICODE_MOUNT, str(base),
                        str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if "CalledProcessError" in r.stderr:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "tmpfs" not in r.stderr
