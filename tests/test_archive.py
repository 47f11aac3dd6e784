"""beemond.core.names and beemond.core.fsio: safe record names from sandboxed templates, crash-safe writes,
temp clean-up."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from beemond import spool
from beemond.core import clock, fsio, names
from beemond.core.names import TemplateError
from beemond.config import DEFAULT_TEMPLATE

VARS = {"host": "hive1", "sensor": "hive_climate", "start": "20210619T000458Z", "end": "20210619T001458Z",
        "ext": "csv", "date": "2021-06-19", "metadata": {"rows": 4}, "_split_index": 0}


# ------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("template", [
    "../x",
    "../{{ sensor }}",
    "/abs",
    "/tmp/{{ sensor }}.csv",
    ".hidden",
    "sub/.hidden/x.csv",
    "a/../../b",
    "a/..",
    "..",
    "{{ sensor }}.csv.meta.json",
    "x.meta.json",
    ".{{ sensor }}.csv.tmp-123",
    "{{ sensor }}.csv.tmp-123",
    "a\\b.csv",
    "",
    "   ",
    "{{ '' }}",
    "x\x00.csv",
])
def test_render_name_rejects_unsafe_names(template):
    with pytest.raises(TemplateError):
        names.render_name(template, **VARS)


def test_render_name_rejects_unsafe_values_from_variables():
    # a variable, not only the template text, can carry a traversal
    with pytest.raises(TemplateError):
        names.render_name("{{ sensor }}/{{ start }}.csv", **{**VARS, "sensor": ".."})
    with pytest.raises(TemplateError):
        names.render_name("{{ host }}{{ sensor }}.csv", **{**VARS, "host": "/etc/"})


@pytest.mark.parametrize("template,expected", [
    ("sub/dir/name.csv", "sub/dir/name.csv"),
    ("{{ sensor }}_{{ start }}_{{ end }}.{{ ext }}", "hive_climate_20210619T000458Z_20210619T001458Z.csv"),
    ("{{ host }}/{{ date }}/{{ sensor }}-{{ '%03d' % _split_index }}.{{ ext }}", "hive1/2021-06-19/hive_climate-000.csv"),
    ("{{ sensor }}_{{ metadata.rows }}rows.csv", "hive_climate_4rows.csv"),
    ("  padded.csv \n", "padded.csv"),
    ("a.b.c.flac", "a.b.c.flac"),
])
def test_render_name_accepts_and_renders(template, expected):
    assert names.render_name(template, **VARS) == expected


def test_strict_undefined_is_a_template_error():
    with pytest.raises(TemplateError, match="sensr"):
        names.render_name("{{ sensr }}.csv", **VARS)
    with pytest.raises(TemplateError):
        names.render_name("{{ metadata.nope }}.csv", **VARS)


@pytest.mark.parametrize("template", ["{{ sensor }", "{% if %}x", "{{ sensor | nosuchfilter }}.csv"])
def test_syntax_error_is_a_template_error(template):
    with pytest.raises(TemplateError):
        names.render_name(template, **VARS)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ sensor.__class__.__name__ }}.csv",
    "{{ metadata.__class__ }}.csv",
    "{{ (metadata.update({'x': 1}) or 'a') }}.csv",   # immutable sandbox: no mutation of the values
])
def test_sandbox_blocks_unsafe_access(template):
    with pytest.raises(TemplateError) as info:
        names.render_name(template, **VARS)
    assert "<class" not in str(info.value)


def test_check_template_and_layout():
    names.check_template(DEFAULT_TEMPLATE)
    names.check_layout("{{ host }}/{{ date }}/{{ name }}")
    with pytest.raises(TemplateError):
        names.check_template("{{ nope }}")
    with pytest.raises(TemplateError):
        names.check_layout("../{{ name }}")


@pytest.mark.parametrize("template", [".", "./", "{{ '.' }}"])
def test_render_name_rejects_the_directory_itself(template):
    with pytest.raises(TemplateError):
        names.render_name(template, **VARS)


# ------------------------------------------------------------------------------------------ times

def test_utc_stamps():
    t = datetime(2021, 6, 19, 2, 4, 58, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert names.utc_stamp(t) == "20210619T000458Z"
    assert clock.utc_iso(t) == "2021-06-19T00:04:58.123Z"
    back = clock.parse_iso(clock.utc_iso(t))
    assert back == t.replace(microsecond=123000)
    assert clock.parse_iso("2021-06-19T00:04:58").tzinfo is not None  # naive means UTC


# ------------------------------------------------------------------------------------------ writes

def _listing(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def test_atomic_writer_success_leaves_complete_file_and_no_temp(tmp_path: Path):
    final = tmp_path / "sub" / "record.bin"
    payload = os.urandom(300_000)
    with fsio.atomic_writer(final) as f:
        f.write(payload[:1000])
        assert not final.exists(), "final name must not appear before the writer finishes"
        f.write(payload[1000:])
    assert final.read_bytes() == payload
    assert _listing(tmp_path) == ["sub", "sub/record.bin"]


def test_atomic_writer_text_mode(tmp_path: Path):
    final = tmp_path / "note.txt"
    with fsio.atomic_writer(final, "w", encoding="utf-8") as f:
        f.write("ruche ✓\n")
    assert final.read_text(encoding="utf-8") == "ruche ✓\n"


class Boom(Exception):
    pass


def test_atomic_writer_body_raises_leaves_nothing(tmp_path: Path):
    final = tmp_path / "record.bin"
    with pytest.raises(Boom):
        with fsio.atomic_writer(final) as f:
            f.write(b"half a record")
            raise Boom()
    assert _listing(tmp_path) == []


def test_atomic_writer_body_raises_keeps_the_old_file(tmp_path: Path):
    final = tmp_path / "record.bin"
    final.write_bytes(b"old complete content")
    with pytest.raises(Boom):
        with fsio.atomic_writer(final) as f:
            f.write(b"new partial")
            raise Boom()
    assert final.read_bytes() == b"old complete content"
    assert _listing(tmp_path) == ["record.bin"]


def test_atomic_writer_replaces_an_existing_file(tmp_path: Path):
    final = tmp_path / "record.bin"
    final.write_bytes(b"old")
    with fsio.atomic_writer(final) as f:
        f.write(b"new")
    assert final.read_bytes() == b"new"
    assert _listing(tmp_path) == ["record.bin"]


def test_write_record_writes_data_then_sidecar(tmp_path: Path):
    meta = {"sensor": "s", "rows": 2, "start": "2021-06-19T00:00:00.000Z"}
    path = spool.write_record(tmp_path, "s/a.csv", meta, data_writer=lambda f: f.write(b"x,1\ny,2\n"))
    assert path == tmp_path / "s" / "a.csv"
    assert path.read_bytes() == b"x,1\ny,2\n"
    assert json.loads(spool.sidecar_of(path).read_bytes()) == meta
    assert _listing(tmp_path) == ["s", "s/a.csv", "s/a.csv.meta.json"]


def test_write_record_from_a_temp_file(tmp_path: Path):
    tmp = fsio.temp_name(tmp_path, "seg.flac")
    assert fsio.is_internal(tmp.name)
    tmp.write_bytes(b"fLaC....")
    path = spool.write_record(tmp_path, "seg.flac", {"sensor": "a"}, tmp=tmp)
    assert path.read_bytes() == b"fLaC...."
    assert not tmp.exists()
    assert _listing(tmp_path) == ["seg.flac", "seg.flac.meta.json"]


def test_remove_stale_temps_removes_only_ours(tmp_path: Path):
    ours = [tmp_path / ".a.csv.tmp-123",
            tmp_path / "s" / ".b.flac.tmp-4567",
            tmp_path / "s" / "deep" / ".c.csv.meta.json.tmp-1",
            fsio.temp_name(tmp_path / "s", "seg.flac")]
    keep = [tmp_path / "a.csv",
            tmp_path / "a.csv.meta.json",
            tmp_path / ".hidden",
            tmp_path / ".a.csv.tmp-abc",       # not a PID
            tmp_path / ".a.csv.tmp-",          # no PID
            tmp_path / ".a.csv.tmp-12x",
            tmp_path / "a.csv.tmp-123",        # not hidden: not one of ours
            tmp_path / ".tmp-123",             # no NAME part
            tmp_path / "s" / "x.tmp-1.csv"]
    for p in ours + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "s" / ".d.tmp-99").mkdir()   # a directory, not a temp file
    assert fsio.remove_stale_temps(tmp_path) == len(ours)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in keep)
    assert (tmp_path / "s" / ".d.tmp-99").is_dir()
    assert fsio.remove_stale_temps(tmp_path) == 0
    assert fsio.remove_stale_temps(tmp_path / "missing") == 0


def test_a_time_limit_passing_as_the_block_ends_is_no_traceback():
    # Leaving the block is not rendering: a deadline that has passed by then (here: at once) must
    # neither raise out of the with statement nor leave the trace function installed.
    import sys

    from beemond.core import names

    before = sys.gettrace()
    with names._time_limit(0.0):
        pass
    assert sys.gettrace() is before


def test_a_template_that_doubles_a_string_is_stopped_by_memory_not_only_by_time():
    # "~" is a concatenation the sandbox cannot bound; 30 doublings would be 1 GB. The trial render must
    # stop it near TRIAL_MEMORY_KB, not at the time limit hundreds of MB later (a 512 MB Pi reloads in
    # a child of the daemon).
    import subprocess
    import sys

    # VmHWM: this process's own peak (getrusage's would include the pytest worker it was forked from).
    code = ("from beemond.core import names\n"
            "try:\n"
            "    names.check_template('{% set ns = namespace(s=\"x\") %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}x')\n"
            "except names.TemplateError as e:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "    print('refused', hwm.split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    word, peak_kb = out.stdout.split()
    assert word == "refused", out.stderr
    assert int(peak_kb) < 150 * 1024, f"peak {int(peak_kb) // 1024} MB"
