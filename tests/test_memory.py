"""Memory on a 512 MB Pi: what the orchestrator and the forkserver of a real daemon hold (the numbers
themselves are bench/footprint.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib

import tomli_w

from conftest import ROOT, make_config

# Libraries and modules only workers need. The orchestrator outlives every worker restart: whatever it
# imports it holds for months, in a process of its own (nothing it imports is shared with the workers).
# The config's full validation (templates compiled with Jinja2, recipients parsed with pyrage, replay
# files read) runs in a short-lived child at start and at every reload, so those stay out too.
WORKER_ONLY = ("jinja2", "pyrage", "beemond.records", "beemond.bundle.crypto", "beemond.bundle.sealer",
               "beemond.sensors.replay", "numpy", "soundfile", "sounddevice", "av", "PIL", "paramiko", "watchdog", "gpiozero",
               "serial", "smbus2", "astral", "cryptography", "beemond.aggregator", "beemond.upload.uploader",
               "beemond.sensors.audio.driver", "beemond.sensors.camera.driver", "beemond.processors.audio_bands.worker")

# The real orchestrator, run for a few seconds with every worker started; then its own sys.modules and
# the shared libraries its forkserver has mapped. (A __main__ guard: the forkserver imports this file.)
RUN = textwrap.dedent("""
    import json, os, sys, threading
    from beemond import config
    from beemond.core import journal
    from beemond.supervisor.orchestrator import Orchestrator

    def forkserver_maps():
        for pid in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split():
            try:
                if "forkserver" in open(f"/proc/{pid}/cmdline").read():
                    return open(f"/proc/{pid}/maps").read()
            except OSError:
                pass
        return ""

    if __name__ == "__main__":
        journal.setup("orchestrator", "warning")
        orch = Orchestrator.from_file(sys.argv[1], duration=float(sys.argv[2]))  # as `beemond run` does
        seen = {}
        timer = threading.Timer(float(sys.argv[2]) - 1, lambda: seen.update(maps=forkserver_maps()))
        timer.start()
        status = orch.run()
        print(json.dumps({"status": status, "modules": sorted(sys.modules), "forkserver_maps": seen.get("maps", ""),
                          "workers": sorted(w.name for w in orch.workers.values() if w.starts)}))
""")


def run_orchestrator(cfg_path, seconds: float = 6) -> dict:
    res = subprocess.run([sys.executable, "-c", RUN, str(cfg_path), str(seconds)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_orchestrator_keeps_worker_libraries_out_and_the_forkserver_shares_numpy(tmp_path, keys, password_file):
    cfg = make_config(tmp_path, keys, password_file, 21, **{"upload.protocol": "none"})
    got = run_orchestrator(cfg)
    assert got["status"] == 0
    expected = {*tomllib.loads(cfg.read_text())["sensors"], *tomllib.loads(cfg.read_text())["processors"]}
    assert expected <= set(got["workers"])
    loaded = {*got["modules"], *(m.split(".")[0] for m in got["modules"])}
    assert not loaded & set(WORKER_ONLY), sorted(loaded & set(WORKER_ONLY))
    # The audio sensor, its band-power processor and the camera all import NumPy: the forkserver has it
    # mapped before it forks them, so their NumPy pages are shared.
    assert "_multiarray_umath" in got["forkserver_maps"]


def test_one_numpy_user_leaves_numpy_out_of_the_forkserver(tmp_path, keys, password_file):
    path = make_config(tmp_path, keys, password_file, 21, **{"upload.protocol": "none"})
    cfg = tomllib.loads(path.read_text())
    cfg["sensors"] = {k: v for k, v in cfg["sensors"].items() if k in ("hive_climate", "hive_audio")}
    cfg.pop("processors", None)
    path.write_text(tomli_w.dumps(cfg))
    from beemond import config
    from beemond.supervisor.processes import forkserver_preload

    preload = forkserver_preload(config.load(path))
    assert "numpy" not in preload and preload[-1] == "beemond.preload"
    # each worker unpickles the config, which imports every section's module: shared, not per worker
    assert {"beemond.sensors.sht3x.section", "beemond.sensors.audio.section"} <= set(preload)
    got = run_orchestrator(path, seconds=5)
    assert got["forkserver_maps"] and "_multiarray_umath" not in got["forkserver_maps"]


def test_a_stills_only_camera_does_not_import_pyav(tmp_path):
    """picamera2.outputs imports PyAV; a camera without clips must not pay for it (a stand-in
    picamera2 package with the same module layout)."""
    pkg = tmp_path / "picamera2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class Picamera2: pass\n")
    (pkg / "encoders.py").write_text("class H264Encoder: pass\n")
    (pkg / "outputs.py").write_text("import av\nclass PyavOutput: pass\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from beemond.sensors.camera.driver import hardware_backend
        b = hardware_backend(clips=sys.argv[1] == "clips")
        print(b.PyavOutput is not None, "av" in sys.modules)
    """)
    for arg, expected in (("stills", "False False"), ("clips", "True True")):
        res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert res.stdout.strip() == expected, res.stdout + res.stderr


# The daemon's start and reload as the orchestrator runs them: the config typed in the process, the full
# validation in a forkserver child whose verdict comes back here.
RELOAD = textwrap.dedent("""
    import json, sys
    from beemond.supervisor.orchestrator import Orchestrator

    if __name__ == "__main__":
        orch = Orchestrator.from_file(sys.argv[1])
        with open(sys.argv[2]) as new, open(sys.argv[1], "w") as f:
            f.write(new.read())
        verdict = orch.reload("test")
        print(json.dumps({"verdict": verdict, "modules": [m for m in ("jinja2", "pyrage") if m in sys.modules]}))
""")


def test_the_full_validation_runs_in_a_child_and_its_verdict_comes_back(tmp_path, keys, password_file):
    path = make_config(tmp_path, keys, password_file, 21, **{"upload.protocol": "none"})
    cfg = tomllib.loads(path.read_text())
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps({**cfg, "bundle": {**cfg["bundle"], "recipients": ["age1notarecipient"]}}))
    res = subprocess.run([sys.executable, "-m", "beemond", "run", "--config", str(bad), "--duration", "5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 78, res.stderr
    assert res.stderr.startswith(f"beemond: config error: {bad}: bundle.recipients[0]: "), res.stderr
    assert "Traceback" not in res.stderr

    # A reload whose file only the child's checks refuse (a template Jinja2 cannot compile).
    bad.write_text(tomli_w.dumps({**cfg, "archive": {"filename_template": "{{ oops"}}))
    res = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    got = json.loads(res.stdout.splitlines()[-1])
    assert got["verdict"]["ok"] is False and got["verdict"]["key"] == "archive.filename_template", got
    assert got["modules"] == []
