"""examples/batch_size_study.py --quick runs end to end and prints its table and advice."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_size_study_quick():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "batch_size_study.py"), "--quick"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "| accumulation | effective batch (tokens) | updates | beta2 | held-out loss |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "4", "16"]
    for r in rows:
        loss = float(r.split("|")[5])
        assert 0 < loss < 6.0  # below the uniform 256-way loss ln(256) = 5.55 plus slack
    # no accumulation: the noise scale is not measurable, and the advice says so
    assert rows[0].split("|")[6].strip() == "n/a" and "not_enough_data" in rows[0]
    assert rows[2].split("|")[6].strip() != "n/a"  # measured with accumulation 16
    assert "- accumulation 16: " in out
    # each estimate with the training loss it was measured at: fewer updates end higher
    assert rows[0].split("|")[7].strip() == "n/a"
    at4, at16 = float(rows[1].split("|")[7]), float(rows[2].split("|")[7])
    assert 0 < at4 < at16 < 6.0
    # and the run that got lower, read where the other one ended
    assert f"- at training loss {at16:.4f}, where accumulation 16 ended measuring " in out
