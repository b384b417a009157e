"""What a backend implements: three kernels over one bucket's flat fp32 buffers.

A *bucket* holds the parameters of one param group that share a device and a dtype. Its
accumulation buffer is a single flat fp32 tensor; each parameter owns an aligned segment
of it. The optimizer calls a backend once per bucket (never once per tensor) for the norm
pass and the update pass, and once per incoming low-precision gradient for accumulation.

The contract every backend keeps (checked kernel by kernel against the torch backend in
``tests/test_cpu_backend.py`` and ``tests/test_triton_backend.py``):

``accumulate_(dst, src, alpha)``
    ``dst += alpha * src``; ``dst`` fp32, ``src`` fp32/bf16/fp16, same number of elements.
``grad_norm(buf)``
    L2 norm of the fp32 buffer as a 0-dim fp32 tensor on ``buf.device``. Non-finite
    (inf/nan) when any element is non-finite: this is the inf check too.
``adam_(segs, hp)`` / ``sgd_(segs, hp)``
    One fused pass per segment: scale the raw gradient by ``hp.grad_multiplier`` (unscale,
    normalise, clip in one multiplier), the update math of :mod:`fastaccum.reference`, the
    fp32 master write and the parameter write-back (nearest-even or stochastic for bf16).
    The gradient is only read: the optimizer never zeroes the buffer, it marks the
    segments stale and the next window's first gradient overwrites them, so the update
    moves as few bytes as torch's fused step (28 per fp32 parameter).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class AdamSegments:
    """Per-parameter tensors of one bucket that take part in an Adam step.

    Every list has one entry per parameter; every tensor is contiguous and has the
    parameter's shape. ``grads`` are fp32 views into the bucket's flat buffer.
    ``masters`` is set for bf16/fp16 parameters kept with fp32 master weights (the update
    is computed on the master and rounded into ``params``); ``None`` otherwise.
    ``exp_avgs``/``exp_avg_sqs`` are fp32 or bf16 (``state_dtype``); math is always fp32.
    ``steps`` are the step counts *after* this step (1 on the first).

    ``reusable``: the optimizer passes this very object again on later steps, with new
    ``steps`` and the same tensors in every other list (the bucket's flat buffer and state
    do not move; a parameter's storage may, so a backend that caches pointers re-checks
    ``params``), except ``grads``: a step whose gradients are not all the buffer's segments
    (a user's ``p.grad`` read in place) gets a new ``grads`` list, and the next step the
    first one again. A backend may then keep what it derives from the lists on the object.

    ``step_counts``: given (instead of ``steps``) only to a backend that ``counts_steps``,
    on a reusable update of the whole bucket: the bucket's float32 tensor of the counts
    *before* this step, one per segment (``state["step"]`` views into it). The backend adds
    one to each count once the update has run and uses the new counts, so the step does not
    read the counts out and add one in a pass of its own.
    """

    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    max_exp_avg_sqs: Optional[List[Tensor]]
    masters: Optional[List[Tensor]]
    steps: List[int]
    reusable: bool = False
    step_counts: Optional[Tensor] = None


# The hyper-parameters are spelled here and nowhere else: the optimizer fills these
# dataclasses from a param group, and every backend passes them on by keyword
# (:func:`hyper_kwargs`) down to its kernels.


@dataclass
class AdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW (decoupled) vs Adam (L2 added to the gradient)
    maximize: bool
    # The one multiplier that turns the raw accumulated buffer into the gradient the user
    # means: 1 / (loss scale * GradScaler scale * weight sum) * clip coefficient. Not to be
    # confused with GradScaler's ``grad_scale`` (the loss scale itself).
    grad_multiplier: float
    stochastic_rounding: bool  # bf16 params without master weights, and bf16 moments
    seed: int  # for stochastic rounding; drawn from torch's RNG by the optimizer


@dataclass
class SGDSegments:
    params: List[Tensor]
    grads: List[Tensor]
    momentum_buffers: Optional[List[Tensor]]  # None when momentum == 0
    masters: Optional[List[Tensor]]
    steps: List[int]


@dataclass
class SGDHyper:
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool
    grad_multiplier: float  # as in AdamHyper
    stochastic_rounding: bool
    seed: int


def hyper_kwargs(hp: Any) -> Dict[str, Any]:
    """A hyper-parameter dataclass as keyword arguments (its field names are the kernels')."""
    return {f.name: getattr(hp, f.name) for f in fields(hp)}


class Backend(abc.ABC):
    """A set of kernels for one kind of device. Stateless; one instance is shared."""

    name: ClassVar[str]
    #: device types (``torch.device.type``) this backend runs on
    device_types: ClassVar[Sequence[str]]
    #: True when the backend also offers bucket kernels that keep a step's decisions on the
    #: device (attribute ``bucket``, the module :mod:`fastaccum.backends.triton_kernels`), so
    #: the optimizer's step never reads a device value on the host.
    device_resident: ClassVar[bool] = False
    #: True when ``accumulate_(..., result_sumsq=True)`` returns the squared norm of the
    #: result in the same pass as the add (the buckets then fuse the norm into the last fold)
    fuses_result_norm: ClassVar[bool] = False
    #: True when ``adam_`` takes ``AdamSegments.step_counts`` and counts the steps itself
    counts_steps: ClassVar[bool] = False

    #: True when :meth:`fold_many_` folds many bf16/fp16 gradients in one launch: the buckets then
    #: hold the gradients that arrive during a backward and fold them in groups (buffers.PendingFolds)
    batched_fold: ClassVar[bool] = False
    #: the byte alignment a source of :meth:`fold_many_` must have (its vector loads)
    batched_fold_align: ClassVar[int] = 16

    def supports(self, device: torch.device) -> bool:
        return device.type in self.device_types

    @abc.abstractmethod
    def accumulate_(self, dst: Tensor, src: Tensor, alpha: float = 1.0) -> None: ...

    @abc.abstractmethod
    def grad_norm(self, buf: Tensor) -> Tensor: ...

    def accumulate_sumsq_(self, dst: Tensor, src: Tensor, alpha: float = 1.0) -> Any:
        """``accumulate_`` that also returns ``sum(src**2)`` (before ``alpha``), a float or a
        0-dim tensor. This default reads ``src`` a second time (the torch backend: one more
        read of each measured gradient, only with ``track_noise_scale=True``); backends with
        a fused side output override it."""
        self.accumulate_(dst, src, alpha)
        return self.sumsq(src)

    def fold_many_(self, srcs: Sequence[Tensor], dsts: Sequence[Tensor], copy: Sequence[bool],
                   sumsq: bool = False, checked: bool = False) -> Tuple[Optional[Tensor], List[int]]:
        """``dsts[k].copy_(srcs[k])`` where ``copy[k]`` (a stale segment), else ``dsts[k] += srcs[k]``;
        ``dsts`` fp32 views of the buffer, ``srcs`` bf16/fp16 gradients of as many elements.

        Returns (``partials``, ``first``): with ``sumsq``, fp32 partial sums of squares of the
        sources such that ``partials[first[k]:first[k + 1]]`` sums to ``|srcs[k]|²`` (else None);
        ``first`` has one entry per pair plus the total. This default runs one op per pair (the
        reference, and what a backend without a batched kernel would do); the triton backend
        folds every pair in one launch. ``checked``: the caller has made sure of the layout
        (what a batched kernel would otherwise check per pair)."""
        partials = []
        for s, d, c in zip(srcs, dsts, copy):
            s = s.reshape(d.shape)
            if c:
                d.copy_(s)
            else:
                d.add_(s)
            if sumsq:
                partials.append(self.sumsq(s).reshape(1))
        return (torch.cat(partials) if sumsq else None), list(range(len(srcs) + 1))

    def sumsq(self, t: Tensor) -> Tensor:
        """``sum(t**2)`` of a flat tensor as a 0-dim fp32 tensor (the norm pass, squared)."""
        t = t.detach().reshape(-1)
        if t.dtype != torch.float32:
            t = t.float()
        n = self.grad_norm(t.contiguous())
        return n * n

    def sumsq_of(self, tensors: Sequence[Tensor]) -> float:
        """``sum(t**2)`` over the tensors, as a Python float (reads back a device value)."""
        return sum(float(self.grad_norm(t.reshape(-1)).double()) ** 2 for t in tensors)

    @abc.abstractmethod
    def adam_(self, segs: AdamSegments, hp: AdamHyper) -> None: ...

    @abc.abstractmethod
    def sgd_(self, segs: SGDSegments, hp: SGDHyper) -> None: ...

    def __repr__(self) -> str:
        return f"<fastaccum backend {self.name!r}>"

    def __reduce__(self) -> Any:
        # a pickled or deep-copied optimizer refers to its backend by name: the copy gets the
        # shared instance of the process it is loaded in (with its threads bound there)
        from . import get_backend

        return (get_backend, (self.name,))
