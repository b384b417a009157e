"""The batched fold: many bf16/fp16 gradients into the fp32 accumulation buffers in ONE launch.

During backward every bf16/fp16 gradient has to reach its parameter's fp32 segment. One launch
per parameter and micro-batch (an aten add, or a Triton launch) makes a window of a large model
host-bound: thousands of launches whose host cost exceeds their memory time. Instead the
buckets hold the gradients (references, as DDP's reducer holds its buckets) and fold a group
of them at once (see buffers.PendingFolds); this module is that one launch.

The group is described by a small int64 table built on the host each flush (the gradients'
addresses change every micro-batch) and copied to the device without a sync (pinned memory,
``non_blocking``; a plain tensor on the CPU):

    table[0 : n + 1]             first tile of each entry, then the total (a prefix sum)
    table[n + 1 + 4 * k + 0]     source offset of entry k, in elements from the first source
    table[n + 1 + 4 * k + 1]     destination offset of entry k, in fp32 elements from the first one
    table[n + 1 + 4 * k + 2]     elements of entry k
    table[n + 1 + 4 * k + 3]     1: copy (the segment was stale), 0: add into the fresh segment

Offsets are relative to the first source and the first destination, passed as the kernel's
pointer arguments: Triton knows those are 16-byte aligned, and the offsets are multiples of 16 bytes (sources
aligned to 16 bytes, segments to 64), so every full tile streams with 128-bit loads and
stores. The table is O(entries), not O(tiles): a program finds its entry by a binary search
over the first column (a few cached loads), so building it costs the host microseconds even
for a flush of thousands of tiles. Each program folds one tile of BLOCK elements; the last
tile of an entry is masked to its exact length, so the padding between segments is never
written (it stays zero). The add is one fp32 addition, bit-identical to ``dst.add_(src)``.

``sumsq``: every tile also writes the sum of squares of its source elements (what the gradient
noise scale measures per micro-batch), fp32 partials that the caller sums on the device.
"""
from __future__ import annotations

import array
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import triton_kernels as K

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the caller routes to the torch backend with this reason
    raise ImportError(f"fastaccum's batched fold needs the triton package ({e}); pip install triton") from e

__all__ = ["BLOCK", "SRC_ALIGN_BYTES", "fold_", "build_table", "fold_spec", "specializations"]

BLOCK = K.BLOCK
#: a source must start on this many bytes (the vector width) to be folded here
SRC_ALIGN_BYTES = 16
_SRC_DTYPES = (torch.bfloat16, torch.float16)


# the entry count is not specialised (a variant per count == 1 would only add compiles)
@triton.jit(do_not_specialize=["n_entries"])
def _fold_kernel(table_ptr, n_entries: tl.int64, src_ptr, dst_ptr, sumsq_ptr, WITH_SUMSQ: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # the entry of this tile: the last k with first_tile[k] <= pid (binary search, scalar loads)
    lo = pid * 0
    hi = lo + n_entries
    while hi - lo > 1:
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    row = table_ptr + (n_entries + 1) + lo * 4
    # `// 8 * 8` and `// 16 * 16` are no-ops on these offsets (checked on the host) that tell
    # the compiler so: 16-byte (8 bf16/fp16) and 64-byte (16 fp32) aligned vector accesses
    src_off = tl.load(row) // 8 * 8
    dst_off = tl.load(row + 1) // 16 * 16
    numel = tl.load(row + 2)
    copy = tl.load(row + 3)
    start = (pid - tl.load(table_ptr + lo)) * BLOCK
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    src = src_ptr + src_off + idx
    dst = dst_ptr + dst_off + idx
    if start + BLOCK <= numel:  # a full tile: unmasked, vectorised
        s = tl.load(src).to(tl.float32)
        if copy != 0:
            tl.store(dst, s)
        else:
            tl.store(dst, tl.load(dst) + s)
    else:  # the entry's last tile: its exact length, the padding after it untouched
        mask = idx < numel
        s = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        if copy != 0:
            tl.store(dst, s, mask=mask)
        else:
            tl.store(dst, tl.load(dst, mask=mask, other=0.0) + s, mask=mask)
    if WITH_SUMSQ:
        tl.store(sumsq_ptr + pid, tl.sum(s * s, axis=0))


def fold_spec(src_dtype: torch.dtype, with_sumsq: bool) -> K.Spec:
    return K.Spec(_fold_kernel, dict(WITH_SUMSQ=with_sumsq, BLOCK=BLOCK),
                  dict(table_ptr="*i64", src_ptr=f"*{K._SIG_DTYPES[src_dtype]}", dst_ptr="*fp32", sumsq_ptr="*fp32"))


def specializations():
    """Every variant :func:`fold_` launches (compiled for sm_80/sm_90 in tests/test_triton_compile.py)."""
    for src in _SRC_DTYPES:
        for with_sumsq in (False, True):
            yield fold_spec(src, with_sumsq)


def build_table(srcs: Sequence[Tensor], dsts: Sequence[Tensor], copy: Sequence[bool], checked: bool = False
                ) -> Tuple[Tensor, List[int]]:
    """The packed table (on the host) and the first tile of every entry plus the total.

    ``srcs``: contiguous bf16/fp16 tensors of one dtype, 16-byte aligned; ``dsts``: contiguous
    fp32 views of as many elements, 64-byte aligned. Raises ValueError otherwise, unless
    ``checked``: the caller (the buckets' pending folds, once per gradient as it arrives) has
    already made sure of all that, and this only packs."""
    if not (len(srcs) == len(dsts) == len(copy)) or not srcs:
        raise ValueError("fold_ needs one destination and one copy flag per source, and at least one source")
    if not checked:
        _check_pairs(srcs, dsts)
    sbase, dbase = srcs[0].data_ptr(), dsts[0].data_ptr()
    ssize = srcs[0].element_size()
    first = [0]
    rows: List[int] = []
    tiles = 0
    # (this loop runs once per gradient and flush: it only reads addresses and sizes)
    for s, d, c in zip(srcs, dsts, copy):
        n = s.numel()
        tiles += (n + BLOCK - 1) // BLOCK or 1
        first.append(tiles)
        rows += ((s.data_ptr() - sbase) // ssize, (d.data_ptr() - dbase) >> 2, n, 1 if c else 0)
    packed = array.array("q", first)  # (torch.tensor of a list costs 20x more per element)
    packed.extend(rows)
    return torch.frombuffer(packed, dtype=torch.int64), first


def _check_pairs(srcs: Sequence[Tensor], dsts: Sequence[Tensor]) -> None:
    src0, dst0 = srcs[0], dsts[0]
    dtype, f32 = src0.dtype, torch.float32
    if dtype not in _SRC_DTYPES:
        raise ValueError(f"the batched fold reads bfloat16 or float16 gradients, got {dtype}")
    dev = dst0.get_device()  # (an int: cheaper to compare than devices, for every entry)
    salign, dalign = SRC_ALIGN_BYTES, 4 * K.ALIGN
    for s, d in zip(srcs, dsts):
        n = s.numel()
        sp, dp = s.data_ptr(), d.data_ptr()
        if (s.dtype is not dtype or d.dtype is not f32 or d.numel() != n or s.get_device() != dev
                or d.get_device() != dev or not s.is_contiguous() or not d.is_contiguous()):
            raise ValueError(f"fold_: a {s.dtype} source of {n} elements on {s.device} does not fit a {dtype} fold "
                             f"into contiguous fp32 views on {dst0.device} (got {d.dtype}, {d.numel()} elements "
                             f"on {d.device})")
        if sp % salign or dp % dalign:
            raise ValueError(f"fold_: source address {sp:#x} must be {salign}-byte and destination "
                             f"{dp:#x} {dalign}-byte aligned")


def _to_device(packed: Tensor, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(device table, the host tensor it was copied from): pinned + non_blocking on CUDA, which
    neither waits for the device nor lets the host buffer be reused before the copy ran."""
    if device.type == "cuda":
        host = torch.empty(packed.numel(), dtype=torch.int64, pin_memory=True).copy_(packed)
        with torch.cuda.device(device):
            return host.to(device, non_blocking=True), host
    return packed.to(device), packed


def fold_(srcs: Sequence[Tensor], dsts: Sequence[Tensor], copy: Sequence[bool], sumsq: bool = False,
          checked: bool = False) -> Tuple[Optional[Tensor], List[int]]:
    """``dst = src`` (``copy[k]``) or ``dst += src`` for every pair, in one launch, no sync
    (``checked``: see :func:`build_table`).

    Returns (per-tile fp32 sums of squares of the sources when ``sumsq``, else None; the first
    tile of each entry and the total, so ``partials[first[k]:first[k + 1]]`` is entry k's)."""
    packed, first = build_table(srcs, dsts, copy, checked)
    recording = K._RECORDING
    if recording is not None and recording.calls:
        # a step's launches recorded (deferred) before this write of the buffers run first, as
        # they would have in an eager step (a raw launch is no aten op: the recording cannot see it)
        recording.flush()
    device = dsts[0].device
    table, host = _to_device(packed, device)
    n_tiles = first[-1]
    partials = torch.empty(n_tiles, dtype=torch.float32, device=device) if sumsq else None
    with K._device_guard(dsts[0]):
        # through triton_kernels._launch, as every bucket kernel (what the tests count)
        K._launch(fold_spec(srcs[0].dtype, sumsq), (n_tiles,), table, len(first) - 1, srcs[0], dsts[0],
                  dsts[0] if partials is None else partials)
    del host  # (the caching host allocator keeps it until the copy has run)
    return partials, first
