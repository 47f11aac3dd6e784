"""Field conditions, measured: a slow resetting link, kills and power cuts, SD-card writes.

Each part lives in its own module beside this one and exposes ``add_arguments(parser)`` and
``measure(args) -> dict`` (key -> number):
  bench/field_upload.py       resume_overhead= large_delivered= ... (uploads over a capped, resetting link)
  bench/field_durability.py   lost_readings= write_amplification= fsyncs_per_hour= ... (journal, cuts)

Reproduce (from the repo root):  .venv/bin/python bench/field.py [--part upload|durability] [part options]
Ends with one line of key=value pairs, the union of every part that ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("upload", "durability")


def _load(part: str):
    path = HERE / f"field_{part}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"field_{part}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=PARTS, action="append", help="run only this part (repeatable)")
    mods = {p: m for p in PARTS if (m := _load(p)) is not None}
    for mod in mods.values():
        mod.add_arguments(ap)
    args = ap.parse_args()
    results: dict = {}
    failed = False
    for part in args.part or PARTS:
        if part not in mods:
            print(f"field: part {part} is not there (bench/field_{part}.py)", file=sys.stderr)
            failed = True
            continue
        got = mods[part].measure(args)
        print(f"{part}: " + " ".join(f"{k}={v}" for k, v in got.items()), flush=True)
        results.update(got)
    print(" ".join(f"{k}={v}" for k, v in results.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
