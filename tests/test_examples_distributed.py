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
    # torch's c10d teardown at process exit sometimes aborts after everything is done
    # ("terminate called without an active exception", see test_distributed._finish); the
    # example has already checked and printed its result then, so only that abort is let pass
    teardown_abort = "terminate called without an active exception" in res.stderr
    assert res.returncode == 0 or teardown_abort, res.stdout[-3000:] + res.stderr[-3000:]
