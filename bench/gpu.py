"""GPU benchmark of the optimizer step and of a whole accumulation window, one H100 in < 8 min.

    python bench/gpu.py                      # GPT-2 124M / 350M / 1.3B shapes, ~5 min on an H100
    python bench/gpu.py --quick              # 124M only, fewer repeats (~1 min)
    python bench/gpu.py --json out.json      # also write every row as JSON
    python bench/gpu.py --smoke              # CPU, tiny model, backend "torch": checks the script runs

It uses only fastaccum's public API (``fastaccum.AdamW(..., backend=, accumulation_steps=,
max_grad_norm=)``, ``opt.backward(loss, weight=)``, ``opt.step()``, ``opt.zero_grad()``), so
the same script measures today's kernels and any later ones.

Rows
  step    the optimizer step alone (gradients delivered untimed before each repeat):
          fastaccum bf16 params + fp32 masters, fastaccum fp32, and torch.optim.AdamW
          fused / foreach on fp32 params with ``clip_grad_norm_`` (the torch recipe);
          ``fastaccum-bf16-graph``: the bf16 step captured in a CUDA graph (``capturable=True``)
          and replayed, the same kernels without host time between them (GPU only).
  window  a full accumulation window of 1 or 8 micro-batches, gradient delivery and
          accumulation included: fastaccum (``opt.backward`` x N, ``step``/``zero_grad`` every
          micro-batch) vs torch (fp32 params, ``(loss / N).backward()`` x N, autograd
          accumulates into ``.grad``, ``clip_grad_norm_`` + fused AdamW).
          bf16 parameters twice, an A/B of the fold of their gradients into the fp32 buffers:
          ``fastaccum-bf16`` the batched fold (the default: gradients held during backward and
          folded in one launch per group), ``fastaccum-bf16-param`` the per-parameter fold
          (``FASTACCUM_FOLD_CAP_MB=0``: one launch per gradient). ``--fold`` picks one of them.

The backward of the simulated model costs no matmuls: one autograd node returns prepared
gradients times the upstream gradient (one ``_foreach_mul``, fresh tensors as a layer's
backward would produce), so the window rows time what the optimizer adds to a training step.

Bytes per parameter (``B/p``) count the minimal traffic of each recipe, so GB/s says how well
each moves its own bytes; compare implementations by ms (and ``x fused``):
  torch AdamW fp32 with clip_grad_norm_: norm read 4 + clip scale read/write 8 + step 28 = 40
  fastaccum fp32 with max_grad_norm:     norm read 4 + step (g,p,m,v read, p,m,v write) 28 = 32
  fastaccum bf16 + fp32 master:          norm read 4 + g,m,v,master read 16 + m,v,master write 12
                                         + bf16 param write 2 = 34
  window rows add, per micro-batch, the delivery (prepared grad read + fresh grad write) and the
  accumulation traffic of that recipe (see ``_window_bytes``).
``% copy`` is GB/s over the device-to-device bandwidth of ``dst.copy_(src)`` (read + write
counted) measured at the start of the same run. ``launches`` counts device kernels (and
memcpy/memset) per timed repeat with torch.profiler. ``peak MB`` is what one repeat allocates
on the device at its peak beyond what was allocated before it (the held gradients of the
batched fold show here). ``sync`` runs one timed repeat under
``torch.cuda.set_sync_debug_mode("error")`` and says whether a host sync raised.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import os

import torch
from torch import Tensor

# Run as ``python bench/gpu.py`` from a checkout: measure that checkout's fastaccum, not
# whichever copy is installed in the environment.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "fastaccum")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import fastaccum  # noqa: E402

# --------------------------------------------------------------------------- models
#: (name, vocab, context, width, layers). 124M is GPT-2 small (148 tensors), 350M GPT-2
#: medium, 1.3B the GPT-3 XL shape (width 2048, 24 layers).
MODELS = {
    "124M": (50257, 1024, 768, 12),
    "350M": (50257, 1024, 1024, 24),
    "1.3B": (50257, 2048, 2048, 24),
    "smoke": (97, 16, 8, 2),
}


def gpt_shapes(vocab: int, ctx: int, d: int, layers: int) -> List[Tuple[int, ...]]:
    """Parameter shapes of a GPT-2 style model, in module order (tied output embedding)."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),  # ln_1 weight, bias
                   (3 * d, d), (3 * d,),  # attention qkv
                   (d, d), (d,),  # attention output projection
                   (d,), (d,),  # ln_2
                   (4 * d, d), (4 * d,),  # mlp fc
                   (d, 4 * d), (d,)]  # mlp proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def make_params(shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> List[Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
        out.append(torch.nn.Parameter(t))
    return out


def make_grads(params: Sequence[Tensor]) -> List[Tensor]:
    gen = torch.Generator(device=params[0].device).manual_seed(1)
    return [torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(1e-3).to(p.dtype)
            for p in params]


class _Deliver(torch.autograd.Function):
    """Forward: a scalar that depends on every parameter. Backward: the prepared gradients
    times the upstream gradient, as fresh tensors (one ``_foreach_mul``), so the loss scale
    and micro-batch weight an optimizer folds into the loss reach the gradients as in a model.

    The upstream gradient is cast to the gradients' dtype first, as a bf16 model's backward
    works in bf16: a bf16 list times an fp32 scalar tensor would leave ``_foreach_mul``'s
    fused path for one unvectorised launch per tensor (measured on an H100: a third of a 1.3B
    bf16 window's device time and most of a 124M one's host time), which no bf16 model pays."""

    @staticmethod
    def forward(ctx: Any, grads: List[Tensor], *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = grads
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        return (None, *torch._foreach_mul(ctx.grads, grad_out.to(ctx.grads[0].dtype)))


def simulated_loss(params: Sequence[Tensor], grads: List[Tensor]) -> Tensor:
    return _Deliver.apply(grads, *params)


# --------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on a GPU (device time, no sync inside the timed region), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: List[Tuple[Any, Any]] = []

    def time(self, fn: Callable[[], None]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.pending.append((t0, time.perf_counter()))

    def results_ms(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.pending]
        return [(e - s) * 1e3 for s, e in self.pending]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device-to-device ``dst.copy_(src)`` bandwidth, read + write counted (best of ``repeats``)."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    clock = Clock(device)
    for _ in range(repeats):
        clock.time(lambda: dst.copy_(src))
    best = min(clock.results_ms())
    del src, dst
    return 2 * nbytes / (best * 1e-3) / 1e9


def count_launches(device: torch.device, fn: Callable[[], None]) -> Optional[int]:
    """Device kernels (and memcpy/memset) that ``fn`` launches, via torch.profiler; None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_extra_mb(device: torch.device, fn: Callable[[], None]) -> Optional[float]:
    """Device memory ``fn`` allocates at its peak beyond what was allocated before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def sync_check(device: torch.device, fn: Callable[[], None]) -> str:
    """'none' when ``fn`` ran under set_sync_debug_mode('error') without a host sync, else the error."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return "raised: " + str(e).strip().splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "none"


# --------------------------------------------------------------------------- recipes
@dataclass
class Row:
    model: str
    stage: str  # "step" or "window"
    micro_batches: int
    impl: str
    params: int
    tensors: int
    bytes_per_param: float
    ms: Optional[float] = None
    ms_samples: List[float] = field(default_factory=list)
    gbps: Optional[float] = None
    pct_copy: Optional[float] = None
    x_fused: Optional[float] = None
    launches: Optional[int] = None
    peak_mb: Optional[float] = None
    sync: str = ""
    error: str = ""


STEP_BYTES = {"fastaccum-bf16": 34, "fastaccum-fp32": 32, "torch-fused": 40, "torch-foreach": 40}
#: FASTACCUM_FOLD_CAP_MB while each implementation's optimizer is built (None: as the environment
#: says, i.e. the default batched fold); the per-parameter fold is the A/B reference
FOLD_CAP_MB = {"fastaccum-bf16-param": "0"}
STEP_BYTES["fastaccum-bf16-param"] = STEP_BYTES["fastaccum-bf16"]
#: the bf16 step captured once in a CUDA graph (capturable=True) and replayed: the same kernels
#: and bytes, without the host's Python between them (CUDA only)
STEP_BYTES["fastaccum-bf16-graph"] = STEP_BYTES["fastaccum-bf16"]


@contextlib.contextmanager
def _fold_cap(impl: str):
    """The environment an implementation's optimizer is built in (read at construction)."""
    value = FOLD_CAP_MB.get(impl)
    old = os.environ.get("FASTACCUM_FOLD_CAP_MB")
    if value is not None:
        os.environ["FASTACCUM_FOLD_CAP_MB"] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                del os.environ["FASTACCUM_FOLD_CAP_MB"]
            else:
                os.environ["FASTACCUM_FOLD_CAP_MB"] = old


def _window_bytes(impl: str, n_micro: int) -> float:
    """Minimal bytes per parameter of one window: delivery + accumulation + the step.

    Delivery per micro-batch: read the prepared gradient, write a fresh one (param dtype).
    Accumulation: the first micro-batch's gradient is stored as it is (fp32: autograd keeps
    the fresh tensor; bf16: copied into the fp32 buffer, 2 read + 4 write), each later one is
    added (fp32: 4+4 read, 4 write; bf16 into the fp32 buffer: 2+4 read, 4 write)."""
    low = impl.startswith("fastaccum-bf16")
    size = 2 if low else 4
    delivery = 2 * size * n_micro
    first = (size + 4) if low else 0
    later = (size + 4 + 4) * (n_micro - 1)
    return delivery + first + later + STEP_BYTES[impl]


class Recipe:
    """One implementation on one model: ``prepare()`` (untimed) and ``run()`` (timed)."""

    def __init__(self, impl: str, shapes, device: torch.device, stage: str, n_micro: int, smoke: bool) -> None:
        self.impl, self.stage, self.n_micro, self.device = impl, stage, n_micro, device
        dtype = torch.bfloat16 if impl.startswith("fastaccum-bf16") else torch.float32
        self.params = make_params(shapes, dtype, device)
        self.grads = make_grads(self.params)
        lr, wd = 1e-4, 0.1
        self.graph = None
        if impl.startswith("fastaccum"):
            accum = n_micro if stage == "window" else 1
            with _fold_cap(impl):
                self.opt = fastaccum.AdamW(self.params, lr=lr, weight_decay=wd,
                                           backend="torch" if smoke else "triton", accumulation_steps=accum,
                                           max_grad_norm=1.0, capturable=impl.endswith("-graph"))
        else:
            kind = impl.split("-")[1]
            self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=wd,
                                         fused=kind == "fused", foreach=kind == "foreach")

    def _loss(self) -> Tensor:
        return simulated_loss(self.params, self.grads)

    def _torch_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)  # returns a tensor: no host sync
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        """Warm up on a side stream (as capture requires), deliver one micro-batch, capture
        ``opt.step()``. A replay reruns the step's kernels on the buffers as they are: the same
        device work as an eager step after a backward, with no host work between kernels."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.backward(self._loss(), weight=1024.0)
                self.opt.step()
                self.opt.zero_grad()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.backward(self._loss(), weight=1024.0)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.opt.step()

    def prepare(self) -> None:
        """Step rows: deliver one micro-batch of gradients (untimed)."""
        if self.stage != "step":
            return
        if self.impl.endswith("-graph"):
            if self.graph is None:
                self._capture()
            return
        if self.impl.startswith("fastaccum"):
            self.opt.backward(self._loss(), weight=1024.0)
        else:
            self._loss().backward()

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.stage == "step":
            if self.impl.startswith("fastaccum"):
                self.opt.step()
                self.opt.zero_grad()
            else:
                self._torch_step()
            return
        for _ in range(self.n_micro):
            if self.impl.startswith("fastaccum"):
                # weight = tokens of the micro-batch: the update is the token-weighted mean
                self.opt.backward(self._loss(), weight=1024.0)
                self.opt.step()  # counts the micro-batch; updates on the window's last one
                self.opt.zero_grad()
            else:
                (self._loss() / self.n_micro).backward()
        if not self.impl.startswith("fastaccum"):
            self._torch_step()


def measure(recipe: Recipe, repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        recipe.prepare()
        recipe.run()
    synchronize(recipe.device)
    clock = Clock(recipe.device)
    for _ in range(repeats):
        recipe.prepare()
        clock.time(recipe.run)
    return clock.results_ms()


def bench_row(model: str, shapes, impl: str, stage: str, n_micro: int, device: torch.device, repeats: int,
              warmup: int, copy_gbps: Optional[float], smoke: bool) -> Row:
    n = sum(math.prod(s) for s in shapes)
    bpp = STEP_BYTES[impl] if stage == "step" else _window_bytes(impl, n_micro)
    row = Row(model, stage, n_micro, impl, n, len(shapes), bpp)
    recipe = None
    try:
        recipe = Recipe(impl, shapes, device, stage, n_micro, smoke)
        samples = measure(recipe, repeats, warmup)
        row.ms_samples = [round(s, 4) for s in samples]
        row.ms = statistics.median(samples)
        row.gbps = bpp * n / (row.ms * 1e-3) / 1e9
        if copy_gbps:
            row.pct_copy = 100 * row.gbps / copy_gbps
        recipe.prepare()
        row.launches = count_launches(device, recipe.run)
        recipe.prepare()
        row.peak_mb = peak_extra_mb(device, recipe.run)
        recipe.prepare()
        synchronize(device)
        row.sync = sync_check(device, recipe.run)
    except Exception as e:  # one failing implementation must not end an unattended run
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    finally:
        del recipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fill_ratios(rows: List[Row]) -> None:
    """``x_fused``: time over torch fused AdamW's time in the same (model, stage, micro-batches)."""
    base = {(r.model, r.stage, r.micro_batches): r.ms for r in rows if r.impl == "torch-fused" and r.ms}
    for r in rows:
        b = base.get((r.model, r.stage, r.micro_batches))
        if b and r.ms:
            r.x_fused = r.ms / b


def print_table(rows: List[Row], copy_gbps: Optional[float], device_name: str) -> None:
    bw = f"{copy_gbps:.0f} GB/s" if copy_gbps else "n/a"
    print(f"\ndevice: {device_name}; device-to-device copy bandwidth: {bw}")
    head = f"{'model':6} {'stage':6} {'N':>2} {'impl':20} {'B/p':>4} {'ms':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'x fused':>7} {'launch':>6} {'peak MB':>8}  sync"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        line = (f"{r.model:6} {r.stage:6} {r.micro_batches:>2} {r.impl:20} {r.bytes_per_param:>4.0f} "
                f"{f(r.ms, '9.3f'):>9} {f(r.gbps, '7.1f'):>7} {f(r.pct_copy, '6.1f'):>6} "
                f"{f(r.x_fused, '7.2f'):>7} {f(r.launches, 'd'):>6} {f(r.peak_mb, '8.1f'):>8}  {r.sync}")
        if r.error:
            line += f"  ERROR {r.error}"
        print(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="124M only, fewer repeats")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, backend torch: checks the script runs")
    ap.add_argument("--json", metavar="PATH", help="write the rows (and the copy bandwidth) as JSON")
    ap.add_argument("--models", help="comma-separated subset of " + ",".join(k for k in MODELS if k != "smoke"))
    ap.add_argument("--repeats", type=int, help="timed repeats per row (median reported)")
    ap.add_argument("--fold", choices=("both", "batched", "param"), default="both",
                    help="window rows of bf16 parameters with the batched fold, the per-parameter fold, or both (A/B)")
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        models, repeats, warmup = ["smoke"], args.repeats or 3, 1
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA device (use --smoke to check the script on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        models = ["124M"] if args.quick else ["124M", "350M", "1.3B"]
        repeats, warmup = (args.repeats or (10 if args.quick else 20)), 3
    if args.models:
        models = [m.strip() for m in args.models.split(",")]
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy_gbps = copy_bandwidth_gbps(device, 1 << 20 if args.smoke else 1 << 30, repeats=3 if args.smoke else 20)
    t0 = time.perf_counter()
    rows: List[Row] = []
    bf16 = {"both": ["fastaccum-bf16", "fastaccum-bf16-param"], "batched": ["fastaccum-bf16"],
            "param": ["fastaccum-bf16-param"]}[args.fold]
    graph = ["fastaccum-bf16-graph"] if device.type == "cuda" else []
    plan = [("step", 1, ["fastaccum-bf16", *graph, "fastaccum-fp32", "torch-fused", "torch-foreach"]),
            ("window", 1, [*bf16, "fastaccum-fp32", "torch-fused"]),
            ("window", 8, [*bf16, "fastaccum-fp32", "torch-fused"])]
    for model in models:
        shapes = gpt_shapes(*MODELS[model])
        for stage, n_micro, impls in plan:
            for impl in impls:
                row = bench_row(model, shapes, impl, stage, n_micro, device, repeats, warmup, copy_gbps, args.smoke)
                rows.append(row)
                print(f"  {model} {stage} N={n_micro} {impl}: "
                      + (f"{row.ms:.3f} ms" if row.ms is not None else f"ERROR {row.error}"), flush=True)
    fill_ratios(rows)
    print_table(rows, copy_gbps, device_name)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        meta = dict(device=device_name, torch=torch.__version__, fastaccum=fastaccum.__version__,
                    copy_gbps=copy_gbps, repeats=repeats, warmup=warmup, bytes_per_param_step=STEP_BYTES,
                    fold_cap_mb=os.environ.get("FASTACCUM_FOLD_CAP_MB"), fold=args.fold)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0 if all(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
