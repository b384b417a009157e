"""The batched fold: bf16/fp16 gradients held during backward and folded into the fp32 buffers
in one launch per group (buffers.PendingFolds, backends/triton_fold.py) instead of one per
parameter and micro-batch.

Everything is compared bit for bit with the per-parameter fold (``FASTACCUM_FOLD_CAP_MB=0``):
the fold is an exact fp32 addition (or a copy into a stale segment) either way. Kernels run in
Triton's interpreter on CPU tensors here, on CUDA when a GPU is present."""
from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastaccum
from fastaccum import buffers

pytest.importorskip("triton")

from fastaccum.backends import triton_fold as F  # noqa: E402
from test_resident_step import DEVICE, _no_host_reads, fake_loss, gpt2_like, groups  # noqa: E402

TORCH = fastaccum.get_backend("torch")
TRITON = fastaccum.get_backend("triton")


# ------------------------------------------------------------------ the kernel
def _layout(sizes, seed):
    """A flat fp32 buffer with 16-aligned segments, random everywhere (padding included)."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += (max(n, 1) + 15) // 16 * 16
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(total, generator=g).to(DEVICE)
    return buf, [buf[o:o + n] for o, n in zip(offsets, sizes)]


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16])
def test_fold_equals_copy_and_add_bit_for_bit(src_dtype):
    """Two buffers (two buckets) in one launch, sources allocated in scrambled order (offsets
    below and above the first source), odd sizes and full tiles, copies and adds: the buffers
    equal view.copy_/view.add_ exactly, padding included (never written)."""
    sizes_a, sizes_b = (1, 7, 4097, 2048, 16), (2049, 33, 2047)
    buf_a, views_a = _layout(sizes_a, 0)
    buf_b, views_b = _layout(sizes_b, 1)
    g = torch.Generator().manual_seed(2)
    views = views_a + views_b
    sources = [None] * len(views)
    for k in (3, 0, 6, 1, 7, 2, 5, 4):  # allocation order != table order
        sources[k] = (torch.randn(views[k].numel(), generator=g) * 3).to(src_dtype).to(DEVICE)
    copy = [True, False, False, True, False, True, False, False]
    ref_a, ref_b = buf_a.clone(), buf_b.clone()
    ref_views = [ref_a[v.storage_offset():v.storage_offset() + v.numel()] for v in views_a] + \
                [ref_b[v.storage_offset():v.storage_offset() + v.numel()] for v in views_b]
    for r, s, c in zip(ref_views, sources, copy):
        r.copy_(s) if c else r.add_(s)
    partials, first = F.fold_(sources, views, copy, sumsq=True)
    assert torch.equal(buf_a, ref_a) and torch.equal(buf_b, ref_b)
    assert first == [0] + list(itertools.accumulate(max(1, math.ceil(n / F.BLOCK)) for n in sizes_a + sizes_b))
    for k, s in enumerate(sources):
        torch.testing.assert_close(partials[first[k]:first[k + 1]].double().sum().cpu(),
                                   s.double().pow(2).sum().cpu(), rtol=1e-6, atol=0)


def test_backend_reference_equals_the_kernel():
    """Backend.fold_many_'s default (one op per pair, what the torch backend runs) and the
    triton kernel give the same buffer and the same sums."""
    sizes = (5, 4097, 300)
    buf_a, views_a = _layout(sizes, 3)
    buf_b, views_b = _layout(sizes, 3)
    g = torch.Generator().manual_seed(4)
    src = [torch.randn(n, generator=g).to(torch.bfloat16).to(DEVICE) for n in sizes]
    pa, fa = TRITON.fold_many_(src, views_a, [False, True, False], sumsq=True)
    pb, fb = TORCH.fold_many_(src, views_b, [False, True, False], sumsq=True)
    assert torch.equal(buf_a, buf_b)
    for k in range(len(sizes)):
        torch.testing.assert_close(pa[fa[k]:fa[k + 1]].sum().cpu(), pb[fb[k]:fb[k + 1]].sum().cpu(), rtol=1e-6,
                                   atol=0)


def test_fold_refuses_what_it_cannot_read():
    buf, views = _layout((64, 64), 5)
    before = buf.clone()
    ok = torch.zeros(64, dtype=torch.bfloat16, device=DEVICE)
    wide = torch.zeros(65, dtype=torch.bfloat16, device=DEVICE)
    bad = {
        "misaligned source": (wide[1:], views[0]),
        "strided source": (torch.zeros(128, dtype=torch.bfloat16, device=DEVICE)[::2], views[0]),
        "fp32 source": (torch.zeros(64, device=DEVICE), views[0]),
        "length": (ok[:32], views[0]),
        "misaligned segment": (ok[:63], buf[1:64]),
    }
    for what, (s, d) in bad.items():
        with pytest.raises(ValueError, match="fold"):
            F.fold_([ok, s], [views[1], d], [False, False])
        assert torch.equal(buf, before), f"{what}: refused before anything was written"


def test_a_fold_runs_the_recorded_launches_first(monkeypatch):
    """Inside the compiled step's recording (``deferred()``) a fold writes the buffer a recorded
    sum of squares reads: the recorded launch runs first, as in an eager step (checked when the
    fold is launched: a raw launch is no aten op the recording could see, on a GPU)."""
    from fastaccum.backends import triton_kernels as K

    real, pending_at_launch = K._launch, []

    def launch(spec, *a, **kw):
        if spec.kernel is F._fold_kernel:
            pending_at_launch.append(len(K._RECORDING.calls))
        return real(spec, *a, **kw)

    monkeypatch.setattr(K, "_launch", launch)

    sizes = (300, 4097)
    buf, views = _layout(sizes, 6)
    params = [torch.zeros(n, device=DEVICE) for n in sizes]
    offsets = [v.storage_offset() for v in views]
    table = K.SegmentTable.build(params, offsets, list(sizes), [0, 1], [True, True], [0, 1])
    src = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE) for n in sizes]
    expected = torch.stack([v.double().pow(2).sum() for v in views]).sum()
    partials = torch.full((table.n_tiles,), -1.0, device=DEVICE)
    with K.deferred() as calls:
        K.sumsq(table, buf, partials, 0)
        assert len(calls) == 1
        F.fold_(src, views, [False, False])
        assert pending_at_launch == [0] and calls == [], "the recorded sum ran before the fold"
    torch.testing.assert_close(partials.double().sum(), expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ through the optimizer
def odd_model(dtype):
    """GPT-2's 148 tensors plus odd sizes (1, 7, 4097, 3x5) and one parameter without gradients."""
    model = gpt2_like(dtype=dtype)
    torch.manual_seed(1)
    extra = [nn.Parameter((torch.randn(s) * 0.02).to(DEVICE, dtype)) for s in ((1,), (7,), (4097,), (3, 5))]
    unused = nn.Parameter(torch.zeros(5, device=DEVICE, dtype=dtype))
    return list(model) + extra, unused


def _groups(params, unused):
    return [{"params": [p for p in params if p.dim() >= 2] + [unused]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _run(monkeypatch, cap, dtype, loop, windows=3, accum=4, inf_at=(1, 2)):
    """``loop``: 'managed' (opt.backward), 'zero_grad' (the same, p.grad cleared before each
    micro-batch), 'user' (scale_loss(...).backward() in a managed window) or 'classic'
    (accumulation_steps=1, several backward per step). Returns the parameters, the
    optimizer and every buffer right after every backward (what the end of backward left)."""
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
    params, unused = odd_model(dtype)
    opt = fastaccum.AdamW(_groups(params, unused), lr=1e-2, backend="triton", max_grad_norm=0.5,
                          loss_scale="dynamic", accumulation_steps=1 if loop == "classic" else accum)
    seen = []
    for w in range(windows):
        for k in range(accum):
            loss = fake_loss(params, seed=100 * w + k) * 2.0**-12  # fp16 gradients finite under the 2**16 scale
            if (w, k) == inf_at:
                loss = loss * float("inf")
            weight = 3.0 + k
            if loop == "zero_grad":  # a trainer's model.zero_grad() before every micro-batch
                for p in params:
                    p.grad = None
            if loop in ("managed", "zero_grad"):
                opt.backward(loss, weight=weight)
            else:
                opt.scale_loss(loss, weight=None if loop == "classic" else weight).backward()
            seen.append([b.grad.clone() for b in opt._buckets])
            if loop != "classic":
                opt.step()
                opt.zero_grad()
        if loop == "classic":
            opt.step()
            opt.zero_grad()
    return params, opt, seen


def _assert_same(run_a, run_b):
    (pa, oa, sa), (pb, ob, sb) = run_a, run_b
    assert len(sa) == len(sb)
    for k, (xa, xb) in enumerate(zip(sa, sb)):
        for x, y in zip(xa, xb):  # (NaN where inf met -inf, in both)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f"buffers after backward {k}")
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    assert oa.skipped_steps == ob.skipped_steps == 1
    assert oa.loss_scale == ob.loss_scale
    for p, q in zip(pa, pb):
        for name, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loop", ["managed", "user", "classic"])
def test_parity_with_the_per_parameter_fold(monkeypatch, dtype, loop):
    """Accumulation 4, clipping, dynamic loss scale with an inf window (found-inf: skipped
    alike), unused parameters: the batched fold (a cap small enough for several flushes per
    backward) leaves the buffers, parameters and state exactly as the per-parameter fold."""
    per_param = _run(monkeypatch, 0, dtype, loop)
    batched = _run(monkeypatch, 0.002, dtype, loop)
    assert all(b.folds is None for b in per_param[1]._buckets)
    folds = batched[1]._buckets[0].folds
    assert folds is not None and folds.launches > len(batched[2]), "several flushes per backward"
    _assert_same(per_param, batched)


def test_parity_when_the_trainer_clears_grads_every_micro_batch(monkeypatch):
    """model.zero_grad() inside a managed window keeps the earlier micro-batches (an add into the
    fresh segment, whatever p.grad was), with either fold."""
    _assert_same(_run(monkeypatch, 0, torch.bfloat16, "zero_grad"), _run(monkeypatch, 0.002, torch.bfloat16,
                                                                         "zero_grad"))


# ------------------------------------------------------------------ launches
class _BufferWrites(TorchDispatchMode):
    """aten ops that write one of the given buffers (the per-parameter fold's add_/copy_), outside
    kernel launches (Triton's interpreter copies a launch's tensors with aten ops of its own)."""

    def __init__(self, buffers_):
        super().__init__()
        self.keys = {b.untyped_storage().data_ptr() for b in buffers_}
        self.ops = []
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_launch and func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) \
                and args[0].untyped_storage().data_ptr() in self.keys:
            self.ops.append(func.__name__)
        return out


def _micro_batches(opt, model, launches, monkeypatch, n=8, start=0):
    """Folds per micro-batch: (batched launches, per-parameter aten writes of the buffers)."""
    from fastaccum.backends import triton_kernels as K

    out = []
    counting = K._launch  # (the triton_launches fixture's)
    for k in range(n):
        loss = fake_loss(model, seed=start + k)
        before = len(launches)
        with _BufferWrites([b.grad for b in opt._buckets]) as mode:
            def launch(*a, **kw):
                mode.in_launch += 1
                try:
                    return counting(*a, **kw)
                finally:
                    mode.in_launch -= 1

            monkeypatch.setattr(K, "_launch", launch)
            opt.backward(loss)
            monkeypatch.setattr(K, "_launch", counting)
        out.append((launches[before:].count("_fold_kernel"), len(mode.ops)))
        opt.step()
        opt.zero_grad()
    return out


@pytest.mark.parametrize("cap_mb", [None, 0.01])
def test_launches_per_micro_batch(monkeypatch, request, cap_mb):
    """148 bf16 tensors: ceil(pending bytes / cap) + 1 launches per micro-batch at most (one
    with the default cap), no per-parameter write; the per-parameter fold writes the buffer
    once per tensor (a copy on the window's first micro-batch, an add on the others)."""
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", "0")
    model = gpt2_like(dtype=torch.bfloat16)
    n = len(list(model))
    assert n == 148
    old = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", accumulation_steps=8)
    launches = request.getfixturevalue("triton_launches")
    before = _micro_batches(old, model, launches, monkeypatch)
    assert before == [(0, n)] * 8, before

    if cap_mb is None:
        monkeypatch.delenv("FASTACCUM_FOLD_CAP_MB")
    else:
        monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap_mb))
    cap = buffers.fold_cap_bytes(torch.device(DEVICE))
    model = gpt2_like(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", accumulation_steps=8)
    assert opt._buckets[0].folds.cap == cap
    pending_bytes = sum(p.numel() * p.element_size() for p in model)
    after = _micro_batches(opt, model, launches, monkeypatch, start=100)
    bound = math.ceil(pending_bytes / cap) + 1
    assert all(writes == 0 and 1 <= k <= bound for k, writes in after), (after, bound)
    if cap_mb is None:
        assert after == [(1, 0)] * 8  # the whole micro-batch in one launch: 8 per window instead of 1184
    else:
        assert min(k for k, _ in after) >= 2, "the cap splits a micro-batch"


def test_eager_hooks_enter_no_compiler_wrapper(monkeypatch):
    """torch.compiler.disable's wrapper costs microseconds per call; eagerly, the per-parameter
    hook must not enter it: the compiler frame switches per backward do not grow with the
    number of parameters (they come from the few once-per-backward calls)."""
    import torch._dynamo.eval_frame as eval_frame
    real, calls = eval_frame.set_eval_frame, []

    def counting(callback):
        calls.append(callback)
        return real(callback)

    monkeypatch.setattr(eval_frame, "set_eval_frame", counting)
    per_backward = {}
    for n in (4, 64):
        params = [nn.Parameter(torch.randn(40, device=DEVICE).bfloat16()) for _ in range(n)]
        opt = fastaccum.AdamW(params, lr=1e-3, backend="triton", accumulation_steps=4)
        counts = []
        for k in range(3):
            loss = sum((p.float() * (k + 1)).sum() for p in params)
            del calls[:]
            opt.backward(loss)
            counts.append(len(calls))
        assert all(b.folds is not None and b.folds.launches >= 1 for b in opt._buckets)
        per_backward[n] = counts
    assert per_backward[4] == per_backward[64], per_backward


def test_default_cap_is_a_share_of_the_device(monkeypatch):
    """Unset, the cap is 1 % of the GPU's memory and never below 32 MiB (a flush must fold enough
    to cover its fixed host cost); off a GPU, 32 MiB; FASTACCUM_FOLD_CAP_MB overrides both."""
    monkeypatch.delenv("FASTACCUM_FOLD_CAP_MB", raising=False)
    mib = 2**20
    assert buffers.fold_cap_bytes() == buffers.fold_cap_bytes(torch.device("cpu")) == 32 * mib

    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    for total_gb, expected in ((80, int(80e9 * 0.01)), (6, int(6e9 * 0.01)), (1, 32 * mib)):
        Props.total_memory = int(total_gb * 1e9)
        assert buffers.fold_cap_bytes(torch.device("cuda", 0)) == expected, total_gb
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", "4")
    assert buffers.fold_cap_bytes(torch.device("cuda", 0)) == 4 * mib


def test_a_window_reads_no_device_value(monkeypatch):
    """opt.backward (batched folds, a cap small enough to flush during the backward), step with
    dynamic loss scale and clipping, zero_grad: nothing is read back."""
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", "0.002")
    model = gpt2_like(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", accumulation_steps=2, max_grad_norm=1.0,
                          loss_scale="dynamic")
    for k in range(2):  # the first step allocates state
        opt.backward(fake_loss(model, k))
        opt.step()
    losses = [fake_loss(model, 10 + k) for k in range(2)]
    folds = opt._buckets[0].folds
    n0 = folds.launches
    with _no_host_reads(monkeypatch) as (dispatched, called):
        for loss in losses:
            opt.backward(loss, weight=torch.tensor(3.0, device=DEVICE))
            opt.step()
            opt.zero_grad()
    assert dispatched == [] and called == [], (dispatched, called)
    assert folds.launches - n0 >= 4, "the window folded through the batched path"


# ------------------------------------------------------------------ memory
def test_held_gradients_stay_under_the_cap(monkeypatch):
    """What the batched fold keeps alive beyond the per-parameter fold: after any hook, less
    than ``cap`` bytes of gradients (the one being folded aside); nothing after the backward;
    and a folded gradient is freed (no reference left in tables or launch arguments)."""
    cap_mb = 0.004
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap_mb))
    cap = buffers.fold_cap_bytes()
    model = gpt2_like(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", accumulation_steps=4)
    folds = opt._buckets[0].folds
    held_after_add, held_at_fold, refs = [], [], []
    real_add, real_fold = folds.add, folds._fold_some

    def add(bucket, i, grad, copy, nbytes):
        refs.append(weakref.ref(grad))
        real_add(bucket, i, grad, copy, nbytes)
        held_after_add.append(sum(e[2].numel() * e[2].element_size() for e in folds.entries))

    def fold_some():
        held_at_fold.append(sum(e[2].numel() * e[2].element_size() for e in folds.entries))
        real_fold()

    monkeypatch.setattr(folds, "add", add)
    monkeypatch.setattr(folds, "_fold_some", fold_some)
    biggest = max(p.numel() * p.element_size() for p in model)
    for k in range(3):
        opt.backward(fake_loss(model, k))
        assert folds.entries == [] and folds.nbytes == 0
        opt.step()
    assert len(held_at_fold) >= 6 and max(held_after_add) < cap
    assert max(held_at_fold) < cap + biggest
    assert max(held_at_fold) >= cap, "flushes were triggered by the cap"
    assert all(r() is None for r in refs), "folded gradients are freed"


# ------------------------------------------------------------------ faults
class _Boom(torch.autograd.Function):
    """Identity forward; its backward raises (after the parameters behind it got gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward failed")


def _faulty_loss(params, seed):
    # the parameters' terms are created before the failing node, so autograd (which runs the
    # most recently created nodes first) fails after part of them got their gradients
    loss = fake_loss(params[:100], seed)
    return _Boom.apply(loss) + fake_loss(params[100:], seed + 1)


def _fault_run(monkeypatch, cap, how):
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
    params, unused = odd_model(torch.bfloat16)
    opt = fastaccum.AdamW(_groups(params, unused), lr=1e-2, backend="triton", accumulation_steps=4, max_grad_norm=1.0)
    states = []
    opt.backward(fake_loss(params, 1))
    opt.step()
    with pytest.raises(RuntimeError, match="backward failed"):
        if how == "opt.backward":
            opt.backward(_faulty_loss(params, 2))
        else:
            _faulty_loss(params, 2).backward()
    folds = opt._buckets[0].folds
    waiting = len(folds.entries) if folds is not None else 0
    states.append([p.main_grad.clone() for p in params])  # the raw fp32 views (no flush of their own)
    grads = [type(p.grad) for p in params]
    # a norm (clip_grad_norm_ reads the buffers), then the retried micro-batch and the rest
    norm = opt.clip_grad_norm_(10.0)
    opt.backward(fake_loss(params, 3))
    opt.step()
    opt.backward(fake_loss(params, 4))
    opt.step()
    opt.backward(fake_loss(params, 5))
    opt.step()
    return params, states, grads, norm, waiting


@pytest.mark.parametrize("how", ["opt.backward", "loss.backward"])
def test_a_failed_backward_loses_nothing_and_counts_nothing_twice(monkeypatch, how):
    """A backward that raises after some hooks ran: the gradients they took reach the buffer
    exactly once (as with the per-parameter fold, where they were already in it), the views are
    back, and the run goes on to the same parameters."""
    pa, sa, ga, na, _ = _fault_run(monkeypatch, 0, how)
    pb, sb, gb, nb, waiting = _fault_run(monkeypatch, 32, how)
    if how == "opt.backward":
        assert waiting == 0, "opt.backward folds what reached the hooks before re-raising"
        assert all(torch.equal(x, y) for x, y in zip(sa[0], sb[0]))
    else:
        assert waiting > 0, "loss.backward raised before its end: gradients still wait"
    assert ga == gb
    assert torch.equal(na, nb)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)


def test_a_failed_fold_is_retried_once(monkeypatch):
    """The launch itself raising (at the end of backward) leaves every gradient waiting; the
    next use of the buffers folds them, once."""
    def run(cap, fail):
        monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
        model = gpt2_like(dtype=torch.bfloat16)
        opt = fastaccum.AdamW(groups(model), lr=1e-2, backend="triton", accumulation_steps=2)
        opt.backward(fake_loss(model, 0))
        opt.step()
        folds = opt._buckets[0].folds
        if fail:
            real = folds.backend

            class Failing:
                batched_fold_align = real.batched_fold_align

                def fold_many_(self, *a, **k):
                    folds.backend = real
                    raise RuntimeError("launch failed")

            folds.backend = Failing()
            with pytest.raises(RuntimeError, match="launch failed"):
                opt.scale_loss(fake_loss(model, 1)).backward()
            assert folds.entries, "nothing was folded, nothing dropped"
        else:
            opt.scale_loss(fake_loss(model, 1)).backward()
        buf = [p.grad.fp32().clone() for p in model]  # reading a GradView folds what waits for it
        opt.step()
        return model, buf

    ma, ba = run(0, False)
    mb, bb = run(32, True)
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    for p, q in zip(ma, mb):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ GradView and trainers
def test_trainer_clip_and_grad_edits_between_backwards(monkeypatch):
    """loss.backward() by the user, torch's clip_grad_norm_ on the GradViews, ``p.grad += g``
    and ``p.grad.mul_`` outside backward: the same as the per-parameter fold."""
    def run(cap):
        monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
        model = gpt2_like(dtype=torch.bfloat16)
        ps = list(model)
        opt = fastaccum.AdamW(groups(model), lr=1e-2, backend="triton")
        norms = []
        for w in range(2):
            for k in range(3):
                (fake_loss(model, 10 * w + k) / 3).backward()
            ps[3].grad += torch.ones_like(ps[3]) * 0.5  # a trainer's edit: folded at once
            ps[5].grad.mul_(0.25)
            norms.append(torch.nn.utils.clip_grad_norm_(ps, 0.1))
            opt.step()
            opt.zero_grad()
        return ps, norms

    pa, na = run(0)
    pb, nb = run(32)
    assert [float(x) for x in na] == [float(x) for x in nb]
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)


def _with_host_step(model):
    """The model's parameters plus a non-contiguous one: its bucket runs on the torch backend, so
    the optimizer's step is host-decided (not the device-resident one)."""
    odd = nn.Parameter(torch.randn(6, 5, device=DEVICE).t().to(torch.bfloat16))
    assert not odd.is_contiguous()
    return groups(model) + [{"params": [odd]}], odd


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
@pytest.mark.parametrize("step", ["resident", "host"])
def test_noise_scale_sums_match(monkeypatch, step):
    """track_noise_scale: the batched folds measure each micro-batch as the per-parameter fold,
    on the device-resident step (device sums, never read) and on the host-decided one (one read
    per micro-batch and bucket)."""
    def run(cap):
        monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
        model = gpt2_like(dtype=torch.bfloat16)
        params, extra = (groups(model), None) if step == "resident" else _with_host_step(model)
        opt = fastaccum.AdamW(params, lr=1e-2, backend="triton", accumulation_steps=3, track_noise_scale=True)
        assert (opt._resident is not None) == (step == "resident")
        reports = []
        for k in range(3):
            loss = fake_loss(model, k) + (0 if extra is None else (extra.float() * (k + 1)).sum())
            opt.backward(loss, weight=2.0 + k)
            if k < 2:
                opt.step()
                reports.append([float(x) for x in opt._window.reports])
        opt.step()
        return opt, reports

    oa, ra = run(0)
    ob, rb = run(32)
    assert ob._buckets[0].folds is not None and oa._buckets[0].folds is None
    assert rb[-1][2] == 2.0, "both micro-batches reported"
    for x, y in zip(ra, rb):
        assert x[1:] == y[1:]
        assert x[0] == pytest.approx(y[0], rel=1e-5)
    assert oa._noise.windows == ob._noise.windows == 1


# ------------------------------------------------------------------ where it is off
def test_off_where_the_per_parameter_fold_stays(monkeypatch):
    """step_in_backward (a gradient is read right after its hook), fp32 parameters, the torch
    backend, and FASTACCUM_FOLD_CAP_MB=0 fold each gradient on arrival; a bad value is refused."""
    model = gpt2_like(dtype=torch.bfloat16)
    assert all(b.folds is None for b in fastaccum.AdamW(list(model), backend="triton",
                                                       step_in_backward=True)._buckets)
    assert all(b.folds is None for b in fastaccum.AdamW(list(model), backend="torch")._buckets)
    assert all(b.folds is None for b in fastaccum.AdamW(list(gpt2_like()), backend="triton")._buckets)
    shared = fastaccum.AdamW(groups(model), backend="triton")._buckets
    assert shared[0].folds is shared[1].folds is not None, "one batched fold per device"
    monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", "-1")
    with pytest.raises(ValueError, match="FASTACCUM_FOLD_CAP_MB"):
        fastaccum.AdamW(list(model), backend="triton")


def test_copy_of_an_optimizer_mid_window(monkeypatch):
    """deepcopy and state_dict right after a backward that raised (gradients still waiting): the
    copies hold those gradients too, and all step as the per-parameter fold. (The host-decided
    step: the device-resident step's objects are not deep-copyable.)"""
    import copy

    def run(cap):
        monkeypatch.setenv("FASTACCUM_FOLD_CAP_MB", str(cap))
        model = gpt2_like(dtype=torch.bfloat16)
        kw = dict(lr=1e-2, backend="triton", accumulation_steps=3)
        opt = fastaccum.AdamW(_with_host_step(model)[0], **kw)
        opt.backward(fake_loss(model, 0))
        opt.step()
        with pytest.raises(RuntimeError, match="backward failed"):
            _faulty_loss(list(model), 7).backward()
        if cap:
            assert opt._buckets[0].folds.entries
        clone = copy.deepcopy((model, opt))  # folds what waits first (in the original)
        if cap:
            assert not opt._buckets[0].folds.entries and not clone[1]._buckets[0].folds.entries
            assert clone[1]._buckets[0].folds is not opt._buckets[0].folds
        model2 = copy.deepcopy(model)
        opt2 = fastaccum.AdamW(_with_host_step(model2)[0], **kw)
        opt2.load_state_dict(opt.state_dict())
        for m, o in ((model, opt), (model2, opt2), clone):
            o.step()  # counts the micro-batch that failed (its gradients are in)
            o.backward(fake_loss(m, 1))
            o.step()
        return [list(model), list(model2), list(clone[0])]

    ref = run(0)[0]
    for params in run(32):
        for p, q in zip(params, ref):
            assert torch.equal(p, q)


def test_off_without_grad_views():
    """Across ranks the optimizer builds its buckets without GradViews (DDP's reducer owns p.grad;
    FSDP2's shards are subclasses): gradients are released in the hook and reduced from the
    buffer, so such a bucket takes no batched fold even when offered one."""
    params = list(gpt2_like(dtype=torch.bfloat16))
    folds = buffers.PendingFolds(TRITON, buffers.fold_cap_bytes(), torch.device(DEVICE))
    assert buffers.Bucket(params, 0, TRITON, grad_views=False, folds=folds).folds is None
    assert buffers.Bucket(params, 0, TRITON, grad_views=True, folds=folds).folds is folds
