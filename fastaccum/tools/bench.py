"""The one benchmark harness: ``fastaccum bench`` and the pytest-benchmark suites in ``bench/``
both build their optimizers, gradients and byte counts here.

What is measured
----------------
* **step**: one optimizer update, ``opt.step(); opt.zero_grad()``, with fresh gradients
  delivered (untimed) by a backward pass before every timed step. Plain AdamW: no loss
  scaling, no clipping.
* **cycle**: one full accumulation window as a training loop runs it: ``N`` micro-batch
  backward passes, loss scaling (dynamic), global-norm clipping (``max_norm=1``) and the
  update. torch rows use the standard recipe (``GradScaler.scale(loss / N).backward()`` per
  micro-batch, then ``unscale_``, ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``,
  ``zero_grad(set_to_none=True)``); fastaccum rows use the managed loop
  (``accumulation_steps=N, loss_scale="dynamic", max_grad_norm=1``; ``opt.backward(loss)``,
  ``opt.step()``, ``opt.zero_grad()`` every micro-batch).

How gradients are simulated (no model)
--------------------------------------
A single autograd node (:class:`_Deliver`) whose backward returns ``g_micro * grad_output``
for every parameter: the gradient arrives through autograd exactly as a model's would (a
freshly written tensor, scaled by the loss scale, handed to ``AccumulateGrad``; torch steals
it on the first micro-batch and adds in place afterwards; fastaccum's hook copies the first
micro-batch's gradient into the stale buffer segment and its fp32 views add in place
afterwards, its bf16 hook adds into the fp32 buffer). Both sides pay the same cost to *produce*
the gradient (read ``g_micro``, write the fresh tensor); what differs is exactly what differs
in a real training loop. Two precomputed gradient sets alternate, to bound memory.

Bytes per parameter
-------------------
The step is memory-bound, so every row reports GB/s = ``bytes_per_param * params / time``
for the traffic *that implementation's algorithm* has to move (minimum traffic: each array
read or written once per pass, no cache reuse, no write-allocate reads), and the percentage
of the streaming bandwidth measured in the same run. A row near 100 % is at its own memory
bound; which implementation is faster is the ``ratio`` column (time of torch fused AdamW /
time of the row). :func:`bytes_per_param` has the table with its derivation.

JSON (``fastaccum bench --json``, schema ``fastaccum.bench/1``)
-------------------------------------------------------------
Top level: ``schema``, ``created_utc``, ``elapsed_s``, ``command``, ``config`` (sizes, accum,
dtypes, modes, device, threads, repeats, warmup, hyper-parameters, ``schedules`` per group:
interleaved or sequential), ``machine`` (platform, cpu_model, cpu_count, torch_threads,
memory_total_bytes, device, device_name), ``versions`` (python, fastaccum, torch, numpy,
triton, deepspeed, cuda), ``bandwidth`` (copy/triad/update GB/s, reference_gbps, samples,
array_bytes, threads, method), ``definitions`` (what each row figure means) and ``rows``: one
per (impl, mode, dtype, params), always present, with ``status`` ok | skipped | error and
``reason``; ``bytes_per_param``, ``bytes_note``, ``times_ms``, ``median_ms``, ``min_ms``,
``max_ms``, ``params_per_s``, ``gbps``, ``pct_bandwidth``, ``speedup_vs_torch_fused``,
``speedup_vs_torch_foreach``, ``peak_mem_bytes``, ``held_bytes``, ``skipped_steps``,
``n_tensors``, ``accum``, ``family``. Fields are only ever added, never renamed, within a
schema version.

Parameter layout
----------------
:func:`param_shapes` lays ``n`` parameters out like GPT blocks (qkv, proj, two MLP matrices,
their biases, two LayerNorms: ``12 h^2 + 13 h`` per block) plus one embedding-like tensor
for the remainder, so per-tensor overheads (for-loop vs foreach vs one fused pass) weigh as
much as they do in a real model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .memory import MemoryProbe, available_memory, held_bytes, release_free_memory  # noqa: F401 (re-exported for bench/)
from .units import format_count, parse_count  # noqa: F401 (re-exported for bench/)

SCHEMA = "fastaccum.bench/1"

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("step", "cycle")

# Hyper-parameters of every row (torch.optim.AdamW defaults, clip at 1 as most LM recipes).
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, (0.9, 0.999), 1e-8, 1e-2, 1.0

TORCH_VARIANTS = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True), "torch-fused": dict(fused=True)}
REFERENCE_IMPL = "torch-fused"


# ----------------------------------------------------------------------------- sizes
def param_shapes(n: int) -> List[Tuple[int, ...]]:
    """Shapes of ``n`` parameters laid out like GPT blocks plus an embedding-like remainder."""
    if n < 1:
        raise ValueError(f"parameter count must be >= 1, got {n}")
    h = 1024 if n >= 50_000_000 else 512 if n >= 5_000_000 else 256 if n >= 500_000 else 64
    block = [(3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,), (h,), (h,)]
    per_block = 12 * h * h + 13 * h
    layers = n // per_block
    shapes = block * layers
    rest = n - layers * per_block
    if rest:
        shapes.append((rest // h, h) if rest % h == 0 else (rest,))
    assert sum(math.prod(s) for s in shapes) == n
    return shapes


# ------------------------------------------------------------------------ bytes/param
def bytes_per_param(impl: str, dtype: str, mode: str, accum: int = 1) -> Tuple[int, str]:
    """Minimum bytes each implementation moves per parameter, and how they add up.

    ``e`` = bytes of one gradient element as autograd produces it (4 fp32, 2 bf16/fp16).

    step (one update):

    ====================  =====  ==========================================================
    torch (all 3), fp32    28    read p, g, m, v; write p, m, v (zero_grad frees g: no pass)
    torch, bf16/fp16       14    the same 7 arrays, all 16-bit (torch keeps bf16 state)
    DeepSpeed, fp32        28    as torch
    DeepSpeed, bf16        22    read p(2) g(2) m v; write p(2) m v (fp32 state)
    fastaccum, fp32        28    read p, g, m, v; write p, m, v (the buffer is never zeroed:
                                 the next window's first gradient overwrites it)
    fastaccum, bf16/fp16   30    read master, m, v, g (fp32); write master, m, v (fp32), p (2)
    ====================  =====  ==========================================================

    cycle (N micro-batches + loss scale + clip + step), per parameter per window:

    * every row: N x produce the gradient (read g_micro, write the fresh tensor) = 2eN
    * torch / DeepSpeed: micro-batch 1 is stolen by AccumulateGrad (0), micro-batches
      2..N add in place (3e each), ``unscale_`` (2e), ``clip_grad_norm_`` (norm read e +
      scale 2e), then the step above.
    * fastaccum: micro-batch 1 overwrites the stale fp32 buffer (read e + write 4), micro-
      batches 2..N add into it (fp32: 12; bf16: read 2 + read/write fp32 8 = 10), one
      norm/inf-check read of the fp32 buffer (4), then the fused step above (unscale,
      normalisation and clip are a multiplier inside it).
    """
    if impl not in ("fastaccum", "torch", "deepspeed"):
        impl = "fastaccum" if impl.startswith("fastaccum") else "deepspeed" if impl.startswith("deepspeed") else "torch"
    e = 4 if dtype == "fp32" else 2
    low = dtype != "fp32"
    if impl == "fastaccum":
        step, step_note = (30, "read master,m,v,g(fp32); write master,m,v(fp32),p(2)") if low else (
            28, "read p,g,m,v; write p,m,v (g only read: never zeroed)")
    elif impl == "deepspeed":
        step, step_note = (22, "read p(2),g(2),m,v; write p(2),m,v") if low else (28, "read p,g,m,v; write p,m,v")
    else:
        step, step_note = (14, "read p,g,m,v; write p,m,v (all 16-bit)") if low else (
            28, "read p,g,m,v; write p,m,v (zero_grad(set_to_none) frees g)")
    if mode == "step":
        return step, step_note
    n = int(accum)
    produce = 2 * e * n
    if impl == "fastaccum":
        first, add = e + 4, (10 if low else 12)
        acc = first + add * (n - 1)
        total = produce + acc + 4 + step
        note = f"{n}x produce {2 * e} + overwrite {first} + {n - 1}x accumulate {add} + norm 4 + step {step}"
    else:
        acc = 3 * e * (n - 1)
        total = produce + acc + 2 * e + 3 * e + step
        note = f"{n}x produce {2 * e} + {n - 1}x accumulate {3 * e} + unscale {2 * e} + clip {3 * e} + step {step}"
    return total, note


# ------------------------------------------------------------------- bandwidth (STREAM)
@dataclass
class Bandwidth:
    copy_gbps: float
    triad_gbps: float
    update_gbps: float
    array_bytes: int
    threads: int
    method: str = (
        "best of R timed runs, STREAM-style (McCalpin), fp32 arrays >= 4x the last-level cache, "
        "sampled before the first and after every group, best sample kept. copy c=a counts 8 B/elem, "
        "triad c=a+s*b 12 B/elem, update a+=s*b 12 B/elem. reference = update: like an optimizer "
        "step, every array it writes it has read first, so no write-allocate traffic is hidden "
        "from the count (copy and triad move 4 B/elem more than they count)"
    )

    @property
    def reference_gbps(self) -> float:
        return self.update_gbps


def _llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 * 1024**2


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def measure_bandwidth(device: torch.device, array_bytes: Optional[int] = None, repeats: int = 10) -> Bandwidth:
    """Streaming bandwidth of ``device`` with torch's own kernels and thread count."""
    device = torch.device(device)
    if array_bytes is None:
        array_bytes = 256 * 1024**2 if device.type != "cpu" else max(4 * _llc_bytes(), 64 * 1024**2)
    n = array_bytes // 4
    a = torch.ones(n, device=device)  # touched now: no page faults in the timed runs
    b = torch.full((n,), 2.0, device=device)
    c = torch.zeros(n, device=device)
    sync = _sync(device)
    best = {"copy": math.inf, "triad": math.inf, "update": math.inf}
    for _ in range(max(2, repeats)):
        for name in best:
            sync()
            t0 = time.perf_counter()
            if name == "copy":
                c.copy_(a)
            elif name == "triad":
                torch.add(a, b, alpha=3.0, out=c)
            else:
                c.add_(b, alpha=1e-7)
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    del a, b, c
    return Bandwidth(
        copy_gbps=8 * n / best["copy"] / 1e9, triad_gbps=12 * n / best["triad"] / 1e9,
        update_gbps=12 * n / best["update"] / 1e9, array_bytes=4 * n, threads=torch.get_num_threads(),
    )


# ------------------------------------------------------------------- gradient delivery
class _Deliver(torch.autograd.Function):
    """Forward: a scalar. Backward: ``g * grad_output`` for its parameter (a fresh tensor).

    Stands in for a layer's backward: the gradient reaches ``AccumulateGrad`` (and fastaccum's
    hooks) through autograd, scaled by whatever the loss was multiplied with. One node per
    parameter, so, as in a real model, each gradient is accumulated (``AccumulateGrad`` runs
    as soon as it is ready) before the next one is produced: only one fresh gradient is alive
    at a time, and peak memory is not inflated by the simulation.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, p: Tensor) -> Tensor:  # type: ignore[override]
        ctx.g = g
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], Tensor]:  # type: ignore[override]
        return None, torch.mul(ctx.g, grad_out)


def simulated_loss(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A scalar whose ``backward()`` delivers ``grads`` (times the upstream gradient) to ``params``."""
    return torch.stack([_Deliver.apply(g, p) for g, p in zip(grads, params)]).sum()


def make_params(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> List[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in param_shapes(n):
        t = torch.randn(shape, generator=gen).mul_(0.02).to(device=device, dtype=dtype)
        out.append(t.requires_grad_())
    return out


def make_grad_sets(params: Sequence[Tensor], sets: int, seed: int = 1) -> List[List[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(p.shape, generator=gen).mul_(1e-3).to(device=p.device, dtype=p.dtype) for p in params]
        for _ in range(sets)
    ]


# ------------------------------------------------------------------------ implementations
def deepspeed_adam_class() -> Tuple[Optional[type], Optional[str]]:
    """DeepSpeed's CPU Adam class, or (None, why not)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]
    except ImportError as e:
        return None, f"deepspeed is not importable ({e}); pip install deepspeed to compare"
    except Exception as e:  # noqa: BLE001 - deepspeed's import can fail building/loading its ops, or on a torch it does not support
        return None, f"deepspeed import failed: {type(e).__name__}: {e}"
    return DeepSpeedCPUAdam, None


def fastaccum_backends(device: torch.device) -> List[str]:
    """fastaccum backends that run on ``device`` (empty when the optimizer is not importable)."""
    try:
        import fastaccum
    except ImportError:
        return []
    if not hasattr(fastaccum, "AdamW"):
        return []
    return list(fastaccum.available_backends(device))


def implementations(device: torch.device) -> List[Tuple[str, Optional[str]]]:
    """Every row name the bench compares on ``device``, with the reason when it cannot run."""
    device = torch.device(device)
    rows: List[Tuple[str, Optional[str]]] = [(f"fastaccum-{b}", None) for b in fastaccum_backends(device)]
    if not rows:
        rows.append(("fastaccum-torch", "fastaccum.AdamW is not importable"))
    rows += [(name, None) for name in TORCH_VARIANTS]
    if device.type == "cpu":
        cls, why = deepspeed_adam_class()
        rows.append(("deepspeed-cpuadam", why))
    return rows


class Runner:
    """One implementation on one set of parameters, ready to time.

    ``prepare()`` is the untimed work before each timed ``run()``; ``run(probe)`` calls
    ``probe()`` once, at the point of the iteration where the most memory is live (gradients
    present, before the update), so :meth:`held` can count it.
    """

    def __init__(self, impl: str, n: int, dtype: str, mode: str, accum: int, device: torch.device,
                 grad_sets: Optional[List[List[Tensor]]] = None, params: Optional[List[Tensor]] = None) -> None:
        self.impl, self.n, self.dtype_name, self.mode, self.device = impl, n, dtype, mode, torch.device(device)
        self.accum = int(accum) if mode == "cycle" else 1
        tdtype = DTYPES[dtype]
        self.params = params if params is not None else make_params(n, tdtype, self.device)
        self.grad_sets = grad_sets if grad_sets is not None else make_grad_sets(self.params, min(self.accum, 2))
        self._i = 0
        self.scaler = None
        if impl.startswith("fastaccum-"):
            import fastaccum

            kw: Dict[str, Any] = dict(backend=impl[len("fastaccum-"):])
            if mode == "cycle":
                kw.update(accumulation_steps=self.accum, loss_scale="dynamic", max_grad_norm=MAX_GRAD_NORM)
            self.opt = fastaccum.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kw)
            self.family = "fastaccum"
        elif impl in TORCH_VARIANTS:
            self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                         **TORCH_VARIANTS[impl])
            self.family = "torch"
        elif impl == "deepspeed-cpuadam":
            cls, why = deepspeed_adam_class()
            if cls is None:
                raise RuntimeError(why)
            self.opt = cls(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, adamw_mode=True)
            self.family = "deepspeed"
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        if mode == "cycle" and self.family != "fastaccum":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.bytes_per_param, self.bytes_note = bytes_per_param(self.family, dtype, mode, self.accum)
        self.held_bytes: Optional[int] = None

    def _loss(self) -> Tensor:
        grads = self.grad_sets[self._i % len(self.grad_sets)]
        self._i += 1
        return simulated_loss(self.params, grads)

    def prepare(self) -> None:
        if self.mode == "step":
            self._loss().backward()

    def probe(self) -> None:
        self.held_bytes = held_bytes(self._live_tensors())

    def _live_tensors(self) -> Iterable[Optional[Tensor]]:
        for p in self.params:
            yield p
            yield p.grad
            yield getattr(p, "main_grad", None)
        for st in self.opt.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    yield v

    def run(self, probe: bool = False) -> None:
        opt = self.opt
        if self.mode == "step":
            if probe:
                self.probe()
            opt.step()
            opt.zero_grad()
            return
        n = self.accum
        if self.family == "fastaccum":
            for i in range(n):
                opt.backward(self._loss())
                if probe and i == n - 1:
                    self.probe()
                opt.step()
                opt.zero_grad()
            return
        scaler = self.scaler
        for i in range(n):
            scaler.scale(self._loss() / n).backward()
        if probe:
            self.probe()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.opt = None  # type: ignore[assignment]
        self.params = []
        self.grad_sets = []


class Timed:
    """What :func:`time_rounds` times: ``prepare()`` untimed, then ``run()`` timed (a
    :class:`Runner`, or any object with these two methods)."""

    def prepare(self) -> None: ...

    def run(self) -> None: ...


ROW_ERRORS = (RuntimeError, ValueError)


def time_rounds(items: Dict[str, Any], rounds: int, warmup: int = 0, device: Optional[torch.device] = None,
                errors: Optional[Dict[str, str]] = None, clock: Callable[[], float] = time.perf_counter,
                ) -> Dict[str, List[float]]:
    """The one timing loop of the harness: seconds of ``run()`` per item, ``rounds`` rounds.

    Every round times each item once (``prepare()`` untimed before it), round-robin with the
    order rotated each round, so slow drifts of a shared machine hit every item alike; one
    item is the plain sequential case. ``warmup`` untimed rounds first. An item whose
    ``prepare``/``run`` raises a RuntimeError or ValueError is dropped and its message
    recorded in ``errors`` (one implementation refusing a dtype is a row error, not a crash).
    """
    sync = _sync(torch.device(device)) if device is not None else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in items}
    order = list(items)
    for k in range(warmup + rounds):
        shift = k % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            it = items[name]
            try:
                it.prepare()
                sync()
                t0 = clock()
                it.run()
                sync()
                dt = clock() - t0
            except ROW_ERRORS as e:
                if errors is None:
                    raise
                errors[name] = f"{type(e).__name__}: {e}"
                order.remove(name)
                continue
            if k >= warmup:
                times[name].append(dt)
    return times


STABLE_SPREAD = 0.10  # a row is stable when its interquartile range is within 10% of its median


def spread(times: Sequence[float]) -> Optional[float]:
    """Interquartile range / median of ``times`` (None below 2 samples): robust to a single
    outlier, which min-max is not ([1.98-191.98] ms says nothing about the median)."""
    if len(times) < 2:
        return None
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med if med > 0 else None


def time_until_stable(items: Dict[str, Any], rounds: int, max_rounds: Optional[int] = None,
                      bound: float = STABLE_SPREAD, device: Optional[torch.device] = None,
                      errors: Optional[Dict[str, str]] = None, clock: Callable[[], float] = time.perf_counter,
                      deadline: Optional[float] = None) -> Dict[str, List[float]]:
    """:func:`time_rounds`, extended (all items together, so rounds stay paired) while any item's
    :func:`spread` exceeds ``bound``, up to ``max_rounds`` (default 3 x ``rounds``) and not past
    ``deadline`` (a ``time.monotonic()`` value: ``--quick`` keeps its time on a busy machine).
    Items still above the bound then are what the report calls noisy."""
    max_rounds = max(rounds, max_rounds if max_rounds is not None else 3 * rounds)
    times = time_rounds(items, rounds, 0, device, errors, clock)
    done = rounds
    while done < max_rounds and (deadline is None or time.monotonic() < deadline):
        live = {k: v for k, v in items.items() if not (errors and k in errors)}
        if all((spread(times[k]) or 0.0) <= bound for k in live):
            break
        step = min(max(2, rounds // 2), max_rounds - done)
        for k, ts in time_rounds(live, step, 0, device, errors, clock).items():
            times[k].extend(ts)
        done += step
    return times


def time_runner(runner: Runner, repeats: int, warmup: int = 1) -> List[float]:
    """Milliseconds of ``repeats`` timed runs after ``warmup`` untimed ones (prepare() untimed)."""
    return [t * 1e3 for t in time_rounds({"r": runner}, repeats, warmup, runner.device)["r"]]


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    impl: str
    family: str
    mode: str
    dtype: str
    params: int
    n_tensors: int
    accum: int
    status: str = "ok"  # ok | skipped | error
    reason: Optional[str] = None
    bytes_per_param: Optional[int] = None
    bytes_note: Optional[str] = None
    times_ms: List[float] = field(default_factory=list)
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    params_per_s: Optional[float] = None
    gbps: Optional[float] = None
    pct_bandwidth: Optional[float] = None
    speedup_vs_torch_fused: Optional[float] = None
    speedup_vs_torch_foreach: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    held_bytes: Optional[int] = None
    skipped_steps: Optional[int] = None  # fastaccum: updates skipped on inf/nan (should be 0)
    spread: Optional[float] = None  # interquartile range / median of times_ms
    noisy: bool = False  # spread still above STABLE_SPREAD after extending the rounds
    working_set_bytes: Optional[int] = None  # params + grads + state: what one step streams over
    in_cache: Optional[bool] = None  # working set <= 2 x last-level cache: % BW is not a DRAM figure
    like_for_like: Optional[str] = None  # the torch-fused row with the same state precision
    speedup_like_for_like: Optional[float] = None
    ratio_spread: Optional[List[float]] = None  # [q1, q3] of the per-round ratios vs like_for_like

    def finish(self, bandwidth_gbps: Optional[float], llc_bytes: Optional[int] = None) -> None:
        if not self.times_ms:
            return
        self.spread = spread(self.times_ms)
        self.noisy = self.spread is not None and self.spread > STABLE_SPREAD
        if self.working_set_bytes is None and self.held_bytes:
            self.working_set_bytes = self.held_bytes
        if llc_bytes and self.working_set_bytes:
            self.in_cache = self.working_set_bytes <= 2 * llc_bytes
        self.median_ms = statistics.median(self.times_ms)
        self.min_ms, self.max_ms = min(self.times_ms), max(self.times_ms)
        secs = self.median_ms / 1e3
        self.params_per_s = self.params / secs
        if self.bytes_per_param is not None:
            self.gbps = self.bytes_per_param * self.params / secs / 1e9
            if bandwidth_gbps:
                self.pct_bandwidth = 100.0 * self.gbps / bandwidth_gbps


def family_of(impl: str) -> str:
    return impl.split("-", 1)[0] if not impl.startswith("torch") else "torch"


def _est_bytes(impl: str, n: int, dtype: str) -> int:
    e = 4 if dtype == "fp32" else 2
    if impl.startswith("fastaccum"):
        return n * (e + 4 + 8 + (4 if e == 2 else 0))
    if impl.startswith("deepspeed"):
        return n * (2 * e + 8)
    return n * 4 * e


def run_group(impls: Sequence[Tuple[str, Optional[str]]], n: int, dtype: str, mode: str, accum: int,
              device: torch.device, repeats: int, warmup: int, on_row: Callable[[], None] = lambda: None,
              interleave: Optional[bool] = None, deadline: Optional[float] = None) -> Tuple[List[Row], str]:
    """Time every implementation on the same parameters/gradients; return rows and the schedule.

    When everything fits in half the free memory, all runners are built first and timed
    round-robin (rotating the order each round), so slow drifts of a shared machine hit every
    row alike; otherwise one runner at a time.
    """
    device = torch.device(device)
    shapes = param_shapes(n)
    if dtype == "fp16" and mode == "cycle":
        # torch's GradScaler refuses fp16 gradients (pure-fp16 params need fp32 masters there)
        impls = [(name, why or ("GradScaler cannot unscale fp16 gradients: torch needs fp32 master params for "
                                "fp16 training" if not name.startswith("fastaccum") else None)) for name, why in impls]
    rows = {name: Row(name, family_of(name), mode, dtype, n, len(shapes), accum if mode == "cycle" else 1,
                      status="skipped" if why else "ok", reason=why) for name, why in impls}
    for name, _ in impls:
        bpp, note = bytes_per_param(family_of(name), dtype, mode, accum)
        rows[name].bytes_per_param, rows[name].bytes_note = bpp, note
    live = [name for name, why in impls if why is None]
    sets = min(accum, 2) if mode == "cycle" else 1
    need = sum(_est_bytes(name, n, dtype) for name in live) + sets * n * (4 if dtype == "fp32" else 2)
    if interleave is None:
        interleave = device.type != "cpu" or need < 0.5 * available_memory()
    schedule = "interleaved" if interleave else "sequential"
    probe = MemoryProbe(device)
    params0 = make_params(n, DTYPES[dtype], device)
    grad_sets = make_grad_sets(params0, sets)

    def build(name: str) -> Optional[Runner]:
        row = rows[name]
        probe.start()
        try:
            params = [p.detach().clone().requires_grad_() for p in params0]
            r = Runner(name, n, dtype, mode, accum, device, grad_sets=grad_sets, params=params)
            # the first iteration allocates the optimizer state (counted in the peak); the
            # second counts what is held once state exists and gradients are live
            for k in range(max(2, warmup)):
                r.prepare()
                r.run(probe=(k == 1))
        except Exception as e:  # noqa: BLE001
            # a third-party optimizer that refuses this dtype/device, or whose native op fails to
            # build or load on first use (DeepSpeed compiles its CPU Adam at construction), is a
            # row error, not a crash; fastaccum's and torch's own rows must not fail here
            if not name.startswith("deepspeed") and not isinstance(
                    e, (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError)):
                raise
            row.status, row.reason = "error", f"{type(e).__name__}: {e}"
            return None
        row.peak_mem_bytes = probe.stop()
        row.held_bytes = r.held_bytes
        return r

    def retire(name: str, r: Runner) -> None:
        rows[name].skipped_steps = getattr(r.opt, "skipped_steps", None)
        r.close()

    errors: Dict[str, str] = {}
    if interleave:
        runners = {}
        for name in live:
            r = build(name)
            if r is not None:
                runners[name] = r
        for name, ts in time_until_stable(runners, repeats, device=device, errors=errors, deadline=deadline).items():
            rows[name].times_ms = [t * 1e3 for t in ts]
        on_row()
        for name, r in runners.items():
            retire(name, r)
        runners.clear()
    else:
        for name in live:
            r = build(name)
            if r is not None:
                ts = time_until_stable({name: r}, repeats, device=device, errors=errors, deadline=deadline)[name]
                rows[name].times_ms = [t * 1e3 for t in ts]
                retire(name, r)
                del r
            release_free_memory()
        on_row()
    for name, why in errors.items():
        rows[name].status, rows[name].reason = "error", why
    for row in rows.values():
        if row.status == "ok" and not row.times_ms:
            row.status = "error"
            row.reason = row.reason or "no timing"
    del params0, grad_sets
    release_free_memory(full_gc=True)
    return [rows[name] for name, _ in impls], schedule


def _paired_ratios(ref: Sequence[float], row: Sequence[float]) -> List[float]:
    """ref/row per round: interleaved rounds ran back to back, so a busy moment hits both."""
    return [a / b for a, b in zip(ref, row) if b > 0]


def like_for_like(row: Row) -> Tuple[str, str]:
    """(dtype of the torch-fused row to compare ``row`` with, why).

    fastaccum with bf16/fp16 parameters keeps fp32 master weights and fp32 moments (30 B/param
    per step); torch with bf16 parameters keeps everything in bf16 (14 B/param, updates below
    half a bf16 ulp are lost). The torch run with the same fp32 masters and moments is torch
    on fp32 parameters, so that is the like-for-like reference.
    """
    if row.family == "fastaccum" and row.dtype != "fp32":
        return "fp32", "same fp32 master weights and moments"
    return row.dtype, "same parameters and state"


def add_ratios(rows: Sequence[Row]) -> None:
    """speedup = median time of torch fused (foreach) AdamW / median time of the row, per group;
    ``speedup_like_for_like`` against the torch-fused row with the same state precision
    (:func:`like_for_like`), with the quartiles of the per-round ratios as its spread."""
    groups: Dict[Tuple[str, str, int], Dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.dtype, r.params), {})[r.impl] = r
    for g in groups.values():
        for ref_name, attr in (("torch-fused", "speedup_vs_torch_fused"), ("torch-foreach", "speedup_vs_torch_foreach")):
            ref = g.get(ref_name)
            if ref is None or ref.median_ms is None:
                continue
            for r in g.values():
                if r.median_ms:
                    setattr(r, attr, ref.median_ms / r.median_ms)
    for r in rows:
        if not r.median_ms:
            continue
        dtype, why = like_for_like(r)
        ref = groups.get((r.mode, dtype, r.params), {}).get(REFERENCE_IMPL)
        if ref is None or not ref.median_ms:
            continue
        r.like_for_like = f"{REFERENCE_IMPL} {dtype} ({why})"
        r.speedup_like_for_like = ref.median_ms / r.median_ms
        pr = _paired_ratios(ref.times_ms, r.times_ms)
        if len(pr) >= 2:
            # the median of the per-round ratios, so the figure lies inside its own quartiles
            q1, med, q3 = statistics.quantiles(pr, n=4, method="inclusive")
            r.speedup_like_for_like, r.ratio_spread = med, [q1, q3]


def verdict(rows: Sequence[Dict[str, Any]], accum: int) -> Dict[str, Any]:
    """The answer first: the preferred fastaccum backend against torch's fused AdamW, like for
    like (:func:`like_for_like`), one line per (mode, dtype), one cell per size, each a median
    ratio with the quartiles of its per-round ratios and a noisy flag."""
    ok = [r for r in rows if r["status"] == "ok" and r["family"] == "fastaccum" and r["speedup_like_for_like"]]
    if not ok:
        return {"impl": None, "lines": []}
    impl = ok[0]["impl"]  # implementations() lists fastaccum's backends in the order auto prefers them
    by_key = {(r["impl"], r["mode"], r["dtype"], r["params"]): r for r in rows}
    lines = []
    for mode in MODES:
        for dtype in DTYPES:
            cells = []
            for r in sorted((r for r in ok if r["impl"] == impl and r["mode"] == mode and r["dtype"] == dtype),
                            key=lambda r: r["params"]):
                ref_dtype = "fp32" if dtype != "fp32" else dtype
                ref = by_key.get((REFERENCE_IMPL, mode, ref_dtype, r["params"]), {})
                sp = r["ratio_spread"]
                wide = bool(sp) and (sp[1] - sp[0]) > 2 * STABLE_SPREAD * r["speedup_like_for_like"]
                cells.append({"params": r["params"], "ratio": r["speedup_like_for_like"],
                              "spread": sp, "noisy": bool(r["noisy"] or ref.get("noisy") or wide),
                              "bytes": r["bytes_per_param"], "ref_bytes": ref.get("bytes_per_param")})
            if not cells:
                continue
            what = "step" if mode == "step" else f"accumulation window x{accum}"
            if dtype == "fp32":
                vs = "torch fused, fp32 params (same bytes)" if cells[0]["bytes"] == cells[0]["ref_bytes"] else \
                    "torch fused, fp32 params"
            else:
                vs = (f"torch fused on fp32 params: both keep fp32 weights and moments "
                      f"(torch with {dtype} params keeps {dtype} moments: see the table)")
            ratios = [c["ratio"] for c in cells]
            lines.append({"mode": mode, "dtype": dtype, "what": f"{what}, {dtype} params", "vs": vs,
                          "min_ratio": min(ratios), "max_ratio": max(ratios), "cells": cells,
                          "noisy": any(c["noisy"] for c in cells)})
    return {"impl": impl, "reference": REFERENCE_IMPL, "lines": lines,
            "definition": "ratio = torch time / fastaccum time (>1: fastaccum faster), median over rounds; "
                          "[q1-q3] = quartiles of the per-round ratios; ~ = noisy (a row's spread stayed above "
                          f"{STABLE_SPREAD:.0%} after extra rounds, or the quartiles are more than "
                          f"{2 * STABLE_SPREAD:.0%} apart)"}


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(mod)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> Dict[str, Any]:
    device = torch.device(device)
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": None,
        "device": str(device),
        "device_name": None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_total_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_bytes"] = props.total_memory
    else:
        info["device_name"] = info["cpu_model"]
    return info


def versions() -> Dict[str, Optional[str]]:
    try:
        import fastaccum

        fa = getattr(fastaccum, "__version__", None)
    except ImportError:
        fa = None
    return {
        "python": platform.python_version(),
        "fastaccum": fa,
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "cuda": torch.version.cuda,
    }


# ------------------------------------------------------------------------------ suite
def env_sizes(default: Sequence[int] = (10_000_000, 100_000_000)) -> List[int]:
    """Sizes for the pytest-benchmark suites: ``FASTACCUM_BENCH_PARAMS=10M,100M`` or
    ``FASTACCUM_BENCH_QUICK=1`` (1M, 4M: a smoke run in seconds), else ``default``."""
    if os.environ.get("FASTACCUM_BENCH_PARAMS"):
        return [parse_count(s) for s in os.environ["FASTACCUM_BENCH_PARAMS"].split(",")]
    if os.environ.get("FASTACCUM_BENCH_QUICK", "0") not in ("", "0"):
        return [1_000_000, 4_000_000]
    return list(default)


def rounds_for(n: int) -> int:
    """Timed rounds per row: enough for a stable median, about 2-10 s per row on 2 cores."""
    return 30 if n <= 4_000_000 else 15 if n <= 20_000_000 else 7


@dataclass
class BenchConfig:
    params: List[int]
    accum: int = 4
    dtypes: List[str] = field(default_factory=lambda: ["fp32", "bf16"])
    modes: List[str] = field(default_factory=lambda: list(MODES))
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    repeats: int = 7
    warmup: int = 2
    impls: Optional[List[str]] = None  # filter by name prefix (e.g. "fastaccum", "torch-fused")
    quick: bool = False
    bandwidth_bytes: Optional[int] = None
    extend_budget_s: Optional[float] = None  # no extra rounds for noisy rows after this many seconds


def run_suite(cfg: BenchConfig, progress: Optional[Callable[[int, str], None]] = None) -> Dict[str, Any]:
    """Everything ``fastaccum bench`` reports, as the JSON-ready dict (schema ``fastaccum.bench/1``)."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    impls = implementations(device)
    if cfg.impls:
        impls = [(n, w) for n, w in impls if any(n.startswith(f) for f in cfg.impls)]
    t0 = time.time()
    deadline = time.monotonic() + cfg.extend_budget_s if cfg.extend_budget_s else None
    # one tiny untimed group first: lazy initialisation (thread pools, first-use code paths,
    # allocator arenas) would otherwise land in the first row's time and peak memory
    run_group(impls, 10_000, cfg.dtypes[0], cfg.modes[0], cfg.accum, device, repeats=1, warmup=2)
    bw = measure_bandwidth(device, cfg.bandwidth_bytes, repeats=5 if cfg.quick else 10)
    # sampled again after every group: on a shared machine one sample can land in a busy
    # moment; like STREAM, the best sample is the machine's bandwidth (100 %)
    samples = [(bw.copy_gbps, bw.triad_gbps, bw.update_gbps)]
    if progress:
        progress(0, f"bandwidth {bw.reference_gbps:.1f} GB/s")
    rows: List[Row] = []
    schedules = {}
    for n in cfg.params:
        for dtype in cfg.dtypes:
            for mode in cfg.modes:
                label = f"{format_count(n)} {dtype} {mode}"
                group, sched = run_group(impls, n, dtype, mode, cfg.accum, device, cfg.repeats, cfg.warmup,
                                         deadline=deadline)
                schedules[label] = sched
                rows.extend(group)
                b = measure_bandwidth(device, cfg.bandwidth_bytes, repeats=3)
                samples.append((b.copy_gbps, b.triad_gbps, b.update_gbps))
                if progress:
                    progress(len(impls), label)
    bw.copy_gbps, bw.triad_gbps, bw.update_gbps = (max(col) for col in zip(*samples))
    llc = _llc_bytes() if device.type == "cpu" else None
    for r in rows:
        r.finish(bw.reference_gbps, llc)
    add_ratios(rows)
    cfg_dict = asdict(cfg)
    cfg_dict.update(lr=LR, betas=list(BETAS), eps=EPS, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                    loss_scale="dynamic (cycle rows)", reference_impl=REFERENCE_IMPL, schedules=schedules)
    result = {
        "schema": SCHEMA,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.time() - t0, 2),
        "command": sys.argv[:],
        "config": cfg_dict,
        "machine": machine_info(device),
        "versions": versions(),
        "bandwidth": {**asdict(bw), "reference_gbps": bw.reference_gbps, "llc_bytes": llc,
                      "samples_update_gbps": [round(u, 3) for _, _, u in samples]},
        "definitions": {
            "median_ms": "median wall time of one step (mode=step) or one accumulation window (mode=cycle)",
            "gbps": "bytes_per_param * params / median time (see bytes_note; minimum traffic of the row's algorithm)",
            "pct_bandwidth": "gbps / bandwidth.reference_gbps * 100. The reference streams arrays >= 4x the "
                             "last-level cache (a DRAM figure); a row whose working set fits in about twice the "
                             "cache (in_cache) is partly served from cache and can pass 100: not a bound there",
            "spread": "interquartile range / median of times_ms; rows above 0.10 after up to 3x the rounds are noisy",
            "speedup_like_for_like": "median time of the torch-fused row with the same state precision (see "
                                     "like_for_like) / median time of this row; ratio_spread: quartiles of the "
                                     "per-round ratios",
            "speedup_vs_torch_fused": "median time of torch-fused / median time of this row (>1: faster)",
            "peak_mem_bytes": "peak memory added while building the row and running its first iteration "
                              "(CUDA: max_memory_allocated; CPU: peak RSS, VmHWM after clear_refs)",
            "held_bytes": "bytes of the distinct tensors held when gradients are live: params, grads/buffers, state",
        },
        "rows": [_clean(asdict(r)) for r in rows],
    }
    result["verdict"] = verdict(result["rows"], cfg.accum)
    return result


def _clean(d: Dict[str, Any]) -> Dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, float):
            # six significant digits, not six decimals: a tiny ratio must keep its precision
            return None if not math.isfinite(v) else float(f"{v:.6g}")
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in d.items()}


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def plot(result: Dict[str, Any], path: str) -> None:
    """GB/s vs parameter count per implementation, one panel per (mode, dtype), bandwidth line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok" and r["gbps"]]
    order = list(DTYPES)  # fp32 first, as in the table
    panels = sorted({(r["mode"], r["dtype"]) for r in rows}, key=lambda k: (MODES.index(k[0]), order.index(k[1])))
    if not panels:
        panels = [("step", "fp32")]
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
    bw = result["bandwidth"]["reference_gbps"]
    for ax, (mode, dtype) in zip(axes.flat, panels):
        sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["params"], r["gbps"]) for r in sel if r["impl"] == impl)
            ax.plot([p for p, _ in pts], [g for _, g in pts], marker="o", label=impl,
                    linewidth=2.5 if impl.startswith("fastaccum") else 1.5)
        ax.axhline(bw, color="k", linestyle="--", linewidth=1, label=f"stream update {bw:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("GB/s (bytes/param x params / time)")
        title = "one optimizer step" if mode == "step" else f"accumulation cycle (N={result['config']['accum']})"
        ax.set_title(f"{title}, {dtype} params")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    m = result["machine"]
    fig.suptitle(f"fastaccum bench on {m['device_name']} ({m['torch_threads']} threads), torch {result['versions']['torch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
