"""The device-resident step (triton backend) through the optimizer: same numbers as the torch
backend, 2 * buckets + 1 launches per step whatever the number of tensors, and no host sync
anywhere in a window. Runs the kernels in Triton's interpreter on CPU tensors here, on CUDA
when a GPU is present."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fastaccum
from conftest import HOST_SYNC_OPS, AtenOps, assert_params_close, assert_state_close

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpt2_like(n_layer: int = 12, d: int = 16, vocab: int = 50, dtype=torch.float32) -> nn.Module:
    """The parameter list of a GPT-2 (2 + 12 * 12 + 2 = 148 tensors), tiny widths."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(vocab, d) * 0.02), nn.Parameter(torch.randn(64, d) * 0.02)]
    for _ in range(n_layer):
        params += [nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)),
                   nn.Parameter(torch.randn(d, 3 * d) * 0.02), nn.Parameter(torch.zeros(3 * d)),
                   nn.Parameter(torch.randn(d, d) * 0.02), nn.Parameter(torch.zeros(d)),
                   nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)),
                   nn.Parameter(torch.randn(d, 4 * d) * 0.02), nn.Parameter(torch.zeros(4 * d)),
                   nn.Parameter(torch.randn(4 * d, d) * 0.02), nn.Parameter(torch.zeros(d))]
    params += [nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))]
    m = nn.ParameterList(params)
    return m.to(DEVICE, dtype)


def fake_loss(model: nn.Module, seed: int) -> torch.Tensor:
    """A loss whose gradient is a fixed random tensor per parameter (cheap, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return sum((p.float() * torch.randn(p.shape, generator=g).to(DEVICE)).sum() for p in model)


def groups(model: nn.Module):
    ps = list(model)
    return [{"params": [p for p in ps if p.dim() >= 2]},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def run(backend: str, dtype, steps: int = 3, accum: int = 4, inf_at=None, tensor_weight=False, **kw):
    model = gpt2_like(dtype=dtype)
    opt = fastaccum.AdamW(groups(model), lr=1e-2, backend=backend, accumulation_steps=accum, **kw)
    n = 0
    for w in range(steps):
        for k in range(accum):
            loss = fake_loss(model, seed=100 * w + k)
            if inf_at == (w, k):
                loss = loss * float("inf")
            weight = 3.0 + k
            if tensor_weight:
                weight = torch.tensor(weight, device=DEVICE)
            opt.backward(loss, weight=weight)
            opt.step()
            opt.zero_grad()
            n += 1
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_step_matches_torch_backend(dtype):
    kw = dict(max_grad_norm=0.5, loss_scale="dynamic", inf_at=(1, 2), tensor_weight=True)
    a, oa = run("triton", dtype, **kw)
    b, ob = run("torch", dtype, **kw)
    assert oa._resident is not None and ob._resident is None
    assert oa.skipped_steps == ob.skipped_steps == 1
    assert oa.loss_scale == ob.loss_scale == 2.0**15
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_params_close(a, b, **tol)
    assert_state_close(oa, ob, **tol)


def test_launches_per_step_do_not_grow_with_tensors(request):
    model = gpt2_like()
    assert len(list(model)) == 148
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", max_grad_norm=1.0, accumulation_steps=2)
    buckets = len(opt._buckets)
    assert buckets == 2
    for k in range(2):  # first window: state allocation happens here
        opt.backward(fake_loss(model, k))
        opt.step()
    names = request.getfixturevalue("triton_launches")  # counted from here on
    opt.backward(fake_loss(model, 5))
    opt.step()
    assert names == [], "a micro-step inside the window launches nothing"
    opt.backward(fake_loss(model, 6))
    opt.step()
    # sumsq per bucket, one finalize, one update per bucket
    assert len(names) <= 2 * buckets + 1, names
    assert names.count("_finalize_kernel") == 1


@contextlib.contextmanager
def _no_host_reads(monkeypatch):
    mode = AtenOps(keep=HOST_SYNC_OPS.__contains__)
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with mode:
        yield mode.seen, calls
    monkeypatch.undo()


@pytest.mark.parametrize("track_noise_scale", [False, True], ids=["plain", "noise-scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_window_reads_no_device_value(monkeypatch, dtype, track_noise_scale):
    """The whole window (backward with a tensor weight, dynamic loss scale, clipping, tensor lr,
    step, zero_grad; with the noise scale: its per-micro-batch norms and the estimator's
    update) reads nothing back. Under the interpreter the kernels themselves go through
    numpy, which this does not see; the optimizer's own Python is what is checked."""
    model = gpt2_like(dtype=dtype)
    lr = torch.tensor(1e-3, device=DEVICE)
    opt = fastaccum.AdamW(groups(model), lr=lr, backend="triton", accumulation_steps=2, max_grad_norm=1.0,
                          loss_scale="dynamic", track_noise_scale=track_noise_scale)
    for k in range(2):  # the first step allocates state
        opt.backward(fake_loss(model, k), weight=torch.tensor(4.0, device=DEVICE))
        opt.step()
        opt.zero_grad()
    losses = [fake_loss(model, 10 + k) for k in range(2)]
    weights = [torch.tensor(5.0, device=DEVICE), torch.tensor(7.0, device=DEVICE)]
    with _no_host_reads(monkeypatch) as (dispatched, called):
        for loss, w in zip(losses, weights):
            opt.backward(loss, weight=w)
            opt.step()
            opt.zero_grad()
        norm = opt.clip_grad_norm_(1.0)  # a device tensor, not read
    assert dispatched == [] and called == [], (dispatched, called)
    assert isinstance(norm, torch.Tensor)
    assert opt.skipped_steps == 0 and opt.loss_scale == 2.0**16  # lazy reads, after the fact
    if track_noise_scale:  # both windows were fed (read now: the one sync asked for)
        est = opt.noise_scale_estimator
        assert est.windows == 2 and est.unestimable_windows == 0 and opt.stats()["noise_windows"] == 2


@pytest.mark.parametrize("master_weights", [True, False])
def test_stochastic_rounding_steps_repeat_their_arguments_and_read_nothing(monkeypatch, master_weights):
    """bf16 moments (and bf16 parameters without masters): rounded stochastically. A resident
    step launches its kernels with the same arguments every step (so a captured CUDA graph's
    replays match eager steps) and reads no host value; the noise still changes from step to
    step, counted on the device (tests/test_triton_kernels.py checks that at the kernel)."""
    from fastaccum.backends import triton_kernels as K

    model = gpt2_like(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", state_dtype=torch.bfloat16,
                          master_weights=master_weights, accumulation_steps=2, capturable=True)
    launches = []
    real = K._launch

    def recording(spec, grid, *args, **kw):
        if spec.kernel.fn.__name__ == "_adam_kernel":
            launches.append(tuple(a for a in args if not isinstance(a, torch.Tensor)))
        return real(spec, grid, *args, **kw)

    def window(seed):
        for k in range(2):
            opt.backward(fake_loss(model, seed + k))
            opt.step()
            opt.zero_grad()

    window(0)  # allocates the state
    monkeypatch.setattr(K, "_launch", recording)
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in model]
    window(10)
    with _no_host_reads(monkeypatch) as (dispatched, called):
        window(20)
    assert dispatched == [] and called == [], (dispatched, called)
    buckets = len(opt._buckets)
    assert len(launches) == 2 * buckets
    assert launches[:buckets] == launches[buckets:], "a step's kernel arguments changed"
    assert all(args[-1] != 0 for args in launches), "stochastic rounding without a seed"
    assert any(not torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(model, exp_avg))


def test_non_contiguous_parameter_goes_to_a_torch_bucket():
    torch.manual_seed(0)
    w = torch.randn(6, 5, device=DEVICE).t()  # a transposed view: storage order != logical order
    p = nn.Parameter(w)
    q = nn.Parameter(torch.randn(7, device=DEVICE))
    assert not p.is_contiguous()
    opt = fastaccum.AdamW([p, q], lr=1e-2, backend="triton")
    assert sorted(b.backend.name for b in opt._buckets) == ["torch", "triton"]
    ref_p, ref_q = nn.Parameter(p.detach().clone()), nn.Parameter(q.detach().clone())
    ref = torch.optim.AdamW([ref_p, ref_q], lr=1e-2)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        gp, gq = torch.randn(5, 6, generator=g).to(DEVICE), torch.randn(7, generator=g).to(DEVICE)
        for x, y, gx, gy in ((p, q, gp, gq), (ref_p, ref_q, gp, gq)):
            ((x * gx).sum() + (y * gy).sum()).backward()
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.detach(), ref_q.detach(), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_on_the_resident_path():
    a, oa = run("triton", torch.float32, steps=2)
    sd = oa.state_dict()
    b = gpt2_like()
    b.load_state_dict(a.state_dict())
    ob = fastaccum.AdamW(groups(b), lr=1e-2, backend="triton", accumulation_steps=4)
    ob.load_state_dict(sd)
    for opt, model in ((oa, a), (ob, b)):
        for k in range(4):
            opt.backward(fake_loss(model, 900 + k), weight=2.0)
            opt.step()
            opt.zero_grad()
    assert_params_close(a, b, rtol=0, atol=0)


def test_a_resumed_run_rounds_as_the_run_that_saved_it():
    """Stochastic rounding on the resident step keeps one seed per bucket (drawn once): the
    state_dict carries the seeds, so a run resumed from it (whatever torch's RNG holds then)
    rounds as the saved run goes on to round, bit for bit; a corrupt seed entry is refused."""
    def make(model):
        return fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", state_dtype=torch.bfloat16,
                               master_weights=False, accumulation_steps=2)

    def windows(opt, model, seeds):
        for s in seeds:
            for k in range(2):
                opt.backward(fake_loss(model, s + k))
                opt.step()
                opt.zero_grad()

    torch.manual_seed(0)
    a = gpt2_like(dtype=torch.bfloat16)
    oa = make(a)
    windows(oa, a, [0, 10])
    assert oa._device_seeds, "no stochastic rounding seed was drawn"
    sd = oa.state_dict()
    b = gpt2_like(dtype=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(12345)  # another RNG state: seeds drawn now would differ
    ob = make(b)
    bad = {**sd, "fastaccum": {**sd["fastaccum"], "device_seeds": ["x"] * len(ob._buckets)}}
    with pytest.raises(ValueError, match="device_seeds"):
        ob.load_state_dict(bad)
    ob.load_state_dict(sd)
    windows(oa, a, [20, 30])
    windows(ob, b, [20, 30])
    assert_params_close(a, b, rtol=0, atol=0)
    for p, q in zip(a, b):
        assert torch.equal(oa.state[p]["exp_avg"], ob.state[q]["exp_avg"])


def test_capturable_needs_the_resident_step():
    p = nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="capturable=True needs the device-resident step"):
        fastaccum.AdamW([p], backend="torch", capturable=True)
    assert not hasattr(p, "main_grad") and p._post_accumulate_grad_hooks in (None, {}), "the refusal left nothing"
    opt = fastaccum.AdamW([nn.Parameter(torch.randn(5, device=DEVICE))], backend="triton", capturable=True)
    assert opt._resident is not None and opt.param_groups[0]["capturable"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_the_step(dtype):
    """opt.step() captured once in a CUDA graph and replayed equals eager steps: nothing in
    the resident step reads the device, allocates outside the graph's pool or changes its
    kernels' arguments from one step to the next (gradients fed through static tensors)."""
    torch.manual_seed(0)
    model, ref = gpt2_like(dtype=dtype), gpt2_like(dtype=dtype)
    kw = dict(lr=1e-3, backend="triton", max_grad_norm=0.5, loss_scale=None)
    opt = fastaccum.AdamW(list(model), capturable=True, **kw)
    ref_opt = fastaccum.AdamW(list(ref), **kw)
    params, ref_params = list(model), list(ref)
    static = [torch.zeros_like(p) for p in params]

    def grads(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(p.shape, generator=g, device="cuda").to(dtype) for p in params]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps on a side stream, as capture requires
        for s in range(3):
            for p, q, g in zip(params, ref_params, grads(s)):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
    torch.cuda.current_stream().wait_stream(side)
    for p, s in zip(params, static):
        p.grad = s  # the graph folds these into the buffers at every replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for s in range(3, 8):
        for st, q, g in zip(static, ref_params, grads(s)):
            st.copy_(g)
            q.grad = g.clone()
        graph.replay()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.cuda.synchronize()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **tol)


# ---------------------------------------------------------------- the noise scale on the device
def signal_loss(model: nn.Module, seed: int) -> torch.Tensor:
    """A loss whose gradient is a fixed signal plus fresh noise per micro-batch (so that both
    |G|² and tr(Σ) are resolved and the noise scale is a finite positive number)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.Generator().manual_seed(12345)
    return sum((p.float() * (torch.randn(p.shape, generator=s) + 0.8 * torch.randn(p.shape, generator=g)).to(DEVICE))
               .sum() for p in model)


def noise_run(backend: str, dtype, *, windows: int = 5, accum: int = 3, inf_at=(2, 1), tensor_weight=False, **kw):
    model = gpt2_like(n_layer=2, dtype=dtype)
    opt = fastaccum.AdamW(groups(model), lr=1e-2, backend=backend, accumulation_steps=accum,
                          track_noise_scale=True, **kw)
    for w in range(windows):
        for k in range(accum):
            loss = signal_loss(model, seed=100 * w + k)
            if (w, k) == inf_at:
                loss = loss * float("inf")
            weight = (3.0, 8.0, 5.0, 2.0)[(w + k) % 4]  # uneven, and not the same in every window
            opt.backward(loss, weight=torch.tensor(weight, device=DEVICE) if tensor_weight else weight)
            opt.step()
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("tensor_weight", [False, True], ids=["float-weights", "tensor-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_noise_scale_equals_the_host_decided_one(dtype, tensor_weight):
    """track_noise_scale=True now keeps the triton step on the device, and its estimate is the
    host-decided step's (torch backend): same windows (the inf window skipped and not counted),
    same formula; fp32 micro-batches report once per window, bf16 ones at every fold."""
    kw = dict(loss_scale="dynamic", max_grad_norm=0.5, tensor_weight=tensor_weight)
    a, b = noise_run("triton", dtype, **kw), noise_run("torch", dtype, **kw)
    assert a._resident is not None and b._resident is None
    assert a.skipped_steps == b.skipped_steps == 1
    ea, eb = a.noise_scale_estimator, b.noise_scale_estimator
    assert ea.windows == eb.windows == 4 and ea.unestimable_windows == eb.unestimable_windows == 0
    assert eb.value is not None and eb.value > 0
    # fp32 norms summed in another order (the bucket partials, the triton norm of each fold)
    for name in ("value", "g2", "trace"):
        assert getattr(ea, name) == pytest.approx(getattr(eb, name), rel=2e-6), name
    assert a.stats()["noise_scale"] == pytest.approx(b.stats()["noise_scale"], rel=2e-6)
    assert a._window.last_noise[2] == b._window.last_noise[2] == (1 if dtype == torch.float32 else 3)


def test_resident_unestimable_windows_skip_the_skipped_one():
    """Without accumulation no window is estimable (one batch size): each applied window counts
    as left out, the skipped one does not -- decided on the device, equal to the host's count."""
    a = noise_run("triton", torch.float32, windows=4, accum=1, inf_at=(1, 0), loss_scale="dynamic")
    b = noise_run("torch", torch.float32, windows=4, accum=1, inf_at=(1, 0), loss_scale="dynamic")
    assert a._resident is not None and b._resident is None
    assert a.skipped_steps == b.skipped_steps == 1
    assert a.noise_scale_estimator.windows == b.noise_scale_estimator.windows == 0
    assert a.noise_scale_estimator.unestimable_windows == b.noise_scale_estimator.unestimable_windows == 3


def _computing_ops() -> AtenOps:
    """aten ops that compute (views left out): on a GPU, each is a kernel launch."""
    return AtenOps(keep=lambda func: not func.is_view)


# aten ops the noise scale adds to a window's last step() (its sums, |G_B|², the estimator's
# device update; 28 with torch 2.13, host weights, dynamic loss scale and clipping): a
# constant, whatever the number of tensors and buckets, queued without a sync
NOISE_OPS_PER_WINDOW = 32


def _last_step_ops(request, n_layer: int, track: bool):
    model = gpt2_like(n_layer=n_layer)
    opt = fastaccum.AdamW(groups(model), lr=1e-3, backend="triton", accumulation_steps=2, max_grad_norm=1.0,
                          loss_scale="dynamic", track_noise_scale=track)
    assert opt._resident is not None
    for k in range(2):  # first window: state allocation happens here
        opt.backward(fake_loss(model, k), weight=3.0)
        opt.step()
    names = request.getfixturevalue("triton_launches")
    names.clear()
    opt.backward(fake_loss(model, 5), weight=4.0)
    first = _computing_ops()
    with first:
        opt.step()
    assert names == [], "a micro-step inside the window launches no bucket kernel"
    opt.backward(fake_loss(model, 6), weight=5.0)
    last = _computing_ops()
    with last:
        opt.step()
    return len(opt._buckets), list(names), [str(f) for f in first.seen], [str(f) for f in last.seen]


def test_noise_scale_adds_no_bucket_launch_and_a_constant_of_small_ops(request):
    for n_layer in (2, 12):
        buckets, names, first, last = _last_step_ops(request, n_layer, track=True)
        _, plain_names, plain_first, plain_last = _last_step_ops(request, n_layer, track=False)
        assert buckets == 2
        # sumsq per bucket, one finalize, one update per bucket: the target, unchanged
        assert names == plain_names and len(names) == 2 * buckets + 1, names
        assert names.count("_finalize_kernel") == 1
        # a micro-batch's close: its norm summed over the buckets that measured it, per unit of weight
        assert len(first) - len(plain_first) <= buckets, first
        extra = len(last) - len(plain_last)
        assert 0 < extra <= NOISE_OPS_PER_WINDOW, (extra, last)
        if n_layer == 2:
            extra_small = extra
    assert extra == extra_small, "the noise scale's ops do not grow with the number of tensors"


def test_capturable_refuses_the_noise_scale():
    p = nn.Parameter(torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="capturable=True .* noise scale"):
        fastaccum.AdamW([p], backend="triton", capturable=True, track_noise_scale=True)
