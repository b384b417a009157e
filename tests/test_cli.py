"""``fastaccum bench`` end to end, through a subprocess as a user runs it."""
from __future__ import annotations

import json
import os
import statistics
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
        # 2 rounds, extended (up to 3x, all rows of a group together) while a row is unstable
        assert 2 <= len(r["times_ms"]) <= 6 and r["spread"] is not None and r["noisy"] in (True, False)
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


# ------------------------------------------------------ the verdict and the noise
def test_bench_opens_with_a_like_for_like_verdict(quick_bench):
    proc, js, _ = quick_bench
    assert proc.returncode == 0, proc.stderr
    res = json.loads(js.read_text())
    v = res["verdict"]
    fa = next(i for i in expected_impls() if i.startswith("fastaccum"))
    assert v["impl"] == fa and v["reference"] == "torch-fused"
    assert [(ln["mode"], ln["dtype"]) for ln in v["lines"]] == [("step", "fp32"), ("step", "bf16"),
                                                                ("cycle", "fp32"), ("cycle", "bf16")]
    rows = {(r["impl"], r["mode"], r["dtype"], r["params"]): r for r in res["rows"]}
    for ln in v["lines"]:
        assert [c["params"] for c in ln["cells"]] == [20_000, 60_000]
        for c in ln["cells"]:
            row = rows[(fa, ln["mode"], ln["dtype"], c["params"])]
            # bf16 params: compared with torch on fp32 params (fp32 master + moments on both sides)
            ref = rows[("torch-fused", ln["mode"], "fp32", c["params"])]
            assert "fp32" in row["like_for_like"]
            ratios = sorted(a / b for a, b in zip(ref["times_ms"], row["times_ms"]))
            assert c["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-3)
            assert c["spread"][0] <= c["ratio"] <= c["spread"][1]
    out = proc.stdout.lstrip()
    first = out.splitlines()[0]
    assert first.startswith(f"{fa} vs torch fused AdamW on this machine") and "step, fp32" in first
    assert out.index("compared with") < out.index("ms median")  # the verdict comes before the full table


def test_bench_explains_percent_of_stream_and_bf16_rows(quick_bench):
    proc, js, _ = quick_bench
    res = json.loads(js.read_text())
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    # 20k/60k parameters live in the cache: flagged, and the table says so instead of calling it a bound
    assert all(r["in_cache"] for r in ok) and all(r["working_set_bytes"] > 0 for r in ok)
    assert "= 100% BW" not in proc.stdout and "% stream" in proc.stdout
    assert "%*" in proc.stdout and "not a bound" in proc.stdout
    # fastaccum bf16 vs torch bf16 in the same-dtype column is labelled as not like for like
    assert "x !" in proc.stdout and "not like for like" in proc.stdout.replace("\n", " ")
    # skipped rows are one line under the table, not a block of empty rows
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("│")]
    assert table and not any("deepspeed-cpuadam" in ln for ln in table)


class _Steps:
    """A fake item whose run() takes the listed durations (seconds), cycling."""

    def __init__(self, clock, durations):
        self.clock, self.durations, self.k = clock, durations, 0

    def prepare(self):
        pass

    def run(self):
        self.clock.t += self.durations[self.k % len(self.durations)]
        self.k += 1


class _Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_unstable_rows_get_more_rounds_then_are_marked_noisy():
    from fastaccum.tools import bench as B

    clock = _Clock()
    steady = _Steps(clock, [1.0, 1.01, 0.99])
    # a shared machine: a neighbour takes a core for half of the rounds (2-3x slower), plus one outlier
    busy = _Steps(clock, [1.0, 2.6, 0.9, 3.0, 1.1, 2.4, 0.07])
    times = B.time_until_stable({"steady": steady, "busy": busy}, rounds=4, clock=clock)
    assert len(times["steady"]) == len(times["busy"]) == 12  # extended to 3x, together (rounds stay paired)
    rows = {}
    for name in times:
        r = B.Row(name, "torch", "step", "fp32", 10, 1, 1, times_ms=[t * 1e3 for t in times[name]])
        r.finish(None)
        rows[name] = r
    assert rows["busy"].noisy and not rows["steady"].noisy
    # stable from the start: no extra rounds
    clock2 = _Clock()
    assert len(B.time_until_stable({"s": _Steps(clock2, [1.0])}, rounds=4, clock=clock2)["s"]) == 4


def test_bench_mode_both_and_help_says_what_the_default_costs(capsys):
    from fastaccum.tools.cli import build_parser

    args = build_parser().parse_args(["bench", "--mode", "both"])
    assert args.mode == ["step", "cycle"]
    rc, out, _ = run_inproc(capsys, "bench", "--help")
    assert rc == 0
    text = " ".join(out.split())
    assert "or both (default" in text and "9 minutes" in text and "6.6 GB" in text


# ---------------------------------------------------------- DeepSpeed's CPU Adam
def _fake_deepspeed(monkeypatch, fail_with=None):
    """Register ``deepspeed.ops.adam.DeepSpeedCPUAdam`` with DeepSpeed's documented signature
    (model_params, lr, bias_correction, betas, eps, weight_decay, amsgrad, adamw_mode,
    fp32_optimizer_states; step(closure=None, fp16_param_groups=None); CPU parameters only;
    fp32 moments for 16-bit parameters). The math is torch's AdamW."""
    import types

    import torch

    made = []

    class DeepSpeedCPUAdam(torch.optim.Optimizer):
        optimizer_id = 0

        def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                     weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True):
            if fail_with is not None:
                raise fail_with
            super().__init__(model_params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                                bias_correction=bias_correction, amsgrad=amsgrad))
            for g in self.param_groups:
                for p in g["params"]:
                    if p.device.type != "cpu":
                        raise ValueError(f"CPUAdam param is on {p.device} and must be 'cpu'")
            self.adamw_mode, self.fp32_optimizer_states = adamw_mode, fp32_optimizer_states
            made.append(self)

        @torch.no_grad()
        def step(self, closure=None, fp16_param_groups=None):
            loss = closure() if closure is not None else None
            for g in self.param_groups:
                b1, b2 = g["betas"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        st["step"] = 0
                        dt = torch.float32 if self.fp32_optimizer_states else p.dtype
                        st["exp_avg"] = torch.zeros_like(p, dtype=dt)
                        st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt)
                    st["step"] += 1
                    gr, w = p.grad.float(), p.float()
                    st["exp_avg"].mul_(b1).add_(gr, alpha=1 - b1)
                    st["exp_avg_sq"].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                    bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                    w.mul_(1 - g["lr"] * g["weight_decay"])
                    w.addcdiv_(st["exp_avg"] / bc1, (st["exp_avg_sq"] / bc2).sqrt_().add_(g["eps"]), value=-g["lr"])
                    p.copy_(w)
            return loss

    mods = {name: types.ModuleType(name) for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.adam")}
    mods["deepspeed.ops.adam"].DeepSpeedCPUAdam = DeepSpeedCPUAdam
    mods["deepspeed"].ops, mods["deepspeed.ops"].adam = mods["deepspeed.ops"], mods["deepspeed.ops.adam"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return made


def _ds_suite():
    from fastaccum.tools import bench as B

    cfg = B.BenchConfig(params=[20_000], accum=2, repeats=2, warmup=1, impls=["deepspeed", "torch-fused"],
                        bandwidth_bytes=8 * 2**20)
    return B.run_suite(cfg)


def test_deepspeed_rows_run_when_deepspeed_is_installed(monkeypatch):
    made = _fake_deepspeed(monkeypatch)
    res = _ds_suite()
    ds = [r for r in res["rows"] if r["impl"] == "deepspeed-cpuadam"]
    assert len(ds) == 4 and all(r["status"] == "ok" for r in ds), [r["reason"] for r in ds]
    assert made and all(o.adamw_mode for o in made)
    bpp = {(r["mode"], r["dtype"]): r["bytes_per_param"] for r in ds}
    assert bpp[("step", "fp32")] == 28 and bpp[("step", "bf16")] == 22
    for r in ds:
        assert r["speedup_vs_torch_fused"] > 0 and r["held_bytes"] > 0


def test_deepspeed_that_fails_to_build_its_op_is_a_row_error(monkeypatch):
    # DeepSpeed compiles its CPU Adam op at construction; a missing compiler or ninja must not
    # take the whole bench down
    _fake_deepspeed(monkeypatch, fail_with=ImportError("ninja is required to load C++ extensions"))
    res = _ds_suite()
    ds = [r for r in res["rows"] if r["impl"] == "deepspeed-cpuadam"]
    assert ds and all(r["status"] == "error" and "ninja" in r["reason"] for r in ds)
    assert all(r["status"] == "ok" for r in res["rows"] if r["impl"] == "torch-fused")


def test_readme_says_how_to_compare_with_deepspeed():
    readme = (ROOT / "README.md").read_text()
    assert "pip install deepspeed" in readme
