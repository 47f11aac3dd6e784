"""The crash-safety soak (bench/soak.py) with 5 kills: nothing recorded is lost, no bundle is corrupt, and the
resumed replay neither skips nor repeats a row."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import AGE, ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(AGE is None, reason="the stock age CLI is not installed")
def test_five_kills_lose_nothing():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--kills", "5", "--seed", "7",
                          "--max-gap", "3", "--final-s", "5"], capture_output=True, text=True, timeout=240)
    last = res.stdout.strip().splitlines()[-1]
    values = dict(kv.split("=", 1) for kv in last.split())
    assert values["kills"] == "5"
    assert values["lost"] == "0" and values["corrupt"] == "0", res.stdout + res.stderr[-3000:]
    assert values["final_status"] == "0"
    assert int(values["bundles"]) > 0 and int(values["readings"]) > 0
    checked = int(re.search(r"(\d+) readings checked", res.stdout).group(1))
    assert checked > 0, "the soak saw no durable reading to account for"
    # Replay resume: the replayed rows are one unbroken run, value for value, none in two records.
    assert values["replay_missing"] == "0" and values["replay_twice"] == "0" and values["replay_wrong"] == "0"
    assert int(values["replay_rows"]) > 10
    # (audio_cuts_over_2s is the bench's acceptance, not asserted here: a loaded CI machine can hold
    # the audio writer back by more than the sync interval)
