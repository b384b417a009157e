"""The torchrun examples run as users run them: two CPU processes with gloo, under a minute."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


@pytest.mark.parametrize("script, expect", [
    ("ddp.py", "ok: replicas agree"),
    ("fsdp2.py", "resumed bit for bit"),
])
def test_example_runs_under_torchrun(script, expect):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    # --standalone: a free port of its own, so parallel runs on one machine do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert expect in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    # and they exit cleanly: no abort at interpreter shutdown (examples/ddp.py tears the
    # process group down before it, see there)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "terminate called" not in res.stderr, res.stderr[-3000:]
