"""``fastaccum plan``: the arithmetic by hand, a real (tiny) module, --measure on CPU, bad input."""
from __future__ import annotations

import json
import math
import textwrap

import pytest

from fastaccum.tools import plan as P
from fastaccum.tools.units import parse_count
from test_cli import run_cli, run_inproc

TINY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, d=16, depth=1):
            super().__init__()
            self.d = d
            self.body = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.body(x)

        def example_input(self, batch_size):
            return torch.randn(batch_size, self.d)

    class Wide(nn.Module):
        # activations large enough (~8 KB/sample) for RSS to see them on CPU
        def __init__(self, d=256):
            super().__init__()
            self.d = d
            self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(d, d), nn.GELU())])

        def forward(self, x):
            return self.body(x)

    def tiny():
        return Tiny()

    def wide():
        return Wide()

    def wide_input(batch_size):
        return torch.randn(batch_size, 256)

    def not_a_module():
        return 42

    def broken():
        raise RuntimeError("no weights here")
    """
)


@pytest.fixture()
def models(tmp_path, monkeypatch):
    (tmp_path / "tinymods.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize("text, n", [("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20),
                                     ("1.5gb", 1_500_000_000), ("1e9", 10**9), ("300 MB", 300 * 10**6),
                                     # a bare SI prefix means what the SI unit means: 6G = 6GB, never 6GiB
                                     ("6G", 6 * 10**9), ("6g", 6 * 10**9), ("512M", 512 * 10**6), ("2T", 2 * 10**12)])
def test_parse_memory(text, n):
    assert P.parse_memory(text) == n


@pytest.mark.parametrize("text", ["6XB", "-5GB", "0GB", "lots", "", "6 G B"])
def test_parse_memory_rejects(text):
    with pytest.raises(P.PlanError, match="--memory"):
        P.parse_memory(text)


@pytest.mark.parametrize("target, max_micro, expect", [
    (64, 100, (64, 1)),      # fits: no accumulation
    (256, 11, (8, 32)),      # the target exactly: 8 x 32 = 256, not 11 x 24 = 264
    (100, 48, (25, 4)),      # the largest micro-batch that fits and divides 100
    (256, 5, (4, 64)),       # not 5 x 52 = 260
    (7, 2, (1, 7)),          # prime target: 1 x 7, exact (2 x 4 = 8 would change the batch)
    (10, 0, (0, 0)),         # nothing fits
])
def test_split_batch_hits_the_target_exactly(target, max_micro, expect):
    micro, accum = P.split_batch(target, max_micro)
    assert (micro, accum) == expect
    if micro:
        assert micro <= max_micro and micro * accum == target


def test_beta2_half_life_rule():
    # Marek et al. 2025: beta2* = beta2 ** (B*/B) keeps the token half-life of exp_avg_sq
    b = P.beta2_for(0.999, 8, 256)
    assert b == pytest.approx(0.999 ** (1 / 32))
    hl_ref = P.half_life_tokens(0.999, 256, 1024)
    hl_new = P.half_life_tokens(b, 8, 1024)
    assert hl_new == pytest.approx(hl_ref, rel=1e-9)
    assert hl_ref == pytest.approx(math.log(0.5) / math.log(0.999) * 256 * 1024)


def test_activation_formula_by_hand():
    spec = P.ModelSpec(params=124_000_000, layers=12, hidden=768, seq_len=1024, vocab=50257, heads=12)
    s, h, L, V, a = 1024, 768, 12, 50257, 12
    # Korthikanti et al. 2022 eq. (2) per layer + fp32 logits + final LN input + embedding dropout mask
    assert P.activation_bytes_per_sequence(spec, 16, "eager") == L * s * h * (34 + 5 * a * s / h) + 4 * s * V + 2 * s * h + s * h
    assert P.activation_bytes_per_sequence(spec, 16, "flash") == L * s * h * 34 + 4 * s * V + 2 * s * h + s * h
    assert P.activation_bytes_per_sequence(spec, 32, "flash") == L * s * h * 66 + 4 * s * V + 4 * s * h + s * h


def test_gpt2_param_count():
    assert P.gpt_param_count(12, 768, 50257, 1024) == pytest.approx(124.4e6, rel=1e-3)


# ------------------------------------------------------------- a real module
def test_plan_tiny_module_matches_hand_computation(models, capsys):
    out = models / "plan.json"
    rc, stdout, err = run_inproc(capsys, "plan", "--model", "tinymods:tiny", "--layers", "2", "--hidden", "32",
                                 "--seq-len", "8", "--vocab", "4", "--memory", "1MB", "--headroom", "0",
                                 "--batch", "100", "--json", str(out))
    assert rc == 0, err
    res = json.loads(out.read_text())
    n = 16 * 32 + 32 + 32 * 4 + 4  # 676 parameters, largest tensor 16 x 32
    assert res["model"]["params"] == n and res["model"]["largest_tensor"] == 512
    s, h, L, V = 8, 32, 2, 4
    act16 = L * s * h * 34 + 4 * s * V + 2 * s * h + s * h
    act32 = L * s * h * 66 + 4 * s * V + 4 * s * h + s * h
    assert res["activations"]["bytes_per_sequence_16bit"] == act16
    assert res["activations"]["bytes_per_sequence_32bit"] == act32
    budget = 10**6
    hand = {  # (params, grads, master, state, transient, activation bytes per sequence)
        "torch-fp32": (4 * n, 4 * n, 0, 8 * n, 0, act32),
        "torch-bf16": (2 * n, 2 * n, 0, 4 * n, 0, act16),
        "fastaccum-fp32": (4 * n, 4 * n, 0, 8 * n, 4 * 512, act32),  # + autograd's fresh grad before the copy
        # + the batched fold's held bf16 gradients: all of them, fewer bytes than its 32 MiB cap
        "fastaccum-bf16-master": (2 * n, 4 * n, 4 * n, 8 * n, 2 * 512 + 2 * n, act16),
        "fastaccum-bf16-sr": (2 * n, 4 * n, 0, 8 * n, 2 * 512 + 2 * n, act16),
        "fastaccum-step-in-backward": (4 * n, 0, 0, 8 * n, 4 * 512, act32),  # no buffer; one fp32 grad at a time
    }
    modes = {m["mode"]: m for m in res["modes"]}
    assert set(modes) == set(hand)
    for key, (pb, gb, mb, sb, tb, act) in hand.items():
        m = modes[key]
        assert (m["params_bytes"], m["grads_bytes"], m["master_bytes"], m["state_bytes"], m["transient_bytes"]) == (
            pb, gb, mb, sb, tb), key
        static = pb + gb + mb + sb + tb
        assert m["static_bytes"] == static
        max_micro = (budget - static) // act
        assert m["max_micro_batch"] == max_micro, key
        accum = 1 if key.endswith("step-in-backward") else math.ceil(100 / max_micro)
        assert m["accumulation_steps"] == accum, key
        assert m["micro_batch"] * accum >= 100 or key.endswith("step-in-backward")
    # the recommended mode (bf16 + master by default) and the beta2 rescale for its batch
    rec = res["recommendation"]
    chosen = modes["fastaccum-bf16-master"]
    assert rec["micro_batch"] == chosen["micro_batch"] and rec["accumulation_steps"] == chosen["accumulation_steps"]
    assert rec["beta2"]["without_accumulation"] == pytest.approx(0.999 ** (chosen["micro_batch"] / 100))
    assert any("Marek" in note and "without accumulation" in note for note in rec["notes"])
    assert "fastaccum bf16+master" in stdout and "fastaccum step-in-bwd" in stdout


def test_plan_from_shape_numbers_and_tokens(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, stdout, err = run_inproc(capsys, "plan", "--layers", "12", "--hidden", "768", "--seq-len", "1024",
                                 "--vocab", "50257", "--memory", "24GB", "--tokens", "0.5M", "--json", str(out))
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["model"]["params"] == P.gpt_param_count(12, 768, 50257, 1024)
    assert res["target"]["batch_sequences"] == math.ceil(500_000 / 1024)
    assert "beta2" in stdout and "Korthikanti" in stdout


def test_plan_no_accumulation_needed_note(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, _, err = run_inproc(capsys, "plan", "--params", "10M", "--layers", "4", "--hidden", "256",
                            "--seq-len", "128", "--memory", "8GB", "--batch", "8", "--json", str(out))
    assert rc == 0, err
    rec = json.loads(out.read_text())["recommendation"]
    assert rec["accumulation_steps"] == 1 and any("no accumulation needed" in n for n in rec["notes"])
    assert rec["beta2"]["for_chosen_batch"] == pytest.approx(0.999)


# ---------------------------------------------------------------- --measure
def test_plan_measure_on_cpu_finds_a_batch_under_the_budget(models):
    out = models / "m.json"
    budget = 16 * 10**6
    proc = run_cli("plan", "--model", "tinymods:wide", "--input", "tinymods:wide_input", "--measure",
                   "--memory", "16MB", "--headroom", "0", "--batch", "4096", "--dtype", "fp32",
                   "--json", str(out), cwd=models, timeout=180)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    meas = res["activations"]["measured"]
    assert meas["largest_batch_measured"] >= 64
    assert res["activations"]["source"].startswith("measured")
    runs = [r for r in meas["runs"] if r["activation_bytes"] is not None]
    assert runs and all(r["total_bytes"] <= budget for r in runs)  # never ran past the budget
    # the batch the plan recommends was measured (or is below one that was) and fits
    rec = res["recommendation"]
    assert 1 <= rec["micro_batch"] <= max(meas["largest_batch_measured"], rec["micro_batch"])
    fitted = meas["static_bytes"] + meas["fixed_bytes"] + meas["per_sample_bytes"] * rec["micro_batch"]
    assert fitted <= budget
    # larger batches cost more: the fitted slope is at least the bytes of the stored activations
    # (4 Linear inputs + 4 GELU inputs of 256 fp32 each = 8 KiB per sample)
    assert meas["per_sample_bytes"] >= 0.5 * 8 * 256 * 4


# ---------------------------------------------------------------- bad input
BAD_PLAN = [
    (["--params", "124M", "--layers", "12", "--hidden", "768", "--seq-len", "1024", "--memory", "6XB"], "unknown unit"),
    (["--params=-5", "--memory", "6GB"], "--params"),
    (["--params", "124M", "--layers", "0", "--memory", "6GB"], "--layers"),
    (["--params", "1B", "--layers", "12", "--hidden", "768", "--seq-len", "1024", "--memory", "1GB"], "parameters alone"),
    (["--params", "124M", "--layers", "12", "--hidden", "768", "--seq-len", "1024", "--memory", "-6GB"],
     "memory must be > 0"),
    (["--memory", "6GB"], "give the model"),
    (["--params", "124M", "--layers", "2", "--hidden", "64", "--seq-len", "8", "--memory", "6GB", "--headroom", "1.5"], "--headroom"),
    (["--params", "124M", "--layers", "2", "--hidden", "64", "--seq-len", "8", "--memory", "6GB", "--beta2", "1"], "--beta2"),
    (["--params", "124M", "--layers", "2", "--hidden", "64", "--memory", "6GB", "--tokens", "1M"], "--"),
    (["--params", "124M", "--layers", "2", "--hidden", "64", "--seq-len", "8", "--memory", "6GB", "--measure"], "--model"),
    (["--model", "nosuchmodule:factory", "--memory", "6GB"], "cannot import"),
    (["--model", "tinymods", "--memory", "6GB"], "module:factory"),
    (["--model", "tinymods:missing", "--memory", "6GB"], "no attribute"),
    (["--model", "tinymods:not_a_module", "--memory", "6GB"], "not a torch.nn.Module"),
    (["--model", "tinymods:broken", "--memory", "6GB"], "no weights here"),
    (["--model", "tinymods:wide", "--measure", "--memory", "6GB"], "--input"),
    (["--params", "124M", "--layers", "2", "--hidden", "64", "--seq-len", "8", "--memory", "6GB", "--batch", "0"], "--batch"),
]


@pytest.mark.parametrize("args, needle", BAD_PLAN)
def test_plan_bad_input_exits_2_with_one_line(models, capsys, args, needle):
    rc, _, err = run_inproc(capsys, "plan", *args)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], err


def test_plan_bad_input_through_the_real_entry_point():
    proc = run_cli("plan", "--params", "124M", "--memory", "6XB", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--memory" in proc.stderr


# ------------------------------------------------ the commands users type first
@pytest.mark.parametrize("args, name, layers, hidden, heads, seq_len", [
    (["--params", "350M", "--memory", "6GB", "--seq-len", "2048", "--batch", "64"], "GPT-3 Medium", 24, 1024, 16, 2048),
    (["--params", "1.5B", "--memory", "24GB"], "GPT-2 XL", 48, 1600, 25, 1024),
    (["--params", "124M", "--memory", "6GB"], "GPT-2 small", 12, 768, 12, 1024),
    (["--params", "7B", "--memory", "80GB"], "GPT-3 6.7B", 32, 4096, 32, 2048),
])
def test_plan_infers_a_standard_shape_from_the_parameter_count(capsys, tmp_path, args, name, layers, hidden,
                                                               heads, seq_len):
    out = tmp_path / "p.json"
    rc, stdout, err = run_inproc(capsys, "plan", *args, "--json", str(out))
    assert rc in (0, 1), err  # 1: valid plan, nothing fits
    m = json.loads(out.read_text())["model"]
    assert (m["layers"], m["hidden"], m["heads"], m["seq_len"], m["vocab"]) == (layers, hidden, heads, seq_len, 50257)
    assert m["params"] == parse_count(args[1])  # state memory uses the count given, not the table's
    assert all(name in m["inferred"][k] for k in ("layers", "hidden", "heads", "vocab"))
    assert ("seq_len" in m["inferred"]) == ("--seq-len" not in args)
    assert name in stdout and "nearest" in stdout  # the output says which shape it assumed
    if "--seq-len" not in args:
        assert "seq-len from default" in stdout


def test_plan_keeps_given_shape_numbers_and_tokens_need_a_real_seq_len(capsys, tmp_path):
    out = tmp_path / "p.json"
    rc, _, err = run_inproc(capsys, "plan", "--params", "350M", "--layers", "20", "--seq-len", "512",
                            "--memory", "24GB", "--json", str(out))
    assert rc == 0, err
    m = json.loads(out.read_text())["model"]
    assert (m["layers"], m["hidden"], m["seq_len"]) == (20, 1024, 512) and "layers" not in m["inferred"]
    # a defaulted sequence length must not silently turn --tokens into sequences
    rc, _, err = run_inproc(capsys, "plan", "--params", "350M", "--memory", "24GB", "--tokens", "1M")
    assert rc == 2 and "--seq-len" in err


def _tiny_spec(**kw):
    # 1M params, activations 1 MB per sequence (16-bit): max micro-batch = (usable - static) // 1 MB
    return P.ModelSpec(params=1_000_000, layers=1, hidden=100, seq_len=10, **kw)


def test_plan_hits_the_target_exactly_when_it_can():
    spec = _tiny_spec()
    per_seq = P.activation_bytes_per_sequence(spec, 16)
    # fastaccum bf16 + master (18 B/param) + every bf16 gradient held for the batched fold (2,
    # fewer bytes than its cap); no in-flight copy (largest_tensor unknown)
    static = 20 * spec.params
    memory = static + 11 * per_seq + per_seq // 2  # room for 11 sequences, not 12
    res = P.plan(P.PlanInput(spec=spec, memory_bytes=memory, memory_source="test", target_batch=256, headroom=0))
    rec = res["recommendation"]
    chosen = next(m for m in res["modes"] if m["mode"] == res["chosen_mode"])
    assert chosen["max_micro_batch"] == 11
    assert (rec["micro_batch"], rec["accumulation_steps"], rec["effective_batch"]) == (8, 32, 256)
    assert chosen["exact"] is True


def test_plan_says_when_the_target_cannot_be_hit_exactly():
    spec = _tiny_spec()
    res = P.plan(P.PlanInput(spec=spec, memory_bytes=10**9, memory_source="test", target_batch=257, devices=2))
    rec = res["recommendation"]
    assert rec["effective_batch"] == 258
    assert any("cannot be hit exactly" in n and "257" in n for n in rec["notes"])


def test_plan_says_beta2_once_when_the_batches_are_equal(capsys):
    rc, out, err = run_inproc(capsys, "plan", "--params", "10M", "--layers", "4", "--hidden", "256",
                              "--seq-len", "128", "--memory", "8GB", "--batch", "8")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("beta2"))
    assert "at batch 8" in line and "without accumulation" not in line and line.count("0.999 at batch") == 1


def test_plan_rescales_beta2_in_one_function(monkeypatch):
    # beta2_for is the single place the rule lives (to be swapped for the library's own)
    calls = []
    monkeypatch.setattr(P, "beta2_for", lambda b, batch, ref: calls.append((b, batch, ref)) or 0.5)
    res = P.plan(P.PlanInput(spec=_tiny_spec(), memory_bytes=10**9, memory_source="test", target_batch=64))
    b = res["recommendation"]["beta2"]
    assert b["for_chosen_batch"] == 0.5 and b["without_accumulation"] == 0.5 and len(calls) == 2


def test_plan_measured_activations_are_one_labelled_figure(capsys):
    from fastaccum.tools.cli import print_plan

    measured = {"per_sample_bytes": 3_630_000.0, "fixed_bytes": 0.0, "dtype": "float32", "device": "cpu"}
    res = P.plan(P.PlanInput(spec=_tiny_spec(), memory_bytes=10**9, memory_source="test", target_batch=8,
                             measured=measured))
    capsys.readouterr()
    print_plan(res)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("activations"))
    assert line.count("3.63 MB") == 1 and "16-bit" not in line and "measured" in line and "float32" in line


@pytest.mark.parametrize("form", [["--memory", "-6GB"], ["--memory=-6GB"]])
def test_plan_negative_memory_same_message_both_spellings(capsys, form):
    rc, _, err = run_inproc(capsys, "plan", "--params", "124M", *form)
    assert rc == 2 and err.strip() == "fastaccum plan: error: --memory '-6GB': memory must be > 0 (e.g. 6GB)"


def test_plan_counts_the_batched_fold_cap(monkeypatch):
    """bf16 modes hold up to the batched fold's cap of bf16 gradients during backward: 1 % of the
    device memory (the optimizer's default on a GPU), or FASTACCUM_FOLD_CAP_MB; fp32 modes none."""
    monkeypatch.delenv("FASTACCUM_FOLD_CAP_MB", raising=False)
    spec = P.ModelSpec(params=1_300_000_000, layers=24, hidden=2048, seq_len=2048, largest_tensor=50257 * 2048)
    for memory, cap in ((80 * 10**9, 8 * 10**8), (3 * 10**9, 32 * 2**20)):
        modes = {m["mode"]: m for m in P.plan(P.PlanInput(spec=spec, memory_bytes=memory, memory_source="test"))["modes"]}
        assert modes["fastaccum-bf16-master"]["transient_bytes"] == 2 * spec.largest_tensor + cap
        assert modes["fastaccum-bf16-sr"]["transient_bytes"] == 2 * spec.largest_tensor + cap
        assert modes["fastaccum-fp32"]["transient_bytes"] == 4 * spec.largest_tensor
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", "0")  # the per-parameter fold holds nothing more
    modes = {m["mode"]: m for m in P.plan(P.PlanInput(spec=spec, memory_bytes=80 * 10**9, memory_source="test"))["modes"]}
    assert modes["fastaccum-bf16-master"]["transient_bytes"] == 2 * spec.largest_tensor
