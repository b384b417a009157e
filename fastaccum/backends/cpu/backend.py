"""The ``cpu`` backend: C++ SIMD kernels (``csrc/``, module ``_C`` beside this file), called
through the ``fastaccum::*`` custom ops of ``ops.py``.

In eager mode on plain tensors the backend calls the ops' implementations directly: the
dispatcher round trip of a custom op costs ~14 us per call (and ~400 us for a 72-segment
update, for its per-tensor alias and version bookkeeping), which is what a per-parameter
accumulation hook cannot afford; torch.compile tracing, FakeTensors and other tensor
subclasses go through the registered ops.

One call per bucket: the update kernels take every segment of the bucket at once and split
the total work into fixed chunks across ``torch.get_num_threads()`` threads.

Segments the kernels do not take (a user's non-contiguous parameter, an fp16 moment, a
non-CPU tensor) are routed, per segment, to the torch backend; the rest of the bucket still
runs fused. Importing this module raises ``ImportError`` with the reason when the
extension is missing, stale or broken, or when ``FASTACCUM_NO_EXT=1`` is set (an editable
install keeps an earlier build in the source tree: the switch keeps it unloaded); the
registry then marks the backend unavailable.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..base import AdamHyper, AdamSegments, Backend, SGDHyper, SGDSegments, hyper_kwargs
from ..torch_backend import TorchBackend

_EXPECTED_ABI = 4  # csrc/kernels.h kAbiVersion

if os.environ.get("FASTACCUM_NO_EXT", "0") not in ("", "0"):
    # An editable install keeps an earlier build of _C in the source tree; the switch that
    # skipped building it also keeps it from being loaded. ModuleNotFoundError: the registry
    # reports a backend that is not installed at INFO, not as a broken one.
    raise ModuleNotFoundError(
        "FASTACCUM_NO_EXT=1 is set: fastaccum.backends.cpu._C (the C++ CPU kernels) is not loaded; "
        "unset it (and build them with `pip install -e .`) to use backend='cpu'"
    )

try:
    from . import _C
except ImportError as e:  # never a bare except: only "not built / cannot load" means unavailable
    raise ImportError(
        f"fastaccum.backends.cpu._C (the C++ CPU kernels) cannot be imported: {e}. Build it with "
        "`pip install -e .` (without FASTACCUM_NO_EXT=1), or use backend='torch'"
    ) from e

if getattr(_C, "ABI_VERSION", None) != _EXPECTED_ABI:
    raise ImportError(
        f"fastaccum.backends.cpu._C is a stale build (ABI {getattr(_C, 'ABI_VERSION', None)}, expected {_EXPECTED_ABI}); "
        "rebuild it with `pip install -e .`"
    )

from . import ops  # noqa: E402  (registers torch.ops.fastaccum.*; needs _C)

_KERNEL_DTYPES = tuple(ops.DTYPE_CODES)
# Keep seeds of the dtype groups of one call apart (golden-ratio increment).
_GOLDEN = 0x9E3779B97F4A7C15


def _is_cpu_contig(t: Optional[Tensor], dtypes: Sequence[torch.dtype], numel: int) -> bool:
    """What ops.py checks before a pointer goes to C++ (kept cheap: it runs per tensor)."""
    return t is not None and t.is_cpu and t.dtype in dtypes and t.is_contiguous() and t.numel() == numel


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_data_ptr = torch.Tensor.data_ptr


def _eager(t: Tensor) -> bool:
    """A real tensor outside of tracing: the op implementation may be called directly."""
    return type(t) in _PLAIN and not torch.compiler.is_compiling()


# reusable segments' laid-out kernel jobs: (parameter addresses, [(indices or None, job)],
# the indices that go to the torch backend, the gradient list laid out); see _adam_plan
_AdamPlan = Tuple[Tuple[int, ...], list, List[int], List[Tensor]]


def _group_seed(seed: int, g: int) -> int:
    return (int(seed) + g * _GOLDEN) & ((1 << 63) - 1)


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)
    fuses_result_norm = True
    counts_steps = True

    def __init__(self) -> None:
        self._torch = TorchBackend()
        ops.bind_threads()

    @staticmethod
    def isa() -> str:
        """The instruction set the kernels run with: 'avx512', 'avx2' or 'scalar'."""
        return _C.isa()

    # ------------------------------------------------------------------ accumulate
    def accumulate_(self, dst: Tensor, src: Tensor, alpha: float = 1.0, return_sumsq: bool = False, *,
                    result_sumsq: bool = False) -> Optional[float]:
        """``dst += alpha * src``. With ``return_sumsq=True`` also returns ``sum(src**2)`` of the
        incoming gradient (before ``alpha``), computed in fp64 in the same pass; with
        ``result_sumsq=True``, ``sum(dst**2)`` of the result instead (the norm of an
        accumulated gradient, fused into its last fold)."""
        n = dst.numel()
        if _is_cpu_contig(dst, (torch.float32,), n) and _is_cpu_contig(src, _KERNEL_DTYPES, n):
            if _eager(dst) and _eager(src):
                s = ops.accumulate_impl(dst, src, float(alpha), return_sumsq, check=False, of_result=result_sumsq)
                return s if (return_sumsq or result_sumsq) else None
            if result_sumsq:
                with torch.no_grad():
                    torch.ops.fastaccum.accumulate_(dst, src, float(alpha))
                return float(dst.double().square().sum())
            with torch.no_grad():
                if return_sumsq:
                    return float(torch.ops.fastaccum.accumulate_sumsq_(dst, src, float(alpha)))
                torch.ops.fastaccum.accumulate_(dst, src, float(alpha))
            return None
        with torch.no_grad():
            self._torch.accumulate_(dst, src, alpha)
            if result_sumsq:
                return float(dst.double().square().sum())
            if return_sumsq:
                return float(src.detach().double().square().sum())
        return None

    def accumulate_sumsq_(self, dst: Tensor, src: Tensor, alpha: float = 1.0) -> float:
        """The fused side output: ``sum(src**2)`` in the same pass as the accumulation."""
        return self.accumulate_(dst, src, alpha, return_sumsq=True)

    def sumsq_of(self, tensors: Sequence[Tensor]) -> float:
        """``sum(t**2)`` over the tensors in fp64, one read pass (inf/nan when any element is)."""
        if all(_is_cpu_contig(t, (torch.float32,), t.numel()) and _eager(t) for t in tensors):
            return ops.sumsq_impl(tensors, check=False) if tensors else 0.0
        return super().sumsq_of(tensors)

    # ------------------------------------------------------------------ norm
    def grad_norm(self, buf: Tensor) -> Tensor:
        if _is_cpu_contig(buf, (torch.float32,), buf.numel()):
            if _eager(buf):
                return ops.grad_norm_impl(buf, check=False)
            return torch.ops.fastaccum.grad_norm(buf)
        return self._torch.grad_norm(buf)

    # ------------------------------------------------------------------ adam
    def adam_(self, segs: AdamSegments, hp: AdamHyper) -> None:
        counts = segs.step_counts
        plan = self._adam_plan(segs)
        if counts is None:
            self._adam(segs, hp, plan)
            return
        if (plan is not None and len(plan[1]) == 1 and plan[1][0][0] is None and not plan[2]
                and _is_cpu_contig(counts, (torch.float32,), len(segs.params))):
            # the common case: one kernel job for the whole bucket, counting its steps in place;
            # gradients other than the planned ones (a user's p.grad, read in place) pass
            # their addresses for this call
            grads = [] if segs.grads is plan[3] else _grad_ptrs(segs.grads, segs.params, plan[3])
            if grads is not None:
                plan[1][0][1].run_counted(counts.data_ptr(), *_job_scalars(hp, 0), torch.get_num_threads(), grads)
                return
        segs.steps = [int(s) + 1 for s in counts.tolist()]
        segs.step_counts = None
        try:
            self._adam(segs, hp, plan)
        finally:
            segs.step_counts = counts
        counts += 1  # once the update has run, as run_counted does

    def _adam_plan(self, segs: AdamSegments) -> Optional[_AdamPlan]:
        """The kernel jobs of reusable segments, laid out on their first update (and again when
        a parameter's storage moved): (parameter addresses, [(indices or None, job)], the
        indices that go to the torch backend, the gradients laid out). None for segments that
        are not reusable."""
        if torch.compiler.is_compiling() or not segs.reusable:
            return None
        plan = getattr(segs, "_cpu_plan", None)
        if plan is not None and plan[0] == tuple(map(_data_ptr, segs.params)):
            return plan
        if plan is not None and segs.grads is not plan[3]:
            return None  # laid out again from the segments' own gradients only
        groups, fallback = _adam_groups(segs)
        if not (segs.params and _eager(segs.params[0]) and _eager(segs.grads[0])):
            return None
        runs = []
        for idx in groups.values():
            pick = lambda ts: [ts[i] for i in idx] if ts is not None else []  # noqa: E731
            job = ops.adam_plan(pick(segs.params), pick(segs.grads), pick(segs.exp_avgs),
                                pick(segs.exp_avg_sqs), pick(segs.max_exp_avg_sqs), pick(segs.masters))
            runs.append((None if len(idx) == len(segs.params) else idx, job))
        segs._cpu_plan = (tuple(map(_data_ptr, segs.params)), runs, fallback, segs.grads)
        return segs._cpu_plan

    def _adam(self, segs: AdamSegments, hp: AdamHyper, plan: Optional[_AdamPlan]) -> None:
        """The update with the step counts in ``segs.steps``; ``plan``: :meth:`_adam_plan`'s."""
        if plan is not None and segs.grads is plan[3]:
            # The same segments as a previous call (see AdamSegments): the pointers were
            # checked and laid out then; only the step counts and the scalars cross now.
            _, runs, fallback, _ = plan
            nthreads = torch.get_num_threads()
            for g, (idx, job) in enumerate(runs):
                steps = segs.steps if idx is None else [segs.steps[i] for i in idx]
                job.run(steps, *_job_scalars(hp, g), nthreads)
            if fallback:
                with torch.no_grad():
                    self._torch.adam_(_subset_adam(segs, fallback), hp)
            return
        groups, fallback = _adam_groups(segs)
        eager = bool(segs.params) and _eager(segs.params[0]) and _eager(segs.grads[0])
        with torch.no_grad():
            for g, idx in enumerate(groups.values()):
                pick = lambda ts: [ts[i] for i in idx] if ts is not None else []  # noqa: E731
                tensors = dict(
                    params=pick(segs.params), grads=pick(segs.grads), exp_avgs=pick(segs.exp_avgs),
                    exp_avg_sqs=pick(segs.exp_avg_sqs), max_exp_avg_sqs=pick(segs.max_exp_avg_sqs),
                    masters=pick(segs.masters), steps=[int(segs.steps[i]) for i in idx],
                )
                kw = {**hyper_kwargs(hp), "seed": _group_seed(hp.seed, g)}
                if eager:
                    ops.adam_impl(**tensors, **kw, check=False)  # every tensor was checked above
                else:
                    torch.ops.fastaccum.adam_(**tensors, **kw)
            if fallback:
                self._torch.adam_(_subset_adam(segs, fallback), hp)

    # ------------------------------------------------------------------ sgd
    def sgd_(self, segs: SGDSegments, hp: SGDHyper) -> None:
        groups: Dict[torch.dtype, List[int]] = {}
        fallback: List[int] = []
        for i, p in enumerate(segs.params):
            n = p.numel()
            if n == 0:
                continue
            ok = (
                _is_cpu_contig(p, _KERNEL_DTYPES, n)
                and _is_cpu_contig(segs.grads[i], (torch.float32,), n)
                and (hp.momentum == 0 or (segs.momentum_buffers is not None
                                          and _is_cpu_contig(segs.momentum_buffers[i], (torch.float32,), n)))
                and (segs.masters is None or _is_cpu_contig(segs.masters[i], (torch.float32,), n))
            )
            if ok:
                groups.setdefault(p.dtype, []).append(i)
            else:
                fallback.append(i)
        eager = bool(segs.params) and _eager(segs.params[0]) and _eager(segs.grads[0])
        with torch.no_grad():
            for g, idx in enumerate(groups.values()):
                pick = lambda ts: [ts[i] for i in idx] if ts is not None else []  # noqa: E731
                tensors = dict(
                    params=pick(segs.params), grads=pick(segs.grads),
                    momentum_buffers=pick(segs.momentum_buffers) if hp.momentum != 0 else [],
                    masters=pick(segs.masters), steps=[int(segs.steps[i]) for i in idx],
                )
                kw = {**hyper_kwargs(hp), "seed": _group_seed(hp.seed, g)}
                if eager:
                    ops.sgd_impl(**tensors, **kw, check=False)
                else:
                    torch.ops.fastaccum.sgd_(**tensors, **kw)
            if fallback:
                self._torch.sgd_(_subset_sgd(segs, fallback), hp)


def _job_scalars(hp: AdamHyper, group: int) -> Tuple[float, float, float, float, float, bool, bool, float, bool, int]:
    """A laid-out job's scalar arguments (``_C.AdamPlan.run``/``run_counted``, after the step
    counts and before the thread count), for dtype group ``group`` of the call."""
    return (float(hp.lr), float(hp.beta1), float(hp.beta2), float(hp.eps), float(hp.weight_decay), bool(hp.decoupled),
            bool(hp.maximize), float(hp.grad_multiplier), bool(hp.stochastic_rounding),
            _group_seed(hp.seed, group) & ops.SEED_MASK)


def _grad_ptrs(grads: Sequence[Tensor], params: Sequence[Tensor], planned: Sequence[Tensor]) -> Optional[List[int]]:
    """The addresses of ``grads`` for a planned job, or None when one is not an fp32, contiguous
    CPU tensor of its parameter's size (the kernels would misread it)."""
    out = []
    for g, p, q in zip(grads, params, planned):
        if g is not q and not (_is_cpu_contig(g, (torch.float32,), p.numel()) and _eager(g)):
            return None
        out.append(g.data_ptr())
    return out


def _adam_groups(segs: AdamSegments) -> Tuple[Dict[Tuple[torch.dtype, torch.dtype], List[int]], List[int]]:
    """The segments the kernels take, by (parameter dtype, state dtype), and the rest (for the
    torch backend); empty segments are in neither."""
    groups: Dict[Tuple[torch.dtype, torch.dtype], List[int]] = {}
    fallback: List[int] = []
    for i, p in enumerate(segs.params):
        n = p.numel()
        if n == 0:
            continue
        m, v = segs.exp_avgs[i], segs.exp_avg_sqs[i]
        vmax = segs.max_exp_avg_sqs[i] if segs.max_exp_avg_sqs is not None else None
        master = segs.masters[i] if segs.masters is not None else None
        ok = (
            _is_cpu_contig(p, _KERNEL_DTYPES, n)
            and _is_cpu_contig(segs.grads[i], (torch.float32,), n)
            and _is_cpu_contig(m, ops.STATE_DTYPES, n)
            and _is_cpu_contig(v, (m.dtype,), n)
            and (segs.max_exp_avg_sqs is None or _is_cpu_contig(vmax, (m.dtype,), n))
            and (segs.masters is None or _is_cpu_contig(master, (torch.float32,), n))
        )
        if ok:
            groups.setdefault((p.dtype, m.dtype), []).append(i)
        else:
            fallback.append(i)
    return groups, fallback


def _subset_adam(segs: AdamSegments, idx: List[int]) -> AdamSegments:
    pick = lambda ts: [ts[i] for i in idx] if ts is not None else None  # noqa: E731
    return AdamSegments(
        params=pick(segs.params), grads=pick(segs.grads), exp_avgs=pick(segs.exp_avgs),
        exp_avg_sqs=pick(segs.exp_avg_sqs), max_exp_avg_sqs=pick(segs.max_exp_avg_sqs),
        masters=pick(segs.masters), steps=[segs.steps[i] for i in idx],
    )


def _subset_sgd(segs: SGDSegments, idx: List[int]) -> SGDSegments:
    pick = lambda ts: [ts[i] for i in idx] if ts is not None else None  # noqa: E731
    return SGDSegments(
        params=pick(segs.params), grads=pick(segs.grads), momentum_buffers=pick(segs.momentum_buffers),
        masters=pick(segs.masters), steps=[segs.steps[i] for i in idx],
    )
