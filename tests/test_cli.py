"""``fastaccum bench`` end to end, through a subprocess as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT, env: dict = None, timeout: int = 240) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    e.setdefault("COLUMNS", "160")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "fastaccum", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def expected_impls():
    import torch

    import fastaccum

    names = [f"fastaccum-{b}" for b in fastaccum.backends.available_backends(torch.device("cpu"))]
    return names + ["torch-forloop", "torch-foreach", "torch-fused", "deepspeed-cpuadam"]


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "bench.json", out / "bench.png"
    # --quick with even smaller sizes: the test checks the plumbing, not the figures
    proc = run_cli("bench", "--quick", "--params", "20k,60k", "--accum", "2", "--repeats", "2", "--warmup", "1",
                   "--threads", "1", "--json", str(js), "--plot", str(png), "--no-progress")
    return proc, js, png


def test_bench_quick_writes_valid_json_with_every_row(quick_bench):
    proc, js, _ = quick_bench
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    res = json.loads(js.read_text())
    assert res["schema"] == "fastaccum.bench/1"
    for key in ("created_utc", "config", "machine", "versions", "bandwidth", "definitions", "rows"):
        assert key in res
    assert res["versions"]["torch"] and res["versions"]["fastaccum"]
    assert res["machine"]["torch_threads"] == 1
    bw = res["bandwidth"]
    assert bw["triad_gbps"] > 0 and bw["copy_gbps"] > 0 and bw["reference_gbps"] == bw["update_gbps"] > 0
    assert bw["update_gbps"] == pytest.approx(max(bw["samples_update_gbps"]), abs=1e-3)  # best sample, one per group + the first

    rows = {(r["impl"], r["mode"], r["dtype"], r["params"]): r for r in res["rows"]}
    expected = {(i, m, d, n) for i in expected_impls() for m in ("step", "cycle") for d in ("fp32", "bf16")
                for n in (20_000, 60_000)}
    assert set(rows) == expected
    try:
        import deepspeed  # noqa: F401
        has_ds = True
    except ImportError:
        has_ds = False
    for key, r in rows.items():
        if key[0] == "deepspeed-cpuadam" and not has_ds:
            assert r["status"] == "skipped" and "deepspeed" in r["reason"]
            continue
        assert r["status"] == "ok", (key, r["reason"])
        assert len(r["times_ms"]) == 2
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["gbps"] == pytest.approx(r["bytes_per_param"] * r["params"] / (r["median_ms"] / 1e3) / 1e9, rel=1e-3)
        assert r["pct_bandwidth"] == pytest.approx(100 * r["gbps"] / bw["reference_gbps"], rel=1e-3)
        assert r["params_per_s"] > 0 and r["held_bytes"] > 0 and r["peak_mem_bytes"] is not None
        assert r["accum"] == (2 if r["mode"] == "cycle" else 1)
        if r["impl"].startswith("fastaccum"):
            assert r["skipped_steps"] == 0  # every timed cycle really updated
    # documented bytes/param of the step rows
    bpp = {(i.split("-")[0], m, d): rows[(i, m, d, 20_000)]["bytes_per_param"]
           for i, m, d, _ in expected if m == "step"}
    assert bpp[("torch", "step", "fp32")] == 28 and bpp[("torch", "step", "bf16")] == 14
    assert bpp[("fastaccum", "step", "fp32")] == 28 and bpp[("fastaccum", "step", "bf16")] == 30
    # ratios are relative to torch fused in the same group
    for (impl, mode, dtype, n), r in rows.items():
        if impl == "torch-fused":
            assert r["speedup_vs_torch_fused"] == pytest.approx(1.0)
        elif r["status"] == "ok":
            ref = rows[("torch-fused", mode, dtype, n)]
            assert r["speedup_vs_torch_fused"] == pytest.approx(ref["median_ms"] / r["median_ms"], rel=1e-3)
    # held memory: fastaccum fp32 = params + flat buffer + flat m, v (4 x 4 bytes, plus alignment)
    fa = next(i for i in expected_impls() if i.startswith("fastaccum"))
    held = rows[(fa, "step", "fp32", 60_000)]["held_bytes"]
    assert 16 * 60_000 <= held <= 16 * 60_000 * 1.05
    assert rows[("torch-fused", "step", "fp32", 60_000)]["held_bytes"] >= 16 * 60_000
    assert "torch-fused" in proc.stdout and "GB/s" in proc.stdout


def test_bench_plot_is_a_real_png(quick_bench):
    proc, _, png = quick_bench
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank canvas


def run_inproc(capsys, *args: str):
    """``main(args)`` in this process: same code path as the console script, without a torch import each."""
    from fastaccum.tools.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse exits from inside parse_args
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


BAD_BENCH = [
    (["--params", "0"], "--params"),
    (["--params", "10X"], "--params"),
    (["--params=-5"], "--params"),
    (["--accum", "0"], "--accum"),
    (["--dtype", "fp64"], "--dtype"),
    (["--mode", "train"], "--mode"),
    (["--threads", "two"], "--threads"),
    (["--device", "nonsense"], "--device"),
    (["--impl", "nosuch"], "--impl"),
    (["--json", "/nonexistent-dir/x.json"], "--json"),
]


@pytest.mark.parametrize("args, needle", BAD_BENCH)
def test_bench_bad_input_exits_2_with_one_line(capsys, args, needle):
    rc, _, err = run_inproc(capsys, "bench", "--no-progress", *args)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], err


@pytest.mark.parametrize("args", [["--params", "10X"], ["--impl", "nosuch"]])
def test_bench_bad_input_through_the_real_entry_point(args):
    # one argparse-level and one command-level error through ``python -m fastaccum``
    proc = run_cli("bench", "--no-progress", *args, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and args[0] in proc.stderr


def test_bench_cuda_without_cuda_is_a_clean_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = run_cli("bench", "--device", "cuda", "--no-progress", timeout=60)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr


def test_no_command_prints_help_and_exits_2():
    proc = run_cli(timeout=60)
    assert proc.returncode == 2 and "bench" in proc.stdout and "plan" in proc.stdout
