"""The shape of beemond.sensors (issue 13): drivers reach their device only through
beemond.sensors.seams and never import an emulator; emulators import chip logic, never a driver; and
loading a config imports no emulator, no numpy and no pyrage. Function-level imports count."""

from __future__ import annotations

import ast
import subprocess
import sys

from beemond import registry
from conftest import ROOT

PKG = ROOT / "beemond"
EMULATORS = {"beemond.sensors.emulated_i2c"} | {f"{registry.package(registry.SENSORS, k)}.emulator"
                                                for k in registry.SENSORS}


def imports(path) -> set[str]:
    """Every module *path* imports, at any depth of its code (``from a import b`` counts ``a`` and ``a.b``)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    base = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")
                mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_only_seams_imports_an_emulator():
    importers = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if imports(p) & EMULATORS and not p.name == "emulator.py"}
    assert importers == {"beemond/sensors/seams.py"}


def test_emulators_import_chip_logic_never_a_driver():
    for kind in registry.SENSORS:
        path = PKG / "sensors" / kind / "emulator.py"
        used = imports(path)
        drivers = {m for m in used if m.endswith(".driver") or m.startswith("beemond.sensors.base")}
        assert not drivers, f"{path.name} of {kind} imports {drivers}"
        assert "beemond.sensors.seams" not in used


def test_loading_a_config_imports_no_emulator_numpy_or_pyrage():
    code = ("import sys\n"
            "from beemond import config\n"
            f"config.load({str(ROOT / 'config' / 'simulated.toml')!r}, semantics=False)\n"
            "print('\\n'.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT, timeout=60).stdout.split())
    assert {"beemond.sensors.sht3x.section", "beemond.processors.swarm.section"} <= loaded   # through the registry
    heavy = {m for m in loaded if m.split(".")[0] in ("numpy", "pyrage", "smbus2", "serial", "gpiozero", "jinja2")}
    assert not heavy
    assert not loaded & EMULATORS and not {m for m in loaded if m.endswith((".driver", ".worker"))}
