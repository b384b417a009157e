"""The C++ CPU kernels (``fastaccum.backends.cpu._C``) as ``torch.library`` custom ops.

Registering them as custom ops (namespace ``fastaccum``) with schemas that mark every
mutated argument, plus fake implementations, lets ``torch.compile`` trace around them
and lets ``torch.library.opcheck`` verify the registrations (``tests/test_cpu_backend.py``).

``_C`` takes raw pointers, so every op validates device, dtype, contiguity
and sizes here before a pointer crosses into C++: a wrong tensor raises a ``TypeError`` or
``ValueError`` naming the argument instead of corrupting memory.

Threads follow ``torch.get_num_threads()`` at each call, so ``torch.set_num_threads`` (and
``OMP_NUM_THREADS``) govern these kernels as they govern torch's own. When torch runs on
OpenMP, the kernels run on torch's own OpenMP thread team (found by :func:`bind_threads`, bound in
C++ without loading a second runtime): a separate pool would fight torch's spin-waiting
workers for the cores. ``FASTACCUM_THREADS=pool`` selects the extension's own thread pool
instead. Importing this module binds nothing: the cpu backend calls :func:`bind_threads`
once, when it is created.

Importing this module raises ``ImportError`` when ``_C`` is missing; the cpu backend turns
that into "backend unavailable" (see ``backend.py`` beside this file).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import List, Sequence

import torch
from torch import Tensor

from . import _C

__all__ = ["DTYPE_CODES", "STATE_DTYPES", "accumulate_", "accumulate_sumsq_", "grad_norm", "adam_", "sgd_"]

#: dtype codes understood by _C (csrc/kernels.h, enum DType)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: dtypes the kernels accept for exp_avg / exp_avg_sq / max_exp_avg_sq
STATE_DTYPES = (torch.float32, torch.bfloat16)
# seeds cross into C++ as uint64 through the int64 of the op schema
_SEED_MASK = SEED_MASK = (1 << 63) - 1


def _loaded_openmp_runtime() -> str:
    """Path of the OpenMP runtime torch uses, if it is loaded in this process, else ""."""
    if not torch.backends.openmp.is_available():
        return ""
    names = ("libgomp", "libiomp5", "libomp")
    candidates: List[str] = []
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.rsplit(None, 1)[-1] if "/" in line else ""
                    if Path(path).name.startswith(names) and path not in candidates:
                        candidates.append(path)
        except OSError:
            return ""
    else:
        lib = Path(torch.__file__).parent / "lib"
        candidates = [str(p) for p in sorted(lib.glob("lib*omp*")) if p.name.startswith(names)]
    torch_dir = str(Path(torch.__file__).parent)
    candidates.sort(key=lambda p: not p.startswith(torch_dir))  # torch's own copy first
    return candidates[0] if candidates else ""


#: how the kernels run their threads: "openmp" (torch's team), "pool" (the extension's),
#: or "unbound" before the first :func:`bind_threads`
THREADING = "unbound"


def bind_threads() -> str:
    """Choose the kernels' threads (torch's OpenMP team when loaded, else the own pool)."""
    global THREADING
    THREADING = "pool"
    if os.environ.get("FASTACCUM_THREADS", "").strip().lower() != "pool":
        path = _loaded_openmp_runtime()
        if path and _C.use_openmp_runtime(path):
            THREADING = "openmp"
    if THREADING == "pool":
        _C.use_openmp_runtime("")
    return THREADING


def _check(t: Tensor, name: str, dtypes: Sequence[torch.dtype], numel: int = -1) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastaccum cpu kernels: {name} must be a Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"fastaccum cpu kernels: {name} is on {t.device}; they take CPU tensors "
            "(use backend='torch' or 'auto' for other devices)"
        )
    if t.dtype not in dtypes:
        raise TypeError(
            f"fastaccum cpu kernels: {name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"fastaccum cpu kernels: {name} is not contiguous; pass a contiguous tensor "
            "(the cpu backend routes such segments to the torch backend)"
        )
    if numel >= 0 and t.numel() != numel:
        raise ValueError(f"fastaccum cpu kernels: {name} has {t.numel()} elements, expected {numel}")


def _check_list(ts: Sequence[Tensor], name: str, dtypes: Sequence[torch.dtype], numels: Sequence[int]) -> None:
    if len(ts) != len(numels):
        raise ValueError(f"fastaccum cpu kernels: {name} has {len(ts)} tensors, expected {len(numels)} (one per param)")
    dtype = None
    for i, t in enumerate(ts):
        _check(t, f"{name}[{i}]", dtypes, numels[i])
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"fastaccum cpu kernels: {name} mixes {dtype} and {t.dtype}; one call takes one dtype")
        dtype = t.dtype


def _ptrs(ts: Sequence[Tensor]) -> List[int]:
    return [t.data_ptr() for t in ts]


# ----------------------------------------------------------------------------------------
# accumulate


def accumulate_impl(dst: Tensor, src: Tensor, alpha: float, want_sumsq: bool, check: bool = True,
                    of_result: bool = False) -> float:
    """The kernel call behind the accumulate ops: returns ``sum(src**2)`` when ``want_sumsq``,
    ``sum(result**2)`` (of ``dst`` after the add) when ``of_result``, else 0 (fp64, same pass).
    ``check=False`` is for callers that have already verified what :func:`_check` verifies
    (the cpu backend's routing does)."""
    if check:
        _check(dst, "dst", (torch.float32,))
        _check(src, "src", tuple(DTYPE_CODES), dst.numel())
    return _C.accumulate(dst.data_ptr(), src.data_ptr(), DTYPE_CODES[src.dtype], dst.numel(), float(alpha),
                         2 if of_result else 1 if want_sumsq else 0, torch.get_num_threads())


@torch.library.custom_op("fastaccum::accumulate_", mutates_args=("dst",), device_types="cpu")
def accumulate_(dst: Tensor, src: Tensor, alpha: float) -> None:
    """``dst += alpha * src``; dst fp32, src fp32/bf16/fp16, both contiguous with equal numel."""
    accumulate_impl(dst, src, alpha, False)


@accumulate_.register_fake
def _(dst: Tensor, src: Tensor, alpha: float) -> None:
    return None


@torch.library.custom_op("fastaccum::accumulate_sumsq_", mutates_args=("dst",), device_types="cpu")
def accumulate_sumsq_(dst: Tensor, src: Tensor, alpha: float) -> Tensor:
    """``dst += alpha * src`` and, in the same pass, ``sum(src**2)`` (fp64, 0-dim) of the
    incoming gradient as given (before ``alpha``), for gradient-noise telemetry."""
    return torch.tensor(accumulate_impl(dst, src, alpha, True), dtype=torch.float64)


@accumulate_sumsq_.register_fake
def _(dst: Tensor, src: Tensor, alpha: float) -> Tensor:
    return dst.new_empty((), dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# norm + inf/nan check


def grad_norm_impl(buf: Tensor, check: bool = True) -> Tensor:
    if check:
        _check(buf, "buf", (torch.float32,))
    s = _C.sumsq(buf.data_ptr(), buf.numel(), torch.get_num_threads())
    # sqrt in double, one rounding to fp32 (inf/nan stay inf/nan)
    return torch.tensor(math.sqrt(s), dtype=torch.float32)


def sumsq_impl(xs: Sequence[Tensor], check: bool = True) -> float:
    """``sum(x**2)`` over contiguous fp32 tensors, one fp64 total (non-finite when any element is)."""
    if check:
        for i, x in enumerate(xs):
            _check(x, f"xs[{i}]", (torch.float32,))
    if len(xs) == 1:
        return _C.sumsq(xs[0].data_ptr(), xs[0].numel(), torch.get_num_threads())
    return _C.sumsq_segs([x.data_ptr() for x in xs], [x.numel() for x in xs], torch.get_num_threads())


@torch.library.custom_op("fastaccum::grad_norm", mutates_args=(), device_types="cpu")
def grad_norm(buf: Tensor) -> Tensor:
    """L2 norm (0-dim fp32) of a contiguous fp32 buffer, accumulated in fp64 in one read
    pass; inf/nan when any element is inf/nan, so it is also the found-inf check."""
    return grad_norm_impl(buf)


@grad_norm.register_fake
def _(buf: Tensor) -> Tensor:
    return buf.new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# fused updates


@torch.library.custom_op(
    "fastaccum::adam_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"),  # grads are only read
    device_types="cpu",
)
def adam_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    masters: List[Tensor],
    steps: List[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_multiplier: float,
    stochastic_rounding: bool,
    seed: int,
) -> None:
    """One fused Adam/AdamW pass over all segments (see fastaccum.backends.base.AdamSegments).

    ``max_exp_avg_sqs`` / ``masters`` are empty lists when amsgrad is off / there are no
    master weights. One call takes one param dtype and one state dtype.
    """
    adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr=lr, beta1=beta1,
              beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
              grad_multiplier=grad_multiplier, stochastic_rounding=stochastic_rounding, seed=seed)


def adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, maximize, grad_multiplier, stochastic_rounding, seed, check: bool = True) -> None:
    """The kernel call behind ``fastaccum::adam_``; ``check=False`` skips the argument checks
    for a caller that has made them (the cpu backend, whose routing checks every tensor)."""
    numels = [p.numel() for p in params]
    if check:
        _check_list(params, "params", tuple(DTYPE_CODES), numels)
        _check_list(grads, "grads", (torch.float32,), numels)
        _check_list(exp_avgs, "exp_avgs", STATE_DTYPES, numels)
        _check_list(exp_avg_sqs, "exp_avg_sqs", STATE_DTYPES, numels)
        if max_exp_avg_sqs:
            _check_list(max_exp_avg_sqs, "max_exp_avg_sqs", STATE_DTYPES, numels)
        if masters:
            _check_list(masters, "masters", (torch.float32,), numels)
        if len(steps) != len(params):
            raise ValueError(f"fastaccum cpu kernels: steps has {len(steps)} entries, expected {len(params)}")
    if not params:
        return
    state_dtype = exp_avgs[0].dtype
    if check:
        for name, ts in (("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs)):
            if ts and ts[0].dtype != state_dtype:
                raise TypeError(f"fastaccum cpu kernels: {name} is {ts[0].dtype} but exp_avgs is {state_dtype}; "
                                "all moments of one call share a dtype")
    _C.adam(
        params=_ptrs(params), grads=_ptrs(grads), exp_avgs=_ptrs(exp_avgs), exp_avg_sqs=_ptrs(exp_avg_sqs),
        max_exp_avg_sqs=_ptrs(max_exp_avg_sqs), masters=_ptrs(masters), numels=numels,
        steps=[int(s) for s in steps], param_dtype=DTYPE_CODES[params[0].dtype],
        state_dtype=DTYPE_CODES[state_dtype], lr=float(lr), beta1=float(beta1), beta2=float(beta2),
        eps=float(eps), weight_decay=float(weight_decay), decoupled=bool(decoupled), maximize=bool(maximize),
        grad_multiplier=float(grad_multiplier), stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed) & _SEED_MASK, nthreads=torch.get_num_threads(),
    )


def adam_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters) -> "_C.AdamPlan":
    """The pointers of an Adam update over these tensors, laid out once (``_C.AdamPlan``):
    ``plan.run(steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
    grad_multiplier, stochastic_rounding, seed, nthreads)`` updates them. The caller has
    checked the tensors (as :func:`adam_impl` with ``check=True`` does) and keeps them alive
    and in place while the plan is used."""
    return _C.AdamPlan(
        params=_ptrs(params), grads=_ptrs(grads), exp_avgs=_ptrs(exp_avgs), exp_avg_sqs=_ptrs(exp_avg_sqs),
        max_exp_avg_sqs=_ptrs(max_exp_avg_sqs), masters=_ptrs(masters), numels=[p.numel() for p in params],
        param_dtype=DTYPE_CODES[params[0].dtype], state_dtype=DTYPE_CODES[exp_avgs[0].dtype],
    )


@adam_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps,
      weight_decay, decoupled, maximize, grad_multiplier, stochastic_rounding, seed) -> None:
    return None


@torch.library.custom_op(
    "fastaccum::sgd_", mutates_args=("params", "momentum_buffers", "masters"), device_types="cpu"
)
def sgd_(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    masters: List[Tensor],
    steps: List[int],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    grad_multiplier: float,
    stochastic_rounding: bool,
    seed: int,
) -> None:
    """One fused SGD(+momentum) pass; ``momentum_buffers`` (fp32) is empty when momentum == 0."""
    sgd_impl(params, grads, momentum_buffers, masters, steps, lr=lr, momentum=momentum, dampening=dampening,
             nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, grad_multiplier=grad_multiplier,
             stochastic_rounding=stochastic_rounding, seed=seed)


def sgd_impl(params, grads, momentum_buffers, masters, steps, *, lr, momentum, dampening, nesterov, weight_decay,
             maximize, grad_multiplier, stochastic_rounding, seed, check: bool = True) -> None:
    """The kernel call behind ``fastaccum::sgd_`` (``check`` as in :func:`adam_impl`)."""
    numels = [p.numel() for p in params]
    if check:
        _check_list(params, "params", tuple(DTYPE_CODES), numels)
        _check_list(grads, "grads", (torch.float32,), numels)
        if momentum != 0:
            _check_list(momentum_buffers, "momentum_buffers", (torch.float32,), numels)
        if masters:
            _check_list(masters, "masters", (torch.float32,), numels)
        if len(steps) != len(params):
            raise ValueError(f"fastaccum cpu kernels: steps has {len(steps)} entries, expected {len(params)}")
    if not params:
        return
    _C.sgd(
        params=_ptrs(params), grads=_ptrs(grads),
        momentum_buffers=_ptrs(momentum_buffers) if momentum != 0 else [], masters=_ptrs(masters),
        numels=numels, steps=[int(s) for s in steps], param_dtype=DTYPE_CODES[params[0].dtype], lr=float(lr),
        momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
        weight_decay=float(weight_decay), maximize=bool(maximize), grad_multiplier=float(grad_multiplier),
        stochastic_rounding=bool(stochastic_rounding), seed=int(seed) & _SEED_MASK,
        nthreads=torch.get_num_threads(),
    )


@sgd_.register_fake
def _(params, grads, momentum_buffers, masters, steps, *, lr, momentum, dampening, nesterov, weight_decay, maximize,
      grad_multiplier, stochastic_rounding, seed) -> None:
    return None
