"""The device-side objects of a device-resident step: tables, partial sums, step counts.

With a backend that has bucket kernels (``Backend.device_resident``, the triton backend) a
step is ``sumsq`` per bucket (when the norm is needed), one ``finalize`` for the whole
optimizer (:meth:`fastaccum.window.AccumulationWindow.finalize_on_device`), and one update
launch per bucket: ``2 * buckets + 1`` launches whatever the number of tensors, and no host
sync. This module keeps what those launches need between steps:

* one :class:`~fastaccum.backends.triton_kernels.SegmentTable` per bucket, describing its
  live segments (rebuilt only when the live set, the fresh flags or a ``data_ptr`` changes);
* the partial sums of squares (one slice per bucket) and the step-index tensor;
* the optimizer-wide step counts on the device (``state[p]["step"]`` are views of it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .buffers import Bucket


class ResidentStep:
    def __init__(self, kernels: Any, device: torch.device) -> None:
        self.kernels = kernels
        self.device = device
        self.steps: Optional[Tensor] = None  # fp32, one slot per parameter of every bucket
        self._steps_layout: Tuple[int, ...] = ()
        self._bases: List[int] = []  # first step slot of each bucket
        self._tables: Dict[int, Any] = {}  # bucket index -> SegmentTable
        self._plan_key: Optional[tuple] = None
        self.partials: Optional[Tensor] = None
        self.partial_bases: List[int] = []
        self.step_index: Optional[Tensor] = None
        self.work: List[Tuple[int, Bucket, Any]] = []  # (bucket index, bucket, table) with live segments

    def adopt_steps(self, buckets: Sequence[Bucket]) -> None:
        """One device tensor for every bucket's step counts; the buckets keep views of it."""
        layout = tuple(len(b.params) for b in buckets)
        if layout == self._steps_layout:
            return
        old = [b.steps.to(self.device, torch.float32) for b in buckets]
        self.steps = torch.cat(old) if old else torch.zeros(0, device=self.device)
        self._bases, base = [], 0
        for b, n in zip(buckets, layout):
            self._bases.append(base)
            b.use_steps(self.steps[base: base + n])
            base += n
        self._steps_layout = layout

    def slot(self, bucket_index: int, i: int) -> int:
        """Where parameter ``i`` of bucket ``bucket_index`` keeps its step count in :attr:`steps`."""
        return self._bases[bucket_index] + i

    def plan(self, buckets: Sequence[Bucket]) -> None:
        """The tables of this step's live segments (cached) and the per-step index tensors."""
        K = self.kernels
        work, keys = [], []
        for bi, b in enumerate(buckets):
            live = b.live_indices()
            if not live:
                continue
            fresh = [b.fresh[i] for i in live]
            key = K.SegmentTable.key(b.params, live, fresh)
            table = self._tables.get(bi)
            if table is None or table.key_ != key:
                table = K.SegmentTable.build(b.params, b.offsets, b.numels, live, fresh,
                                             [self._bases[bi] + i for i in live])
                self._tables[bi] = table
            work.append((bi, b, table))
            keys.append((bi, key))
        self.work = work
        plan_key = tuple(keys)
        if plan_key != self._plan_key:
            tables = [t for _, _, t in work]
            self.partial_bases, total = [], 0
            for t in tables:
                self.partial_bases.append(total)
                total += t.n_tiles
            if self.partials is None or self.partials.numel() < max(total, 1):
                self.partials = torch.empty(max(total, 1), dtype=torch.float32, device=self.device)
            self._partials_total = total
            self.step_index = K.step_index_for(tables, self.device) if tables else torch.zeros(
                0, dtype=torch.int64, device=self.device)
            self._plan_key = plan_key

    def sumsq(self) -> Optional[Tensor]:
        """Partial sums of squares of every live bucket's fresh gradient (one launch per bucket)."""
        if not self.work:
            return None
        for (_, b, table), base in zip(self.work, self.partial_bases):
            self.kernels.sumsq(table, b.grad, self.partials, base)
        return self.partials[: self._partials_total]
