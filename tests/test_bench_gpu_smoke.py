"""bench/gpu.py runs (CPU smoke mode, tiny model, backend torch): the GPU benchmark is run
unattended on a borrowed machine, so a broken script must be caught here first."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_smoke(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "FASTACCUM_BACKEND"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--smoke", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    impls = {(r["stage"], r["micro_batches"], r["impl"]) for r in rows}
    assert ("step", 1, "torch-fused") in impls and ("window", 8, "fastaccum-bf16") in impls
    # the A/B of the bf16 fold: the batched fold (default) and the per-parameter one
    assert ("window", 8, "fastaccum-bf16-param") in impls and ("step", 1, "fastaccum-bf16-param") not in impls
    assert data["meta"]["fold"] == "both"
    for r in rows:
        assert not r["error"], r
        assert r["ms"] > 0 and r["bytes_per_param"] > 0
    assert "x fused" in proc.stdout and "peak MB" in proc.stdout
