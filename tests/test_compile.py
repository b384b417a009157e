"""``opt.step()`` inside ``torch.compile``: the step's host side runs eagerly (a graph break) and
the bucket kernels run as the ``fastaccum::*`` custom ops in the compiled graph; the numbers are
those of the eager step. Triton backend under the interpreter on CPU tensors here (the ops are
opaque to the compiler, so it never traces into the interpreter), on CUDA when a GPU is present.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastaccum

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Graphs:
    """A torch.compile backend that records the call targets of every graph, then runs it as
    ``aot_eager`` (functionalised: the ops get copies of what they write) or ``eager``."""

    def __init__(self, then: str) -> None:
        self.then = then
        self.targets = []

    def __call__(self, gm, inputs):
        self.targets.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.then)(gm, inputs)

    def ops(self):
        return [t for g in self.targets for t in g if t.startswith("fastaccum.")]


def make(dtype, opt_cls, accum, **kw):
    torch.manual_seed(0)  # also the stochastic-rounding seeds, drawn at the first step
    # a segment of three tiles (13 * 316 elements) among one-tile ones
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 316), nn.Linear(316, 1)).to(DEVICE, dtype)
    opt = opt_cls(model.parameters(), accumulation_steps=accum, **kw)
    return model, opt


def train(model, opt, step_fn, steps, accum, scheduler=False):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if scheduler else None
    g = torch.Generator().manual_seed(1)
    for s in range(steps * accum):
        x = torch.randn(5, 7, generator=g).to(DEVICE, next(model.parameters()).dtype)
        step_fn(x, float(3 + s))
        if sched is not None and (s + 1) % accum == 0:
            sched.step()


def assert_same(a, oa, b, ob):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert set(sa) == set(sb)
    for k in sb:
        for name in sb[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    assert oa.loss_scale == ob.loss_scale and oa.skipped_steps == ob.skipped_steps
    assert oa.stats() == ob.stats()  # norm, effective batch, noise scale: what the host side computed


CASES = {
    # name: (param dtype, optimizer, its arguments)
    "adamw-fp32-clip-dynamic-scale": (torch.float32, fastaccum.AdamW,
                                      dict(lr=1e-2, max_grad_norm=0.5, loss_scale="dynamic")),
    "adamw-bf16-stochastic-moments": (torch.bfloat16, fastaccum.AdamW,
                                      dict(lr=1e-2, state_dtype=torch.bfloat16, max_grad_norm=1.0)),
    "sgd-bf16-no-master-nesterov": (torch.bfloat16, fastaccum.SGD,
                                    dict(lr=1e-2, momentum=0.9, nesterov=True, master_weights=False)),
    # the host side reads the partial sums and the skip flag after the launches that write them
    "adamw-fp32-noise-scale": (torch.float32, fastaccum.AdamW, dict(lr=1e-2, track_noise_scale=True)),
}


# every case functionalised (aot_eager: the ops write copies), one also as plain graphs (eager)
@pytest.mark.parametrize("case,managed,then", [(c, m, "aot_eager") for c in sorted(CASES) for m in (False, True)]
                         + [("adamw-fp32-clip-dynamic-scale", True, "eager")])
def test_compiled_train_step_equals_eager(case, managed, then):
    """A whole train step compiled (forward, backward, step, zero_grad; ``opt.backward`` with
    token weights in the managed loop, an lr scheduler between steps): the same parameters and
    state, bit for bit, as the same loop run eagerly; the step's kernels ran as custom ops in a
    compiled graph."""
    dtype, cls, kw = CASES[case]
    accum = 2 if managed else 1
    kw = dict(kw, backend="triton")
    runs = []
    for compiled in (True, False):
        model, opt = make(dtype, cls, accum, **kw)
        assert opt._resident is not None

        def step(x, w, model=model, opt=opt):
            loss = model(x).float().pow(2).mean()
            if managed:
                opt.backward(loss, weight=w)
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        graphs = Graphs(then)
        torch._dynamo.reset()
        train(model, opt, torch.compile(step, backend=graphs) if compiled else step, 3, accum, scheduler=True)
        runs.append((model, opt, graphs))
    (a, oa, graphs), (b, ob, _) = runs
    assert_same(a, oa, b, ob)
    kernel = "fastaccum.bucket_adam.default" if cls is fastaccum.AdamW else "fastaccum.bucket_sgd.default"
    assert kernel in graphs.ops(), graphs.targets
    # the noise scale's host side reads finalize's skip flag: finalize then runs in the graph break
    assert ("fastaccum.finalize.default" in graphs.ops()) != bool(kw.get("track_noise_scale")), graphs.targets


def test_compiled_step_alone_routes_through_the_ops():
    """``torch.compile(opt.step)``: one graph, holding the norm, finalize and update ops of every
    bucket (fp32 and bf16 parameters: two buckets), and no recompilation from step to step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Linear(13, 1)).to(DEVICE)
    model[1].to(torch.bfloat16)
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="triton", max_grad_norm=1.0)
    assert len(opt._buckets) == 2
    graphs = Graphs("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=graphs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(5, 7, generator=g).to(DEVICE)
        model[1](model[0](x).bfloat16()).float().pow(2).sum().backward()
        step()
        opt.zero_grad()
    assert len(graphs.targets) == 1, graphs.targets
    assert sorted(graphs.ops()) == sorted(["fastaccum.bucket_sumsq.default"] * 2 + ["fastaccum.finalize.default"]
                                          + ["fastaccum.bucket_adam.default"] * 2)
    assert opt.state[model[0].weight]["step"].item() == 4.0


def test_compiled_step_of_a_host_backend_runs_eagerly():
    """Without bucket kernels (the cpu and torch backends) the whole step runs in the graph
    break: same numbers as eager, no op in any graph."""
    runs = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(7, 3)
        opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch", max_grad_norm=1.0)
        graphs = Graphs("eager")
        torch._dynamo.reset()
        step = torch.compile(opt.step, backend=graphs) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            model(torch.randn(5, 7, generator=g)).pow(2).sum().backward()
            step()
            opt.zero_grad()
        runs.append((model, opt, graphs))
    (a, oa, graphs), (b, ob, _) = runs
    assert_same(a, oa, b, ob)
    assert graphs.ops() == []


def test_fullgraph_is_refused():
    """A step has host work at every call (documented): fullgraph=True cannot hold, and the
    compiler says so instead of tracing the host side."""
    model = nn.Linear(7, 3).to(DEVICE)
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="triton")
    model(torch.randn(5, 7, device=DEVICE)).sum().backward()
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
