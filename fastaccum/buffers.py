"""Flat fp32 accumulation buffers and flat optimizer state, one *bucket* at a time.

A bucket is the parameters of one param group that share a device and a dtype (grouping
by (device, dtype) before any fused launch, as ``torch.optim.Optimizer`` does). Each
parameter owns a segment of every flat tensor; segments start on 64-byte boundaries
(16 fp32 elements) so kernels can use aligned vector loads.

* ``grad``: the fp32 accumulation buffer. fp32 parameters get ``p.grad`` as a view of their
  segment, so autograd accumulates in place; bf16/fp16 parameters get ``p.main_grad``.
* ``exp_avg``/``exp_avg_sq``/... : flat state, allocated at the first step (as torch
  allocates state lazily), exposed per parameter as views in ``optimizer.state[p]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from .backends import Backend

ALIGN = 16  # elements; 16 fp32 = 64 bytes = one cache line / one AVX-512 register


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


class Bucket:
    def __init__(self, params: List[Tensor], group_index: int, backend: Backend, with_buffer: bool = True) -> None:
        self.params = params
        self.group_index = group_index
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.backend = backend
        self.numels = [p.numel() for p in params]
        self.offsets: List[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(max(n, 1), ALIGN)
        self.numel = total
        # No accumulation buffer with step_in_backward: each gradient is used once, in its hook.
        self.grad: Optional[Tensor] = torch.zeros(total, dtype=torch.float32, device=self.device) if with_buffer else None
        self.grad_views: List[Tensor] = self.views(self.grad) if with_buffer else []
        # live[i]: in torch's terms, p.grad would be a tensor (not None) now. Only live
        # parameters are updated, so that parameters that got no gradient are skipped
        # exactly as torch.optim skips ``p.grad is None``.
        self.live = [False] * len(params)
        # The buffer is never zeroed after an update: a consumed segment is *stale* (its
        # values are logically zero) and the window's first gradient overwrites it instead of
        # adding to it. That saves the 4 bytes/param zeroing write, which is the difference
        # between the update and torch's fused AdamW step.
        #   fresh[i]:   the segment holds this window's gradient
        #   garbage[i]: the segment is stale and may hold non-zero values
        self.fresh = [False] * len(params)
        self.garbage = [False] * len(params)
        self.flat_state: Dict[str, Tensor] = {}
        self.state_views: Dict[str, List[Tensor]] = {}
        # step counts per parameter, float32 like torch.optim; state[p]["step"] are views.
        self.steps = torch.zeros(len(params), dtype=torch.float32)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32

    def views(self, flat: Tensor) -> List[Tensor]:
        return [flat[o : o + n].view(p.shape) for o, n, p in zip(self.offsets, self.numels, self.params)]

    def allocate_state(self, name: str, dtype: torch.dtype) -> List[Tensor]:
        """Per-parameter views of the flat state tensor ``name``, allocated (zeroed) on first use."""
        if name not in self.flat_state:
            self.flat_state[name] = torch.zeros(self.numel, dtype=dtype, device=self.device)
            # made once: building the views on every step cost more than a small model's update
            self.state_views[name] = self.views(self.flat_state[name])
        return self.state_views[name]

    def receive(self, i: int, grad: Tensor) -> None:
        """Fold an incoming gradient into segment ``i``: add when fresh, overwrite when stale."""
        if self.fresh[i]:
            self.backend.accumulate_(self.grad_views[i], grad, 1.0)
        else:
            self.assign(i, grad)

    def assign(self, i: int, grad: Tensor) -> None:
        """Make segment ``i`` exactly ``grad`` (a p.grad that is the whole gradient)."""
        self.grad_views[i].copy_(grad.reshape(self.grad_views[i].shape))
        self._mark_fresh(i)

    def zero_segment(self, i: int) -> None:
        """A zero gradient for parameter ``i`` (``zero_grad(set_to_none=False)``)."""
        self.grad_views[i].zero_()
        self._mark_fresh(i)

    def _mark_fresh(self, i: int) -> None:
        self.fresh[i] = True
        self.garbage[i] = False
        self.live[i] = True

    def consume(self, i: int) -> None:
        """Segment ``i`` was used (or dropped): its values are now logically zero."""
        if self.fresh[i]:
            self.fresh[i] = False
            self.garbage[i] = True

    def clean(self, idx=None) -> None:
        """Zero stale segments that may hold old values (before reading them as zeros)."""
        for i in range(len(self.params)) if idx is None else idx:
            if self.garbage[i]:
                self.grad_views[i].zero_()
                self.garbage[i] = False

    def owns_grad(self, i: int, grad: Optional[Tensor]) -> bool:
        """Whether ``grad`` is this bucket's view for parameter ``i`` (autograd accumulated in place)."""
        view = self.grad_views[i]
        if grad is view:  # the common case: autograd accumulated into the very tensor we attached
            return True
        return (
            grad is not None
            and grad.layout == torch.strided
            and grad.device == view.device
            and grad.data_ptr() == view.data_ptr()
            and grad.shape == view.shape
        )

    def layout(self) -> list:
        """What a saved accumulation buffer must match to be loaded into this bucket."""
        return [self.group_index, str(self.dtype), list(self.numels)]
