"""The cpu path's byte and overhead savings keep the numbers: a user's p.grad read in place,
the norm fused into the window's last fold, and the segments/pointer layout reused across steps.

Each is checked against torch.optim.AdamW or against the torch backend (which has none of
these paths), and each test also checks that the path was taken.
"""
import pytest
import torch

import fastaccum
from fastaccum.backends import BackendUnavailableError, get_backend
from fastaccum.tools.bench import simulated_loss
from conftest import AtenOps

try:
    get_backend("cpu")
except BackendUnavailableError as e:  # pragma: no cover
    pytest.skip(f"cpu backend not built: {e}", allow_module_level=True)

SIZES = (1, 7, 4097, 33, 1000)


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype).requires_grad_() for n in SIZES]


def twin(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_user_assigned_grads_are_read_in_place(max_grad_norm):
    ps = make()
    tp = twin(ps)
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu", max_grad_norm=max_grad_norm)
    ref = torch.optim.AdamW(tp, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        strided = torch.empty(2 * gs[3].numel())[::2]
        strided.copy_(gs[3])
        ps[3].grad = strided  # not contiguous: copied into the segment, not read in place
        for p, g in zip(tp, gs):
            p.grad = g.clone()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(tp, max_grad_norm)
        kept = [p.grad for p in ps]
        opt._fold_grads()
        bucket = opt._buckets[0]
        read_in_place = [e is not None for e in bucket.external]
        assert read_in_place == [True, True, True, False, True]
        assert [p.grad is g for p, g in zip(ps, kept)] == read_in_place  # p.grad stays the user's
        opt.step()
        ref.step()
        assert all(p.grad is None for p in ps)
    for p, q in zip(ps, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(ps, tp):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], ref.state[q][k], rtol=1e-5, atol=1e-6)


def test_in_place_grad_then_backward_accumulates_into_it():
    """A user's tensor read in place is the gradient: a backward before the step adds to it."""
    ps = make()
    tp = twin(ps)
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(tp, lr=1e-2)
    for p, q in zip(ps, tp):
        g = torch.ones_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    opt.clip_grad_norm_(100.0)  # folds: read in place
    torch.nn.utils.clip_grad_norm_(tp, 100.0)
    gs = [torch.full_like(p, 0.5) for p in ps]
    simulated_loss(ps, gs).backward()
    simulated_loss(tp, gs).backward()
    opt.step()
    ref.step()
    for p, q in zip(ps, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_scale", [None, "dynamic"])
def test_norm_fused_into_the_last_fold(dtype, loss_scale):
    ps = make(dtype=dtype)
    qs = twin(ps)
    kw = dict(lr=1e-2, accumulation_steps=3, max_grad_norm=0.5, loss_scale=loss_scale)
    opt = fastaccum.AdamW(ps, backend="cpu", **kw)
    ref = fastaccum.AdamW(qs, backend="torch", **kw)
    gen = torch.Generator().manual_seed(2)
    bucket = opt._buckets[0]
    passes = []
    sumsq = bucket.backend.sumsq_of
    bucket.backend.sumsq_of = lambda ts: passes.append(len(ts)) or sumsq(ts)
    try:
        for _ in range(3):
            for k in range(3):
                gs = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
                opt.backward(simulated_loss(ps, gs))
                ref.backward(simulated_loss(qs, gs))
                if k == 2:  # every fresh segment's norm came with its last fold
                    assert all(s is not None for s in bucket.seg_sumsq)
                opt.step(), ref.step()
                opt.zero_grad(), ref.zero_grad()
    finally:
        del bucket.backend.sumsq_of  # the shared backend instance gets its method back
    assert passes == []  # no norm pass over the buffer
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol)


def test_fused_norm_sees_a_write_through_p_grad():
    """A trainer scaling an fp32 p.grad in place after the last backward: the cached norms
    are dropped (the buffer's version counter moved) and the step reads the buffer."""
    ps = make()
    qs = twin(ps)
    kw = dict(lr=1e-2, accumulation_steps=2, max_grad_norm=0.5)
    opt = fastaccum.AdamW(ps, backend="cpu", **kw)
    ref = fastaccum.AdamW(qs, backend="torch", **kw)
    gen = torch.Generator().manual_seed(3)
    for k in range(2):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        opt.backward(simulated_loss(ps, gs))
        ref.backward(simulated_loss(qs, gs))
        if k == 1:
            ps[2].grad.mul_(7.0)
            qs[2].grad.mul_(7.0)
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulate_returns_the_result_norm():
    cpu = get_backend("cpu")
    for src_dtype in (torch.float32, torch.bfloat16, torch.float16):
        dst = torch.randn(4097)
        src = torch.randn(4097).to(src_dtype)
        want = (dst + 0.5 * src.float()).double().square().sum()
        got = cpu.accumulate_(dst, src, 0.5, result_sumsq=True)
        assert got == pytest.approx(float(dst.double().square().sum()), rel=1e-12)
        assert got == pytest.approx(float(want), rel=1e-6)
    dst = torch.zeros(100)
    dst[7] = float("inf")
    assert cpu.accumulate_(dst, torch.zeros(100), 1.0, result_sumsq=True) == float("inf")


def test_sumsq_over_segments():
    cpu = get_backend("cpu")
    ts = [torch.randn(n) for n in (1, 7, 70001, 4097)]
    want = sum(float(t.double().square().sum()) for t in ts)
    assert cpu.sumsq_of(ts) == pytest.approx(want, rel=1e-12)
    ts[1][3] = float("nan")
    assert cpu.sumsq_of(ts) != cpu.sumsq_of(ts)


def test_segments_and_kernel_layout_are_reused_and_rechecked():
    ps = make()
    tp = twin(ps)
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(tp, lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    seen = []
    for k in range(6):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        simulated_loss(ps, gs).backward()
        simulated_loss(tp, gs).backward()
        if k == 3:  # a parameter's storage moves: the cached pointers must not be used
            for p, q in zip(ps, tp):
                p.data = p.data.clone()
                q.data = q.data.clone()
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
        seen.append(id(opt._segs_cache[id(opt._buckets[0])][2]))
        for p, q in zip(ps, tp):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(set(seen[1:])) == 1  # one segments object from the second step on
    sd = opt.state_dict()
    opt.load_state_dict(sd)  # state replaced: segments made again
    gs = [torch.randn(p.shape, generator=gen) for p in ps]
    simulated_loss(ps, gs).backward()
    simulated_loss(tp, gs).backward()
    opt.step(), ref.step()
    assert id(opt._segs_cache[id(opt._buckets[0])][2]) != seen[-1]
    for p, q in zip(ps, tp):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_steady_step_counts_steps_in_the_kernel():
    """From the second step on, a whole-bucket step hands the bucket's step-count tensor to
    the kernel job, which adds one after the update: the step reads no count out and runs
    no separate increment. The only aten op left is the copy that restores the counts when
    a kernel fails (see _update)."""
    ps = make()
    tp = twin(ps)
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(tp, lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for k in range(5):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        simulated_loss(ps, gs).backward()
        simulated_loss(tp, gs).backward()
        with AtenOps() as ops:
            opt.step()
        ref.step()
        opt.zero_grad(), ref.zero_grad()
        if k >= 1:
            assert ops.seen == [torch.ops.aten.clone.default], ops.seen
        for i, (p, q) in enumerate(zip(ps, tp)):
            assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == k + 1
            assert opt.state[p]["step"].data_ptr() == opt._buckets[0].steps[i].data_ptr()
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a count set by hand is where the kernel reads it from
    for p in ps:
        opt.state[p]["step"].fill_(100.0)
    for q in tp:
        ref.state[q]["step"].fill_(100.0)
    gs = [torch.randn(p.shape, generator=gen) for p in ps]
    simulated_loss(ps, gs).backward()
    simulated_loss(tp, gs).backward()
    opt.step(), ref.step()
    for p, q in zip(ps, tp):
        assert float(opt.state[p]["step"]) == 101.0
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_counted_steps_with_a_segment_the_kernels_do_not_take():
    """A non-contiguous parameter goes to the torch backend: the counts are still added once."""
    g = torch.Generator().manual_seed(6)
    ps = [torch.randn(5, 3, generator=g).t().requires_grad_()] + make()
    tp = twin(ps)
    assert not ps[0].is_contiguous() and not tp[0].is_contiguous()
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(tp, lr=1e-2)
    for k in range(4):
        gs = [torch.randn(p.shape, generator=g) for p in ps]
        simulated_loss(ps, gs).backward()
        simulated_loss(tp, gs).backward()
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
    for p, q in zip(ps, tp):
        assert float(opt.state[p]["step"]) == 4.0
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_assigned_grads_run_through_the_laid_out_job():
    """Steps with user-assigned gradients reuse the bucket's segments and kernel layout (the
    gradients' addresses are passed for that call only): alternating them with autograd
    steps, and changing the assigned tensors, stays equal to torch.optim.AdamW."""
    ps = make()
    tp = twin(ps)
    opt = fastaccum.AdamW(ps, lr=1e-2, backend="cpu")
    ref = torch.optim.AdamW(tp, lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    seen = set()
    for k in range(8):
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        if k % 3 == 1:  # autograd's gradients, into the buffer
            simulated_loss(ps, gs).backward()
        else:  # new user tensors each time, read in place
            for p, g in zip(ps, gs):
                p.grad = g.clone()
        for q, g in zip(tp, gs):
            q.grad = g.clone()
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
        if k >= 1:
            seen.add(id(opt._segs_cache[id(opt._buckets[0])][2]))
        for p, q in zip(ps, tp):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(seen) == 1
    segs = opt._segs_cache[id(opt._buckets[0])][2]
    assert segs.grads is opt._segs_cache[id(opt._buckets[0])][3]  # its own gradients again afterwards
