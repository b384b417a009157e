"""Bucket kernels (fastaccum.backends.triton_kernels) against the torch backend and a plain
Python model of finalize. Under TRITON_INTERPRET=1 on CPU tensors here; on CUDA tensors when a
GPU is present.

fp32: assert_close(rtol=1e-5, atol=1e-6); bf16/fp16: error against an fp64 reference at most
2x the torch backend's error in the same dtype."""
import contextlib
import copy
import math
import struct

import pytest
import torch

triton = pytest.importorskip("triton")

import fastaccum  # noqa: E402
from fastaccum.backends import AdamHyper, AdamSegments, SGDHyper, SGDSegments  # noqa: E402
from fastaccum.backends import triton_kernels as K  # noqa: E402
from fastaccum.reference import adam_math  # noqa: E402
from conftest import fp64_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH = fastaccum.get_backend("torch")


def _round_up(n, k=K.ALIGN):
    return (n + k - 1) // k * k


class Bucket:
    """Scattered parameters and flat fp32 grad / state with 16-aligned offsets, like buffers.Bucket."""

    def __init__(self, sizes, pdtype=torch.float32, sdtype=torch.float32, master=False, amsgrad=False,
                 momentum=False, seed=0, device=DEVICE):
        g = torch.Generator().manual_seed(seed)
        self.numels = list(sizes)
        self.offsets, total = [], 0
        for n in sizes:
            self.offsets.append(total)
            total += _round_up(max(n, 1))
        self.total = total
        p32 = [torch.randn(n, generator=g) for n in sizes]
        self.params = [p.to(pdtype).to(device) for p in p32]
        self.grad = torch.zeros(total, device=device)
        flat = lambda dt: torch.zeros(total, dtype=dt, device=device)  # noqa: E731
        self.m, self.v = flat(sdtype), flat(sdtype)
        self.vmax = flat(sdtype) if amsgrad else None
        self.master = flat(torch.float32) if master else None
        self.buf = flat(sdtype) if momentum else None
        for i, n in enumerate(sizes):
            o = self.offsets[i]
            self.m[o:o + n] = (torch.randn(n, generator=g) * 0.1).to(sdtype)
            self.v[o:o + n] = (torch.rand(n, generator=g) * 0.01).to(sdtype)
            if amsgrad:
                self.vmax[o:o + n] = (torch.rand(n, generator=g) * 0.01).to(sdtype)
            if master:
                self.master[o:o + n] = p32[i]
            if momentum:
                self.buf[o:o + n] = (torch.randn(n, generator=g) * 0.1).to(sdtype)

    def view(self, flat, i):
        return None if flat is None else flat[self.offsets[i]:self.offsets[i] + self.numels[i]]

    def clone(self):
        return copy.deepcopy(self)


def _fill_grads(b, step, fresh_map, scale=100.0):
    """This window's raw gradient in fresh segments; garbage (must be read as zero) in stale ones."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, n in enumerate(b.numels):
        vals = torch.randn(n, generator=g) * scale
        b.view(b.grad, i).copy_(vals if fresh_map[i] else torch.full((n,), 3e4))


# ------------------------------------------------------------------ helpers: run a kernel step
def _kernel_step(b, table, steps, window, *, hp, which="adam", divisor=1.0, max_norm=None, dynamic=False):
    bs_parts = torch.empty(table.n_tiles, device=b.grad.device)
    K.sumsq(table, b.grad, bs_parts, 0)
    idx = K.step_index_for([table], b.grad.device)
    K.finalize(bs_parts, window, steps, idx, weight_divisor=divisor, max_norm=max_norm, dynamic=dynamic)
    if which == "adam":
        K.adam_(table, b.grad, b.m, b.v, b.vmax, b.master, steps, window, **hp)
    else:
        K.sgd_(table, b.grad, b.buf, b.master, steps, window, **hp)


def _py_multiplier(b, segs, fresh, loss_scale, divisor, max_norm):
    sq = sum(float(b.view(b.grad, i).double().pow(2).sum()) for i, f in zip(segs, fresh) if f)
    inv = 1.0 / (loss_scale * divisor)
    coef = 1.0 if not max_norm else min(1.0, max_norm / (math.sqrt(sq) * inv + 1e-6))
    return inv * coef, sq


def _torch_adam_step(b, segs, fresh, steps_host, mult, hp, stochastic):
    grads = [b.view(b.grad, i).clone() if f else torch.zeros_like(b.view(b.grad, i)) for i, f in zip(segs, fresh)]
    segs_obj = AdamSegments(
        params=[b.params[i] for i in segs], grads=grads, exp_avgs=[b.view(b.m, i) for i in segs],
        exp_avg_sqs=[b.view(b.v, i) for i in segs],
        max_exp_avg_sqs=[b.view(b.vmax, i) for i in segs] if b.vmax is not None else None,
        masters=[b.view(b.master, i) for i in segs] if b.master is not None else None,
        steps=[steps_host[i] for i in segs])
    TORCH.adam_(segs_obj, AdamHyper(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                                    weight_decay=hp["weight_decay"], decoupled=hp["decoupled"],
                                    maximize=hp.get("maximize", False), grad_multiplier=mult,
                                    stochastic_rounding=stochastic, seed=0))


def _schedule(n_params, steps, seed=0):
    """Per step: the listed segments and their fresh flags (stale, fresh and unlisted mixes)."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        segs = [i for i in range(n_params) if t < 2 or torch.rand(1, generator=rng).item() < 0.8] or [0]
        fresh = [bool(t % 3 != 2 or torch.rand(1, generator=rng).item() < 0.5) for _ in segs]
        out.append((segs, fresh))
    return out


def _compare_adam(sizes, steps_n, pdtype, sdtype, master, amsgrad, decoupled, maximize, max_norm, lr_tensor=False):
    a = Bucket(sizes, pdtype, sdtype, master, amsgrad, seed=len(sizes))
    ref = a.clone()
    steps = torch.zeros(len(sizes), device=DEVICE)
    steps_host = [0] * len(sizes)
    window = K.new_window_state(DEVICE, loss_scale=4.0)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=decoupled, maximize=maximize)
    khp = dict(hp, lr=torch.tensor(1e-2, device=DEVICE) if lr_tensor else 1e-2, seed=7)
    for t, (segs, fresh) in enumerate(_schedule(len(sizes), steps_n)):
        fresh_map = {i: f for i, f in zip(segs, fresh)}
        _fill_grads(a, t, [fresh_map.get(i, False) for i in range(len(sizes))])
        ref.grad.copy_(a.grad)
        table = K.SegmentTable.build(a.params, a.offsets, a.numels, segs, fresh, segs)
        grad_before = a.grad.clone()
        _kernel_step(a, table, steps, window, hp=khp, divisor=3.0, max_norm=max_norm)
        assert torch.equal(a.grad, grad_before), "the update only reads the gradient"
        mult, _ = _py_multiplier(ref, segs, fresh, 4.0, 3.0, max_norm)
        for i in segs:
            steps_host[i] += 1
        _torch_adam_step(ref, segs, fresh, steps_host, mult, hp, stochastic=False)
        assert steps.tolist() == [float(s) for s in steps_host]
    return a, ref


def _assert_bucket_close(a, ref, **tol):
    for i in range(len(a.numels)):
        torch.testing.assert_close(a.params[i], ref.params[i], **tol, msg=f"param {i}")
        for name in ("m", "v", "vmax", "master"):
            x, y = a.view(getattr(a, name), i), ref.view(getattr(ref, name), i)
            if x is not None:
                torch.testing.assert_close(x, y, **tol, msg=f"{name} {i}")


# ------------------------------------------------------------------ Adam fp32 parity
@pytest.mark.parametrize("sizes", [(1,), (7,), (4097,), (1, 7, 4097, 33, 2048, 2049)], ids=str)
@pytest.mark.parametrize("decoupled,amsgrad,maximize,max_norm", [
    (True, False, False, None), (False, True, True, 0.5), (True, True, False, 1e9)])
def test_adam_fp32_matches_torch_backend(sizes, decoupled, amsgrad, maximize, max_norm):
    a, ref = _compare_adam(sizes, 12, torch.float32, torch.float32, False, amsgrad, decoupled, maximize, max_norm)
    _assert_bucket_close(a, ref, rtol=1e-5, atol=1e-6)


def test_adam_tensor_lr_matches_float_lr():
    a, ref = _compare_adam((7, 4097), 10, torch.float32, torch.float32, False, False, True, False, 1.0, lr_tensor=True)
    _assert_bucket_close(a, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adam_fp32_large_segment():
    a, ref = _compare_adam((1_000_003, 5), 10, torch.float32, torch.float32, False, False, True, False, 1.0)
    _assert_bucket_close(a, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ low precision: error vs fp64
@pytest.mark.parametrize("pdtype,master,sdtype", [
    (torch.bfloat16, True, torch.float32),
    (torch.float16, True, torch.float32),
    (torch.bfloat16, False, torch.float32),
    (torch.float32, False, torch.bfloat16),
    (torch.bfloat16, True, torch.bfloat16),
])
def test_adam_low_precision_error_at_most_twice_torch(pdtype, master, sdtype):
    sizes = (4097, 7, 1)
    steps_n = 10
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    a = Bucket(sizes, pdtype, sdtype, master, seed=3)
    b = a.clone()
    ref = {k: getattr(a, k).double() if getattr(a, k) is not None else None for k in ("m", "v", "master")}
    p64 = [(b.view(b.master, i) if master else b.params[i]).double().clone() for i in range(len(sizes))]
    m64 = [b.view(b.m, i).double().clone() for i in range(len(sizes))]
    v64 = [b.view(b.v, i).double().clone() for i in range(len(sizes))]
    steps = torch.zeros(len(sizes), device=DEVICE)
    window = K.new_window_state(DEVICE)
    segs, fresh = list(range(len(sizes))), [True] * len(sizes)
    table = K.SegmentTable.build(a.params, a.offsets, a.numels, segs, fresh, segs)
    stochastic = sdtype == torch.bfloat16 or not master
    for t in range(steps_n):
        _fill_grads(a, t, fresh, scale=1.0)
        b.grad.copy_(a.grad)
        _kernel_step(a, table, steps, window, hp=dict(hp, seed=100 + t))
        torch.manual_seed(t)
        _torch_adam_step(b, segs, fresh, [t + 1] * len(sizes), 1.0, hp, stochastic)
        for i in segs:
            adam_math(p64[i], a.view(a.grad, i).double(), m64[i], v64[i], None, step=t + 1, grad_multiplier=1.0,
                      maximize=False, **hp)
    for name, getter in (("param", lambda x, i: x.params[i]), ("m", lambda x, i: x.view(x.m, i)),
                         ("v", lambda x, i: x.view(x.v, i))):
        r = {"param": p64, "m": m64, "v": v64}[name]
        ea = sum(fp64_error(getter(a, i), r[i]) for i in segs)
        eb = sum(fp64_error(getter(b, i), r[i]) for i in segs)
        assert ea <= 2 * eb + 1e-12, f"{name}: kernel error {ea:.3g} vs torch backend {eb:.3g}"
    del ref


# ------------------------------------------------------------------ SGD parity
@pytest.mark.parametrize("sizes", [(1,), (7, 4097, 33)], ids=str)
@pytest.mark.parametrize("momentum,dampening,nesterov,maximize", [
    (0.0, 0.0, False, False), (0.9, 0.0, False, True), (0.9, 0.1, True, False)])
def test_sgd_matches_torch_backend(sizes, momentum, dampening, nesterov, maximize):
    a = Bucket(sizes, momentum=bool(momentum), seed=5)
    ref = a.clone()
    steps = torch.zeros(len(sizes), device=DEVICE)
    steps_host = [0] * len(sizes)
    window = K.new_window_state(DEVICE)
    for t, (segs, fresh) in enumerate(_schedule(len(sizes), 10, seed=1)):
        fresh_map = {i: f for i, f in zip(segs, fresh)}
        _fill_grads(a, t, [fresh_map.get(i, False) for i in range(len(sizes))], scale=1.0)
        ref.grad.copy_(a.grad)
        table = K.SegmentTable.build(a.params, a.offsets, a.numels, segs, fresh, segs)
        _kernel_step(a, table, steps, window, which="sgd", divisor=2.0,
                     hp=dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.01,
                             maximize=maximize))
        for i in segs:
            steps_host[i] += 1
        grads = [ref.view(ref.grad, i).clone() if f else torch.zeros(ref.numels[i], device=DEVICE)
                 for i, f in zip(segs, fresh)]
        TORCH.sgd_(SGDSegments([ref.params[i] for i in segs], grads,
                               [ref.view(ref.buf, i) for i in segs] if momentum else None, None,
                               [steps_host[i] for i in segs]),
                   SGDHyper(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.01,
                            maximize=maximize, grad_multiplier=0.5, stochastic_rounding=False, seed=0))
    for i in range(len(sizes)):
        torch.testing.assert_close(a.params[i], ref.params[i], rtol=1e-5, atol=1e-6)
        if momentum:
            torch.testing.assert_close(a.view(a.buf, i), ref.view(ref.buf, i), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ finalize semantics
class PyWindow:
    """The plain Python model of finalize (GradScaler's update rules, torch's clip formula)."""

    def __init__(self, loss_scale):
        self.scale, self.tracker, self.skipped = loss_scale, 0, 0

    def step(self, sq, divisor, max_norm, ext_scale, found_inf, dynamic, growth_interval):
        inv = 1.0 / (self.scale * ext_scale * divisor)
        norm = math.sqrt(sq) * inv
        nonfinite = not math.isfinite(sq) or found_inf
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0
        out = dict(norm=norm, skip=nonfinite, multiplier=inv * coef, coef=coef)
        if dynamic:
            if nonfinite:
                self.scale *= 0.5
                self.tracker = 0
            else:
                self.tracker += 1
                if self.tracker == growth_interval:
                    self.scale *= 2.0
                    self.tracker = 0
        self.skipped += int(nonfinite)
        return out


def test_finalize_matches_python_model():
    torch.manual_seed(0)
    n_steps = 4
    steps = torch.zeros(n_steps, device=DEVICE)
    index = torch.tensor([0, 2, 3], device=DEVICE)
    window = K.new_window_state(DEVICE, loss_scale=1024.0)
    py = PyWindow(1024.0)
    expected_steps = [0.0] * n_steps
    cases = [  # (partials, divisor, max_norm, ext_scale, found_inf)
        ([1.0, 4.0, 0.25], 3.0, 1.0, None, None),
        ([100.0] * 2500, 2.0, None, None, None),  # more partials than one finalize block
        ([1.0, float("inf")], 1.0, 1.0, None, None),
        ([1.0, float("nan")], 1.0, None, None, None),
        ([2.0], 1.0, 1e-3, 8.0, None),
        ([2.0], 1.0, None, None, 1.0),  # another rank / GradScaler saw inf
        ([2.0], 1.0, 0.0, None, 0.0),
        ([2.0], 5.0, 1.0, None, None),
        ([2.0], 5.0, 1.0, None, None),
    ]
    for parts, div, max_norm, ext, fi in cases:
        p = torch.tensor(parts, dtype=torch.float32, device=DEVICE)
        K.finalize(p, window, steps, index, weight_divisor=div, max_norm=max_norm,
                   grad_scale=None if ext is None else torch.tensor(ext, device=DEVICE),
                   found_inf=None if fi is None else torch.tensor(fi, device=DEVICE), dynamic=True, growth_interval=2)
        sq = float(torch.tensor(parts, dtype=torch.float64).sum())
        exp = py.step(sq, div, max_norm, ext or 1.0, bool(fi), True, 2)
        w = window.tolist()
        assert w[K.W_SKIP] == float(exp["skip"]) == w[K.W_FOUND_INF]
        assert w[K.W_LOSS_SCALE] == py.scale and w[K.W_GROWTH_TRACKER] == py.tracker
        assert w[K.W_SKIPPED] == py.skipped
        if not exp["skip"]:
            assert w[K.W_NORM] == pytest.approx(exp["norm"], rel=1e-6)
            assert w[K.W_MULTIPLIER] == pytest.approx(exp["multiplier"], rel=1e-6)
            assert w[K.W_CLIP_COEF] == pytest.approx(exp["coef"], rel=1e-6)
            for i in (0, 2, 3):
                expected_steps[i] += 1
        assert steps.tolist() == expected_steps


def test_finalize_tensor_divisor_no_partials_and_static_scale():
    steps = torch.zeros(2, device=DEVICE)
    window = K.new_window_state(DEVICE, loss_scale=8.0)
    K.finalize(None, window, steps, torch.tensor([1], device=DEVICE),
               weight_divisor=torch.tensor([4.0], device=DEVICE), check_finite=False)
    w = window.tolist()
    assert w[K.W_MULTIPLIER] == 1.0 / 32 and w[K.W_LOSS_SCALE] == 8.0 and w[K.W_SKIP] == 0.0
    assert steps.tolist() == [0.0, 1.0]


def test_skip_changes_nothing_but_scale_and_counter():
    a = Bucket((7, 4097), amsgrad=True, seed=9)
    before = a.clone()
    steps = torch.tensor([3.0, 5.0], device=DEVICE)
    window = K.new_window_state(DEVICE, loss_scale=2.0**16)
    segs = [0, 1]
    table = K.SegmentTable.build(a.params, a.offsets, a.numels, segs, [True, True], segs)
    _fill_grads(a, 0, [True, True])
    a.grad[a.offsets[1] + 100] = float("nan")
    grad = a.grad.clone()
    _kernel_step(a, table, steps, window, dynamic=True,
                 hp=dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, seed=1))
    w = window.tolist()
    assert w[K.W_SKIP] == 1.0 and w[K.W_SKIPPED] == 1.0 and w[K.W_LOSS_SCALE] == 2.0**15
    assert steps.tolist() == [3.0, 5.0]
    assert torch.equal(a.grad.nan_to_num(), grad.nan_to_num())
    for i in range(2):
        assert torch.equal(a.params[i], before.params[i])
    for name in ("m", "v", "vmax"):
        assert torch.equal(getattr(a, name), getattr(before, name))


# ------------------------------------------------------------------ accumulate
@pytest.mark.parametrize("n", [1, 7, 4097, pytest.param(1_000_003, marks=pytest.mark.slow)])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_matches_torch_backend(n, src_dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(n, generator=g).to(src_dtype).to(DEVICE)
    a = torch.randn(n, generator=g).to(DEVICE)
    b = a.clone()
    parts = torch.full((triton.cdiv(n, K.BLOCK),), -1.0, device=DEVICE)
    K.accumulate_(a, src, 0.5, sumsq_out=parts)
    TORCH.accumulate_(b, src, 0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.double().sum(), src.double().pow(2).sum(), rtol=1e-5, atol=1e-6)
    K.accumulate_(a, src, -0.5)  # without the side output
    TORCH.accumulate_(b, src, -0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bf16 rounding keeps NaN/inf
NAN_PAYLOADS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFF800001]


def _from_bits(words):
    return torch.tensor([struct.unpack("<f", struct.pack("<I", w))[0] for w in words], dtype=torch.float32)


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_rounding_keeps_nan_and_inf(stochastic):
    """fp32 NaNs of any payload, and infs, rounded into bf16: nearest-even (bf16 params from
    their fp32 master) and stochastic (bf16 exp_avg from an fp32 gradient, inf check off so the
    update runs)."""
    specials = torch.cat([_from_bits(NAN_PAYLOADS), torch.tensor([float("inf"), -float("inf"), 3.4e38, -0.0, 1.0])])
    n = specials.numel()
    steps = torch.zeros(1, device=DEVICE)
    window = K.new_window_state(DEVICE)
    hp = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, seed=3)
    if stochastic:  # exp_avg = m + 0.1 * (g - m): NaN payloads and infs of g carry through the math
        a = Bucket((n,), torch.float32, torch.bfloat16, seed=2)
        a.m.zero_()
        a.grad[:n] = specials.to(DEVICE)
        fresh = [True]
    else:  # bf16 param with an fp32 master holding the specials, zero gradient
        a = Bucket((n,), torch.bfloat16, torch.float32, master=True, seed=2)
        a.master[:n] = specials.to(DEVICE)
        fresh = [False]
    table = K.SegmentTable.build(a.params, a.offsets, a.numels, [0], fresh, [0])
    K.finalize(None, window, steps, K.step_index_for([table], DEVICE), check_finite=False)
    K.adam_(table, a.grad, a.m, a.v, None, a.master, steps, window, **hp)
    out = (a.m[:n] if stochastic else a.params[0]).float().cpu()
    k = len(NAN_PAYLOADS)
    assert torch.isnan(out[:k]).all(), out[:k]
    assert out[k] == float("inf") and out[k + 1] == -float("inf")
    assert torch.isfinite(out[k + 3:]).all()
    if not stochastic:
        assert out[k + 2] == float("inf")  # 3.4e38 rounds to nearest: past bf16's largest finite
        assert torch.signbit(out[k + 3]) and out[k + 4] == 1.0


# ------------------------------------------------------------------ stochastic rounding under replay
def _bf16_spacing(x):
    """The distance between the two bf16 values around each fp32 value of ``x``."""
    e = torch.frexp(x.double())[1]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 8)


def test_stochastic_rounding_noise_follows_the_device_step_count(monkeypatch):
    """A captured CUDA graph replays its kernels' arguments, the seed included: the noise must
    change with something the device advances. Two steps with identical inputs and identical
    arguments round bf16 moments differently (finalize advanced the step count in between),
    each to one of the two bf16 neighbours of the exact fp32 value; the step count set back on
    the device gives back the first step's bits. The second step reads no host value."""
    sizes = (4097, 33)
    a = Bucket(sizes, torch.float32, torch.bfloat16, seed=4)  # fp32 params, bf16 moments: rounded stochastically
    _fill_grads(a, 0, [True, True], scale=1.0)
    start = a.clone()
    steps = torch.zeros(len(sizes), device=DEVICE)
    window = K.new_window_state(DEVICE)
    table = K.SegmentTable.build(a.params, a.offsets, a.numels, [0, 1], [True, True], [0, 1])
    idx = K.step_index_for([table], DEVICE)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, seed=11)

    def step():  # the same inputs every time: only the device step count moves
        a.m.copy_(start.m), a.v.copy_(start.v)
        for p, q in zip(a.params, start.params):
            p.copy_(q)
        K.finalize(None, window, steps, idx, check_finite=False)
        K.adam_(table, a.grad, a.m, a.v, None, None, steps, window, **hp)
        return a.m.clone(), a.v.clone()

    m1, v1 = step()
    with _host_reads(monkeypatch) as seen:
        m2, v2 = step()
    assert seen == [], seen
    assert steps.tolist() == [2.0, 2.0]
    # the moments do not depend on the step count: the same exact fp32 values, rounded twice
    g = a.grad.double()
    m_exact = start.m.double() + float(torch.tensor(1 - 0.9, dtype=torch.float32)) * (g - start.m.double())
    v_exact = start.v.double() * 0.999 + float(torch.tensor(1 - 0.999, dtype=torch.float32)) * g * g
    live = torch.cat([torch.arange(o, o + n) for o, n in zip(a.offsets, sizes)]).to(DEVICE)
    for got1, got2, exact in ((m1, m2, m_exact), (v1, v2, v_exact)):
        x1, x2, ex = got1[live].double(), got2[live].double(), exact[live]
        tol = _bf16_spacing(ex.float()) * 1.001
        assert ((x1 - ex).abs() <= tol).all() and ((x2 - ex).abs() <= tol).all()
        differ = (x1 != x2).double().mean().item()
        # independent draws differ for about a third of the elements (2f(1-f) averaged over f)
        assert 0.2 < differ < 0.5, differ
    steps.zero_()  # set back on the device: the first step's noise again
    m3, v3 = step()
    assert torch.equal(m3, m1) and torch.equal(v3, v1)


# ------------------------------------------------------------------ tables
def test_table_refuses_non_contiguous_and_misaligned():
    p = torch.randn(4, 6, device=DEVICE).t()
    with pytest.raises(ValueError, match="not contiguous"):
        K.SegmentTable.build([p], [0], [24], [0], [True], [0])
    q = torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        K.SegmentTable.build([q], [8], [5], [0], [True], [0])


def test_table_key_tracks_segments_flags_and_pointers():
    ps = [torch.randn(5, device=DEVICE), torch.randn(40, device=DEVICE)]
    k1 = K.SegmentTable.key(ps, [0, 1], [True, True])
    assert k1 == K.SegmentTable.key(ps, [0, 1], [True, True])
    assert k1 != K.SegmentTable.key(ps, [0, 1], [True, False])
    assert k1 != K.SegmentTable.key(ps, [1], [True])
    ps2 = [ps[0], torch.randn(40, device=DEVICE)]
    assert k1 != K.SegmentTable.key(ps2, [0, 1], [True, True])
    t = K.SegmentTable.build(ps, [0, 16], [5, 40], [0, 1], [True, True], [3, 4])
    assert t.n_tiles == 2 and t.flat_extent == 16 + 48 and t.key_ == k1


# ------------------------------------------------------------------ launches and host syncs
def _gpt_bucket_set():
    """148 tensors (GPT-2 124M's list, scaled down) in 2 buckets: bf16 matrices, fp32 vectors."""
    d = 8
    shapes = [(64, d), (16, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    assert len(shapes) == 148
    mats = [s for s in shapes if len(s) == 2]
    vecs = [s for s in shapes if len(s) == 1]
    return [Bucket([math.prod(s) for s in mats], torch.bfloat16, master=True, seed=1),
            Bucket([math.prod(s) for s in vecs], seed=2)]


def _one_bucket_step(buckets, bs, steps, tables):
    bs.norm([b.grad for b in buckets])
    bs.finalize(steps, weight_divisor=2.0, max_norm=1.0, dynamic=True)
    for b, t in zip(buckets, tables):
        K.adam_(t, b.grad, b.m, b.v, b.vmax, b.master, steps, bs.window, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.1, decoupled=True, seed=5)


def _prepared():
    buckets = _gpt_bucket_set()
    tables, base = [], 0
    for b in buckets:
        segs = list(range(len(b.numels)))
        tables.append(K.SegmentTable.build(b.params, b.offsets, b.numels, segs, [True] * len(segs),
                                           [base + i for i in segs]))
        base += len(segs)
        _fill_grads(b, 0, [True] * len(segs), scale=1e-3)
    bs = K.BucketStep(DEVICE, loss_scale=1.0)
    bs.set_tables(tables)
    steps = torch.zeros(base, device=DEVICE)
    return buckets, tables, bs, steps


def test_launch_count_148_tensors_two_buckets(request):
    buckets, tables, bs, steps = _prepared()
    launches = request.getfixturevalue("triton_launches")  # counted from here on
    _one_bucket_step(buckets, bs, steps, tables)
    assert len(launches) <= 2 * len(buckets) + 1, launches
    assert steps.tolist() == [1.0] * 148


@contextlib.contextmanager
def _host_reads(monkeypatch):
    """What reads a tensor's value on the host inside the block: aten._local_scalar_dense (what
    .item()/bool()/float() dispatch to) and direct Tensor.item/tolist/__bool__/__float__/__int__."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            seen.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        with Record():
            yield seen
    finally:
        monkeypatch.undo()


def test_no_host_sync_in_a_step(monkeypatch):
    """Nothing in sumsq/finalize/update reads a device value on the host: no
    aten._local_scalar_dense (what .item()/bool()/float() of a tensor dispatch to) and no direct
    Tensor.item/tolist/__bool__/__float__/__int__ calls from our code.

    Under the interpreter the kernels themselves run on the host, and the interpreter converts
    tensors to numpy (not through these entry points), so what this covers is the launch code:
    the Python between and around the kernels. On CUDA the same step also runs under
    torch.cuda.set_sync_debug_mode('error')."""
    buckets, tables, bs, steps = _prepared()
    _one_bucket_step(buckets, bs, steps, tables)  # compile / warm up outside the checks
    with _host_reads(monkeypatch) as seen:
        _one_bucket_step(buckets, bs, steps, tables)
    assert seen == [], seen
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _one_bucket_step(buckets, bs, steps, tables)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert steps.tolist() == [3.0 if DEVICE == "cuda" else 2.0] * 148


# ------------------------------------------------------------------ torch.library ops
def test_custom_ops_opcheck():
    """Every op passes every opcheck: schema (it mutates exactly what it declares), fake tensors,
    and AOT dispatch, where the ops are functionalised: the update ops are then handed copies of
    the parameters and of the state and must write those, not the tensors the table was built
    for (the copies are what is copied back)."""
    from torch.library import opcheck

    K.register_ops()
    ops = torch.ops.fastaccum
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)]
    t = K.SegmentTable.build(ps, [0, 16], [5, 40], [0, 1], [True, True], [0, 1])
    assert t.params == ps and t.addresses == [p.data_ptr() for p in ps]
    untouched = [p.clone() for p in ps]  # opcheck runs the ops on copies of their arguments
    grad, parts = torch.randn(64, generator=g).to(DEVICE), torch.zeros(t.n_tiles, device=DEVICE)
    opcheck(ops.bucket_sumsq, (t.segs, t.tiles, grad, parts, 0))
    w, steps, idx = K.new_window_state(DEVICE), torch.zeros(2, device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    opcheck(ops.finalize, (parts, w, steps, idx, 2.0, 1.0, True, False, 2.0, 0.5, 2000))
    one = lambda x: torch.tensor([x], device=DEVICE)  # noqa: E731
    opcheck(ops.finalize, (None, w, steps, idx, 1.0, 0.0, False, True, 2.0, 0.5, 2000, one(4.0), one(0.0), one(3.0),
                           False))
    steps.fill_(3.0)
    flat = lambda dt=torch.float32: (torch.rand(64, generator=g) * 0.01).to(dt).to(DEVICE)  # noqa: E731
    opcheck(ops.bucket_adam, (ps, t.addresses, t.segs, t.tiles, grad, flat(), flat(), None, None, steps, w, 1e-3,
                              None, 0.9, 0.999, 1e-8, 0.1, True, False, 1))
    opcheck(ops.bucket_adam, (ps, t.addresses, t.segs, t.tiles, grad, flat(torch.bfloat16), flat(torch.bfloat16),
                              flat(torch.bfloat16), None, steps, w, 0.0, one(1e-3), 0.9, 0.999, 1e-8, 0.0, False, True,
                              7))
    opcheck(ops.bucket_sgd, (ps, t.addresses, t.segs, t.tiles, grad, flat(), None, steps, w, 1e-2, None, 0.9, 0.1,
                             0.01, False, True, 3))
    lp = [p.to(torch.bfloat16) for p in ps]  # bf16 parameters with fp32 masters
    tb = K.SegmentTable.build(lp, [0, 16], [5, 40], [0, 1], [True, True], [0, 1])
    opcheck(ops.bucket_sgd, (lp, tb.addresses, tb.segs, tb.tiles, grad, None, flat(), steps, w, 1e-2, None, 0.0,
                             0.0, 0.0, False, False, 3))
    # the copies were written, not the tensors the tables were built for (opcheck compares the
    # copies of its eager and AOT runs: had both written the originals, it would see no change)
    assert all(torch.equal(p, q) for p, q in zip(ps, untouched))


def test_deferred_launches_run_before_anything_touches_their_memory():
    """Inside ``deferred()`` launches are recorded, not run; an aten op on memory a recorded
    launch reads or writes (here: reading the partial sums) first runs the launches recorded so
    far; what nothing touched stays recorded, and ``replay()`` runs it as the ops. Everything
    ends as in an eager step, and the host saw the values an eager step shows."""
    buckets, tables, bs, steps = _prepared()
    ref = [copy.deepcopy(b) for b in buckets]
    ref_bs, ref_steps = copy.deepcopy(bs), steps.clone()
    ref_bs.norm([b.grad for b in ref])
    ref_total = ref_bs.partials.sum()
    ref_tables = [K.SegmentTable.build(b.params, b.offsets, b.numels, list(range(len(b.numels))),
                                       [True] * len(b.numels), t.step_index) for b, t in zip(ref, tables)]
    ref_bs.finalize(ref_steps, weight_divisor=2.0, max_norm=1.0, dynamic=True)
    for b, t in zip(ref, ref_tables):
        K.adam_(t, b.grad, b.m, b.v, b.vmax, b.master, ref_steps, ref_bs.window, lr=1e-3, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.1, decoupled=True, seed=5)

    bs.partials.fill_(-1.0)
    with K.deferred() as calls:
        bs.norm([b.grad for b in buckets])
        assert [op.name() for op, _ in calls] == ["fastaccum::bucket_sumsq"] * 2
        head = bs.partials[:4]  # a view reads nothing
        assert len(calls) == 2
        total = bs.partials.sum()  # reads what the recorded sums write: they run first
        assert calls == []
        bs.finalize(steps, weight_divisor=2.0, max_norm=1.0, dynamic=True)
        for b, t in zip(buckets, tables):
            K.adam_(t, b.grad, b.m, b.v, b.vmax, b.master, steps, bs.window, lr=1e-3, beta1=0.9, beta2=0.999,
                    eps=1e-8, weight_decay=0.1, decoupled=True, seed=5)
        torch.ones(3).mul_(2.0)  # touches nothing recorded
        assert [op.name() for op, _ in calls] == ["fastaccum::finalize"] + ["fastaccum::bucket_adam"] * 2
    assert torch.equal(total, ref_total) and torch.equal(head, ref_bs.partials[:4])
    assert steps.tolist() == [0.0] * 148, "finalize ran before its replay"
    K.replay(calls)
    assert torch.equal(steps, ref_steps) and torch.equal(bs.window, ref_bs.window)
    for b, r in zip(buckets, ref):
        for name in ("m", "v", "master"):
            if getattr(r, name) is not None:
                assert torch.equal(getattr(b, name), getattr(r, name)), name
        assert all(torch.equal(p, q) for p, q in zip(b.params, r.params))


def test_an_op_given_other_parameters_writes_those():
    """What functionalisation does to the update ops, by hand: the op is given copies of the
    parameters; it updates the copies, exactly as the launcher updates the originals, and leaves
    the originals (which the table's rows point at) alone."""
    K.register_ops()
    a = Bucket((5, 40, 4097), torch.bfloat16, master=False, seed=3)
    _fill_grads(a, 0, [True] * 3, scale=1.0)
    b = a.clone()
    steps, window = torch.zeros(3, device=DEVICE), K.new_window_state(DEVICE)
    table = K.SegmentTable.build(a.params, a.offsets, a.numels, [0, 1, 2], [True] * 3, [0, 1, 2])
    K.finalize(None, window, steps, K.step_index_for([table], DEVICE), check_finite=False)
    before = [p.clone() for p in a.params]
    copies = [p.clone() for p in a.params]
    torch.ops.fastaccum.bucket_adam(copies, table.addresses, table.segs, table.tiles, b.grad, b.m, b.v, None, None,
                                    steps, window, 1e-2, None, 0.9, 0.999, 1e-8, 0.1, True, False, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.params, before)), "the table's own parameters were written"
    K.adam_(table, a.grad, a.m, a.v, None, None, steps, window, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.1, decoupled=True, seed=5)
    assert not any(torch.equal(p, q) for p, q in zip(a.params, before))
    for p, q in zip(a.params, copies):
        assert torch.equal(p, q)
    assert torch.equal(a.m, b.m) and torch.equal(a.v, b.v)
