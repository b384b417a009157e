"""Bucket-level Triton kernels: one launch per bucket per pass, no host sync in a step.

The per-parameter kernels of :mod:`fastaccum.backends.triton_backend` launch once per tensor
(150 launches for a GPT-2 124M step), take step counts and bias corrections from the host
and need the norm on the host (``.item()``) to decide skip and clip. Here a step is

    for each bucket:  sumsq(table, grad, partials, base)          # 1 launch per bucket
    finalize(partials, window, steps, step_index, ...)             # 1 launch per optimizer
    for each bucket:  adam_(table, ...) / sgd_(table, ...)         # 1 launch per bucket

i.e. ``2 * buckets + 1`` launches, and every decision (norm, inf check, clip coefficient,
skip, dynamic loss scale, step counts, bias corrections) is made on the device. The host only
passes Python floats (hyper-parameters) and tensors; it never reads a device value.

Terms
-----
bucket
    The parameters of one (param group, device, dtype). Its gradient is one flat fp32 buffer;
    its state (``exp_avg``, ``exp_avg_sq``, optional ``max_exp_avg_sq``, optional fp32
    ``master``) are flat tensors with the same per-parameter offsets. Offsets are multiples of
    16 elements and every segment owns ``round_up(numel, 16)`` elements of each flat tensor
    (the padding the buffers leave between segments): the flat streams are read and written
    over the padded length so that loads and stores are 128-bit vectors (the padding's values
    are computed from zeros and never read back as data). The parameters themselves are
    scattered tensors, written with their exact length.
:class:`SegmentTable`
    Built once on the host for a bucket and a set of segments (the parameters to process,
    each flagged fresh or stale, each with an index into the optimizer-wide step tensor).
    One H2D copy, no sync. Rebuild when :meth:`SegmentTable.key` changes.
window state
    A small fp32 device tensor (:func:`new_window_state`, slots ``W_*`` below) holding the
    loss scale and its growth tracker, the skipped-step counter and the outputs of
    :func:`finalize` (norm, non-finite flag, skip flag, update multiplier).
steps
    One fp32 device tensor for the whole optimizer, one slot per parameter (torch keeps
    ``state["step"]`` as an fp32 tensor too). :func:`finalize` adds 1 to the slots in
    ``step_index`` unless the step is skipped; the update kernels read the count (already
    incremented: 1 on the first step) and compute the bias corrections in fp64 in-kernel.

Ownership (what the caller keeps between steps): the tables (cache by :meth:`SegmentTable.key`),
the partials tensor (``torch.empty(sum(t.n_tiles))``, one slice per bucket at ``base``), the
step tensor, the step-index tensor (:func:`step_index_for`), the window state. Views of the
step tensor can serve as ``state[p]["step"]``; reading them on the host is the only sync,
and it is the caller's choice when.

Numerics follow :mod:`fastaccum.reference` operation by operation (fp32 math, fp32 copies of
the hyper-parameters; bias corrections in fp64 like Python's floats). bf16 stores round with
integer ops (nearest-even, or stochastic for bf16 moments and for bf16 parameters without
master weights) and keep every NaN a NaN (the ``bits + 0x7FFF + lsb`` trick alone turns NaN
0x7FFFFFFF into -0.0). All offsets are 64-bit.

Signs of zero: Triton up to 3.6 lowers the unary minus of a float to ``0.0 - x`` (PTX
``sub.f32 %r, 0f00000000, %x``), which is +0.0 for x = +0.0 where -x is -0.0; the interpreter
negates. ``p + (-step_size) * q`` with lr = 0 then turned a -0.0 parameter into +0.0 on an H100
while the interpreter kept it. So no kernel negates a float: ``a - b * c`` instead of
``a + (-b) * c`` (the same value, zeros included, and the same fused multiply-add), and
``x * -1.0`` for a sign flip (LLVM makes it ``neg.f32``). tests/test_triton_compile.py checks
the source for unary minus and every variant's PTX for a subtraction from +0.0.

The step's launchers (``sumsq``, ``finalize``, ``adam_``, ``sgd_``) also exist as ``torch.library``
ops (``fastaccum::*``, see the end of this module) so that ``torch.compile`` traces around the
kernels: called as ops while it traces, or recorded (:func:`deferred`) and replayed as ops.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the caller routes to the torch backend with this reason
    raise ImportError(f"fastaccum's bucket kernels need the triton package ({e}); pip install triton") from e

__all__ = [
    "BLOCK", "NUM_WARPS", "ALIGN", "SegmentTable", "new_window_state", "step_index_for",
    "sumsq", "finalize", "adam_", "sgd_", "accumulate_", "BucketStep", "specializations", "deferred", "replay",
    "register_ops",
    "W_LOSS_SCALE", "W_GROWTH_TRACKER", "W_SKIPPED", "W_SQNORM", "W_NORM", "W_FOUND_INF", "W_SKIP",
    "W_MULTIPLIER", "W_CLIP_COEF", "WINDOW_SLOTS",
]

#: elements per tile (one program). 2048 fp32 with 4 warps = 16 elements per thread, i.e.
#: four 128-bit loads per stream per thread: enough bytes in flight to stream at HBM speed,
#: few enough registers for Adam's five streams (checked: no spills, tests/test_triton_compile.py).
BLOCK = 2048
NUM_WARPS = 4
ALIGN = 16  # segment offsets are multiples of this many elements (64 bytes of fp32)
_FINALIZE_BLOCK = 1024

# ------------------------------------------------------------------ window state slots (fp32)
W_LOSS_SCALE = 0  # the loss scale this window's losses were multiplied by (1.0 without scaling); finalize updates it
W_GROWTH_TRACKER = 1  # clean steps since the last scale change (dynamic scaling)
W_SKIPPED = 2  # number of skipped steps (inf/nan), a running count
W_SQNORM = 3  # output: sum of squares of the raw (scaled, un-normalised) fresh gradient
W_NORM = 4  # output: L2 norm of the unscaled, normalised gradient (what clip_grad_norm_ returns)
W_FOUND_INF = 5  # output: 1.0 when the gradient or the external found_inf is non-finite
W_SKIP = 6  # output: 1.0 when this step is skipped; the update kernels then return at once
W_MULTIPLIER = 7  # output: clip_coef / (loss_scale * weight_divisor * external_grad_scale)
W_CLIP_COEF = 8  # output: min(1, max_norm / (norm + 1e-6)), 1.0 without clipping
WINDOW_SLOTS = 16

# ------------------------------------------------------------------ segment table columns (int64)
S_ADDR = 0  # data_ptr of the parameter
S_OFFSET = 1  # element offset of the segment in the flat tensors (multiple of ALIGN)
S_NUMEL = 2  # elements of the parameter
S_FRESH = 3  # 1: the segment holds this window's gradient; 0: stale, read as zeros
S_STEP = 4  # index into the optimizer-wide step tensor
S_FIRST_TILE = 5  # first tile of the segment in the tile map
S_FIELDS = 8  # two spare columns keep rows 64-byte aligned

# how a kernel stores an fp32 value (constexpr, derived from dtypes: see _store_mode)
_PLAIN, _BF16_RNE, _BF16_SR = 0, 1, 2

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SIG_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _device_guard(t: Tensor):
    """Launch on ``t``'s device (``cuda:1`` works whatever the current device is)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ================================================================== segment tables
class SegmentTable:
    """Device tables that let one launch cover a bucket with fixed-size tiles.

    ``data`` (int64, on the bucket's device) holds ``n_segments`` rows of ``S_FIELDS`` columns
    (``S_*``), then the tile map: for each of the ``n_tiles`` tiles, the row of its segment
    (a tile's start within its segment is ``(tile - first_tile) * BLOCK``). A segment of up to
    BLOCK elements is one tile.
    """

    def __init__(self, *, data: Tensor, host: Tensor, n_segments: int, n_tiles: int, param_dtype: torch.dtype,
                 flat_extent: int, key: tuple, step_index: List[int], params: Sequence[Tensor]) -> None:
        self.data = data
        self._host = host  # the (pinned) source of the H2D copy must outlive the copy
        self.n_segments = n_segments
        self.n_tiles = n_tiles
        self.param_dtype = param_dtype
        self.flat_extent = flat_extent  # flat tensors need at least this many elements
        self.key_ = key
        self.step_index = step_index
        #: the listed parameters, in row order, and the addresses the rows hold (the custom ops
        #: are handed the tensors, and re-address the rows when given others: see _addressed)
        self.params = list(params)
        self.addresses = [p.data_ptr() for p in self.params]
        self.device = data.device
        self.segs = data[: n_segments * S_FIELDS]
        self.tiles = data[n_segments * S_FIELDS:]

    @staticmethod
    def key(params: Sequence[Tensor], segments: Sequence[int], fresh: Sequence[bool]) -> tuple:
        """What the table depends on besides the fixed layout: rebuild when this changes."""
        # (runs every step, before the first launch: list comprehensions, not generators)
        return (tuple(segments), tuple([bool(f) for f in fresh]), tuple([params[i].data_ptr() for i in segments]))

    @classmethod
    def build(cls, params: Sequence[Tensor], offsets: Sequence[int], numels: Sequence[int], segments: Sequence[int],
              fresh: Sequence[bool], step_index: Sequence[int]) -> "SegmentTable":
        """Table of ``params[i] for i in segments``.

        ``offsets``/``numels`` are per parameter (the bucket's layout); ``fresh`` and
        ``step_index`` are per listed segment (same length as ``segments``). Raises
        ``ValueError`` for a non-contiguous parameter (route the bucket to the torch backend),
        a misaligned offset, mixed dtypes or devices.
        """
        if not (len(fresh) == len(step_index) == len(segments)):
            raise ValueError("fresh and step_index need one entry per listed segment")
        if not segments:
            raise ValueError("a SegmentTable needs at least one segment")
        if len(set(step_index)) != len(step_index):
            raise ValueError("step_index entries must be distinct (one step count per parameter)")
        dtype, device = params[segments[0]].dtype, params[segments[0]].device
        if dtype not in _TL_DTYPES:
            raise ValueError(f"bucket kernels support float32, bfloat16 and float16 parameters, got {dtype}")
        rows, tile_counts, extent = [], [], 0
        first = 0
        for k, i in enumerate(segments):
            p = params[i]
            if not p.is_contiguous():
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) is not contiguous: the bucket kernels write parameters "
                    "in element order; use the torch backend for this bucket")
            if p.dtype != dtype or p.device != device:
                raise ValueError(f"parameter {i} is {p.dtype} on {p.device}, the bucket is {dtype} on {device}")
            if offsets[i] % ALIGN:
                raise ValueError(f"segment offset {offsets[i]} of parameter {i} is not a multiple of {ALIGN}")
            if numels[i] != p.numel():
                raise ValueError(f"numels[{i}] = {numels[i]} but the parameter has {p.numel()} elements")
            n_tiles = max(1, triton.cdiv(numels[i], BLOCK))
            rows.append([p.data_ptr(), offsets[i], numels[i], int(bool(fresh[k])), int(step_index[k]), first, 0, 0])
            tile_counts.append(n_tiles)
            first += n_tiles
            extent = max(extent, offsets[i] + _round_up(max(numels[i], 1), ALIGN))
        n_seg = len(rows)
        tile_map = torch.repeat_interleave(torch.arange(n_seg, dtype=torch.int64), torch.tensor(tile_counts))
        packed = torch.cat([torch.tensor(rows, dtype=torch.int64).reshape(-1), tile_map])
        if device.type == "cuda":
            # pinned + non_blocking: an H2D copy from pageable memory would synchronise the host
            host = torch.empty(packed.numel(), dtype=torch.int64, pin_memory=True).copy_(packed)
            with torch.cuda.device(device):
                data = host.to(device, non_blocking=True)
        else:
            host, data = packed, packed.to(device)
        key = cls.key(params, segments, fresh)
        return cls(data=data, host=host, n_segments=n_seg, n_tiles=first, param_dtype=dtype, flat_extent=extent,
                   key=key, step_index=list(step_index), params=[params[i] for i in segments])

    def check_flat(self, name: str, t: Optional[Tensor], dtypes=(torch.float32,)) -> None:
        if t is None:
            return
        if t.device != self.device or not t.is_contiguous() or t.dtype not in dtypes or t.numel() < self.flat_extent:
            raise ValueError(
                f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor on {self.device} with at least "
                f"{self.flat_extent} elements (got {t.dtype}, {tuple(t.shape)} on {t.device})")


def step_index_for(tables: Sequence[SegmentTable], device: torch.device) -> Tensor:
    """The step-count slots :func:`finalize` advances: every listed segment of every table (one H2D copy)."""
    idx = torch.tensor([i for t in tables for i in t.step_index], dtype=torch.int64)
    if torch.device(device).type == "cuda":
        idx = idx.pin_memory()
        with torch.cuda.device(device):
            return idx.to(device, non_blocking=True)
    return idx.to(device)


def new_window_state(device: Union[str, torch.device], loss_scale: float = 1.0) -> Tensor:
    """A fresh window state (slots ``W_*``): the given loss scale, zero counters, multiplier 1."""
    w = torch.zeros(WINDOW_SLOTS, dtype=torch.float32)
    w[W_LOSS_SCALE] = loss_scale
    w[W_MULTIPLIER] = 1.0
    w[W_CLIP_COEF] = 1.0
    return w.to(device)


# ================================================================== shared device helpers
@triton.jit
def _tile(seg_ptr, tile_ptr, BLOCK: tl.constexpr):
    """This program's tile: (segment row pointer, its first flat offset, its first element of
    the parameter, lanes, exact mask, padded mask, gradient mask).

    Offsets are 64-bit, but only as scalars (the tile's starts); per element there is just the
    int32 lane in ``0..BLOCK-1`` (``ptr + base + lane``). 64-bit offsets and compares for each
    of a thread's 16 elements cost registers that ptxas 12.8 (triton 3.6) spilled to an 8-byte
    stack frame in three _sgd_kernel variants."""
    pid = tl.program_id(0).to(tl.int64)
    row = seg_ptr + tl.load(tile_ptr + pid) * 8
    # `// 16 * 16` is a no-op on these (offsets are multiples of 16 by construction, the
    # padded length is rounded up) that tells the compiler so: vector loads and stores.
    off = tl.load(row + 1) // 16 * 16
    start = (pid - tl.load(row + 5)) * BLOCK
    n = tl.minimum(tl.load(row + 2) - start, BLOCK).to(tl.int32)  # this tile's elements
    npad = (n + 15) // 16 * 16
    lane = tl.arange(0, BLOCK)
    # the gradient mask: the padded length, or nothing for a stale segment (0 * npad keeps
    # the divisibility the vector loads need)
    gmask = lane < npad * tl.load(row + 3).to(tl.int32)
    return row, off + start, start, lane, lane < n, lane < npad, gmask


@triton.jit
def _noise(seed, base, lane, step):
    """Four independent random 32-bit words per element, for stochastic rounding: Philox keyed
    by ``seed``, counting (lane, low and high word of the tile's flat offset, step count).

    The step count is read from device memory (finalize advanced it), so a step replayed from a
    CUDA graph, whose ``seed`` argument was frozen at capture, still draws fresh noise, and no
    two (element, step) pairs of a bucket share a counter. The counter words other than the
    lane are uniform: 32-bit Philox on one int32 vector per element."""
    c1 = (base & 0xFFFFFFFF).to(tl.uint32)
    c2 = (base >> 32).to(tl.uint32)
    c3 = step.to(tl.uint32)
    return tl.philox(seed, lane, c1, c2, c3)


@triton.jit
def _bf16_bits(x, bits, NAN_SAFE: tl.constexpr):
    """Keep every NaN a (quiet) NaN with its sign, whatever its payload: adding to the bits of
    NaN 0x7FFFFFFF would carry into the sign and give -0.0."""
    quiet = (x.to(tl.int32, bitcast=True) & -65536) | 0x00400000
    return tl.where(x != x, quiet, bits)


@triton.jit
def _round_store(ptr, offs, mask, x, noise, MODE: tl.constexpr):
    """Store fp32 ``x`` into ``ptr``'s dtype (plain cast, bf16 nearest-even, or bf16 stochastic
    with 16 random bits ``noise``). bf16 rounds with integer ops: the interpreter's cast
    truncates, so rounding there by the cast would differ from the GPU."""
    if MODE == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        x = _bf16_bits(x, bits, True).to(tl.float32, bitcast=True)
    elif MODE == 2:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (noise & 0xFFFF).to(tl.int32)) & -65536
        x = _bf16_bits(x, bits, True).to(tl.float32, bitcast=True)
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _f64(x):
    """An fp64 tensor from an fp64 scalar argument (the interpreter hands those over as Python floats).
    ``x - 0.0``, not ``x + 0.0``: -0.0 + 0.0 is +0.0, -0.0 - 0.0 keeps the sign (and folds away)."""
    return x - tl.zeros([], tl.float64)


@triton.jit
def _powi(base, e):
    """``base ** e`` for fp64 ``base`` and int64 ``e >= 0`` by squaring: only multiplies, so it
    compiles everywhere (no fp64 exp/log), within a few fp64 ulps of Python's ``**``."""
    acc = tl.full([], 1.0, tl.float64)
    b = base
    while e > 0:
        if (e & 1) != 0:
            acc = acc * b
        b = b * b
        e = e >> 1
    return acc


# ================================================================== kernels
@triton.jit
def _sumsq_kernel(seg_ptr, tile_ptr, grad_ptr, partials_ptr, partial_base: tl.int64, BLOCK: tl.constexpr):
    """Per tile: sum of squares of a fresh segment's gradient (0 for a stale one). No atomics:
    finalize adds the partials in a fixed order. inf/nan propagate: this is the inf check."""
    row, base, start, lane, exact, padded, gmask = _tile(seg_ptr, tile_ptr, BLOCK)
    g = tl.load(grad_ptr + base + lane, mask=gmask, other=0.0)
    g = tl.where(exact, g, 0.0)
    tl.store(partials_ptr + partial_base + tl.program_id(0).to(tl.int64), tl.sum(g * g, axis=0))


@triton.jit(do_not_specialize=["has_ext_scale", "has_found_inf", "divisor_from_ptr", "check_finite", "dynamic",
                               "scale_applied"])
def _finalize_kernel(partials_ptr, n_partials: tl.int64, window_ptr, steps_ptr, step_index_ptr, n_step_index: tl.int64,
                     ext_scale_ptr, found_inf_ptr, divisor_ptr, divisor: tl.float64, max_norm: tl.float64,
                     growth_factor: tl.float64, backoff_factor: tl.float64, growth_interval: tl.float64,
                     has_ext_scale: tl.int32, has_found_inf: tl.int32, divisor_from_ptr: tl.int32,
                     check_finite: tl.int32, dynamic: tl.int32, scale_applied: tl.int32,
                     BLOCK: tl.constexpr):
    """One program for the whole optimizer: the norm, skip, multiplier, loss scale and step counts."""
    acc = tl.zeros([BLOCK], tl.float64)  # fp64: the sum of ~1e5 partials stays exact to fp32
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0).to(tl.float64)
    sqnorm = tl.sum(acc, axis=0)
    # Optional inputs arrive as flags with a valid dummy pointer (the window): loads are
    # unconditional and selected with tl.where, so no branch changes a value's type.
    loss_scale = tl.load(window_ptr + 0).to(tl.float64)
    divisor = _f64(divisor)
    max_norm = _f64(max_norm)
    ext_scale = tl.where(has_ext_scale != 0, tl.load(ext_scale_ptr).to(tl.float64), 1.0)
    divisor = tl.where(divisor_from_ptr != 0, tl.load(divisor_ptr).to(tl.float64), divisor)
    # the loss scale divides the gradient only when the losses were multiplied by it
    # (opt.backward/scale_loss); the dynamic update below runs either way
    applied = tl.where(scale_applied != 0, loss_scale, 1.0)
    inv = 1.0 / (applied * ext_scale * divisor)
    norm = tl.sqrt(sqnorm) * inv
    bad_norm = (sqnorm != sqnorm) | (sqnorm == float("inf"))
    ext_inf = tl.load(found_inf_ptr).to(tl.float32) != 0.0
    nonfinite = (bad_norm & (check_finite != 0)) | (ext_inf & (has_found_inf != 0))
    # torch.nn.utils.clip_grad_norm_'s formula, on the unscaled, normalised norm
    coef = tl.where(max_norm > 0, tl.minimum(max_norm / (norm + 1e-6), 1.0), 1.0)
    # dynamic loss scale, GradScaler's rules: back off on inf/nan and reset the streak; grow
    # after growth_interval clean steps (only to a finite scale)
    tracker = tl.load(window_ptr + 1)
    streak = tracker + 1.0
    grows = streak >= growth_interval
    grown = loss_scale * growth_factor
    grown = tl.where(grown == float("inf"), loss_scale, grown)
    new_scale = tl.where(nonfinite, loss_scale * backoff_factor, tl.where(grows, grown, loss_scale))
    new_tracker = tl.where(nonfinite | grows, 0.0, streak)
    new_scale = tl.where(dynamic != 0, new_scale, loss_scale)
    new_tracker = tl.where(dynamic != 0, new_tracker, tracker)
    skip = tl.where(nonfinite, 1.0, 0.0)
    tl.store(window_ptr + 0, new_scale.to(tl.float32))
    tl.store(window_ptr + 1, new_tracker)
    tl.store(window_ptr + 2, tl.load(window_ptr + 2) + skip)
    tl.store(window_ptr + 3, sqnorm.to(tl.float32))
    tl.store(window_ptr + 4, norm.to(tl.float32))
    tl.store(window_ptr + 5, skip)
    tl.store(window_ptr + 6, skip)
    tl.store(window_ptr + 7, (inv * coef).to(tl.float32))
    tl.store(window_ptr + 8, coef.to(tl.float32))
    if skip == 0.0:
        # one program and distinct indices (checked at build): no races
        for start in range(0, n_step_index, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            m = offs < n_step_index
            slot = tl.load(step_index_ptr + offs, mask=m, other=0)
            tl.store(steps_ptr + slot, tl.load(steps_ptr + slot, mask=m, other=0.0) + 1.0, mask=m)


@triton.jit
def _hyper_lr(lr_ptr, lr, lr_from_ptr):
    if lr_from_ptr != 0:
        lr = tl.load(lr_ptr).to(tl.float64)
    return lr


# Runtime flags are not specialised (Triton would compile a variant per flag == 1): they are
# uniform branches, free next to the memory traffic, and keep the variant list small.
@triton.jit(do_not_specialize=["lr_from_ptr", "decoupled", "maximize", "seed"])
def _adam_kernel(seg_ptr, tile_ptr, grad_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, steps_ptr, window_ptr, lr_ptr,
                 lr: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
                 lr_from_ptr: tl.int32, decoupled: tl.int32, maximize: tl.int32, seed: tl.int32,
                 P_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, P_MODE: tl.constexpr,
                 S_MODE: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(window_ptr + 6) != 0.0:  # finalize decided to skip: nothing changes
        return
    row, base, start, lane, exact, padded, gmask = _tile(seg_ptr, tile_ptr, BLOCK)
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE)) + start
    # bias corrections in fp64 from the device step count, like reference.adam_math's floats
    step = tl.load(steps_ptr + tl.load(row + 4))
    lr = _hyper_lr(lr_ptr, _f64(lr), lr_from_ptr)
    beta1 = _f64(beta1)
    beta2 = _f64(beta2)
    weight_decay = _f64(weight_decay)
    bc1 = 1.0 - _powi(beta1, step.to(tl.int64))
    bc2 = 1.0 - _powi(beta2, step.to(tl.int64))
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    w1 = (1.0 - beta1).to(tl.float32)  # lerp weight
    b2 = beta2.to(tl.float32)
    w2 = (1.0 - beta2).to(tl.float32)
    eps32 = _f64(eps).to(tl.float32)
    wd = weight_decay.to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)

    g = tl.load(grad_ptr + base + lane, mask=gmask, other=0.0)
    g = tl.where(exact, g, 0.0) * tl.load(window_ptr + 7)  # the one multiplier: unscale x normalise x clip
    if maximize != 0:
        g = g * -1.0  # not -g: see 'Signs of zero' in the module docstring
    if HAS_MASTER:
        p = tl.load(master_ptr + base + lane, mask=padded, other=0.0)
    else:
        p = tl.load(p_ptr + lane, mask=exact, other=0.0).to(tl.float32)
    if decoupled != 0:
        p = p * decay
    else:
        g = g + wd * p
    m = tl.load(m_ptr + base + lane, mask=padded, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + lane, mask=padded, other=0.0).to(tl.float32)
    # torch's lerp: two formulas, by the side of 0.5 the weight is on
    if w1 < 0.5:
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - w1)
    v = v * b2 + w2 * g * g
    r0, r1, r2, r3 = _noise(seed, base, lane, step)
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + base + lane, mask=padded, other=0.0).to(tl.float32), v)
        _round_store(vmax_ptr + base, lane, padded, vmax, r2, S_MODE)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps32
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps32
    p = p - step_size * (m / denom)  # == p + (-step_size) * (m / denom), zeros' signs included
    _round_store(m_ptr + base, lane, padded, m, r0, S_MODE)
    _round_store(v_ptr + base, lane, padded, v, r1, S_MODE)
    if HAS_MASTER:
        tl.store(master_ptr + base + lane, p, mask=padded)
    _round_store(p_ptr, lane, exact, p, r3, P_MODE)


@triton.jit(do_not_specialize=["lr_from_ptr", "nesterov", "maximize", "seed"])
def _sgd_kernel(seg_ptr, tile_ptr, grad_ptr, buf_ptr, master_ptr, steps_ptr, window_ptr, lr_ptr,
                lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64,
                lr_from_ptr: tl.int32, nesterov: tl.int32, maximize: tl.int32, seed: tl.int32,
                P_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, P_MODE: tl.constexpr,
                S_MODE: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(window_ptr + 6) != 0.0:
        return
    row, base, start, lane, exact, padded, gmask = _tile(seg_ptr, tile_ptr, BLOCK)
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE)) + start
    step = tl.load(steps_ptr + tl.load(row + 4))  # already advanced by finalize: 1 on the first step
    lr32 = _hyper_lr(lr_ptr, _f64(lr), lr_from_ptr).to(tl.float32)
    momentum = _f64(momentum)
    dampening = _f64(dampening)
    weight_decay = _f64(weight_decay)
    g = tl.load(grad_ptr + base + lane, mask=gmask, other=0.0)
    g = tl.where(exact, g, 0.0) * tl.load(window_ptr + 7)
    if maximize != 0:
        g = g * -1.0  # not -g: see 'Signs of zero' in the module docstring
    if HAS_MASTER:
        p = tl.load(master_ptr + base + lane, mask=padded, other=0.0)
    else:
        p = tl.load(p_ptr + lane, mask=exact, other=0.0).to(tl.float32)
    g = g + weight_decay.to(tl.float32) * p
    r0, r1, r2, r3 = _noise(seed, base, lane, step)
    if HAS_MOMENTUM:
        mom = momentum.to(tl.float32)
        # torch starts the buffer as a copy of the first gradient (no dampening)
        first = step == 1.0
        b = tl.load(buf_ptr + base + lane, mask=padded, other=0.0).to(tl.float32)
        b = tl.where(first, g, b * mom + (1.0 - dampening).to(tl.float32) * g)
        _round_store(buf_ptr + base, lane, padded, b, r0, S_MODE)
        if nesterov != 0:
            g = g + mom * b
        else:
            g = b
    p = p - lr32 * g
    if HAS_MASTER:
        tl.store(master_ptr + base + lane, p, mask=padded)
    _round_store(p_ptr, lane, exact, p, r3, P_MODE)


@triton.jit
def _accumulate_kernel(dst_ptr, src_ptr, n: tl.int64, alpha: tl.float32, sumsq_ptr, WITH_SUMSQ: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dst = tl.load(dst_ptr + offs, mask=mask, other=0.0)
    tl.store(dst_ptr + offs, dst + alpha * src, mask=mask)
    if WITH_SUMSQ:  # side output for a gradient-noise-scale estimate: |src|^2 per block
        tl.store(sumsq_ptr + pid, tl.sum(src * src, axis=0))


# ================================================================== specialisations
class Spec(NamedTuple):
    """One compiled variant: the kernel, its constexprs, and the dtype of every pointer argument."""

    kernel: object
    constexprs: Dict[str, object]
    pointers: Dict[str, str]


def _store_mode(dtype: torch.dtype, stochastic: bool) -> int:
    if dtype != torch.bfloat16:
        return _PLAIN
    return _BF16_SR if stochastic else _BF16_RNE


def _adam_spec(param_dtype: torch.dtype, has_master: bool, state_dtype: torch.dtype, amsgrad: bool) -> Spec:
    # bf16 moments always round stochastically (small decays of exp_avg_sq survive), so do bf16
    # parameters without a master; with a master the parameter is rounded to nearest.
    sd = _SIG_DTYPES[state_dtype]
    return Spec(_adam_kernel, dict(
        P_DTYPE=_TL_DTYPES[param_dtype], HAS_MASTER=has_master, AMSGRAD=amsgrad,
        P_MODE=_store_mode(param_dtype, not has_master), S_MODE=_store_mode(state_dtype, True), BLOCK=BLOCK,
    ), dict(seg_ptr="*i64", tile_ptr="*i64", grad_ptr="*fp32", m_ptr=f"*{sd}", v_ptr=f"*{sd}", vmax_ptr=f"*{sd}",
            master_ptr="*fp32", steps_ptr="*fp32", window_ptr="*fp32", lr_ptr="*fp32"))


def _sgd_spec(param_dtype: torch.dtype, has_master: bool, state_dtype: torch.dtype, has_momentum: bool) -> Spec:
    sd = _SIG_DTYPES[state_dtype]
    return Spec(_sgd_kernel, dict(
        P_DTYPE=_TL_DTYPES[param_dtype], HAS_MASTER=has_master, HAS_MOMENTUM=has_momentum,
        P_MODE=_store_mode(param_dtype, not has_master), S_MODE=_store_mode(state_dtype, True), BLOCK=BLOCK,
    ), dict(seg_ptr="*i64", tile_ptr="*i64", grad_ptr="*fp32", buf_ptr=f"*{sd}", master_ptr="*fp32",
            steps_ptr="*fp32", window_ptr="*fp32", lr_ptr="*fp32"))


def _accumulate_spec(src_dtype: torch.dtype, with_sumsq: bool) -> Spec:
    return Spec(_accumulate_kernel, dict(WITH_SUMSQ=with_sumsq, BLOCK=BLOCK),
                dict(dst_ptr="*fp32", src_ptr=f"*{_SIG_DTYPES[src_dtype]}", sumsq_ptr="*fp32"))


_SUMSQ_SPEC = Spec(_sumsq_kernel, dict(BLOCK=BLOCK),
                   dict(seg_ptr="*i64", tile_ptr="*i64", grad_ptr="*fp32", partials_ptr="*fp32"))
_FINALIZE_SPEC = Spec(_finalize_kernel, dict(BLOCK=_FINALIZE_BLOCK),
                      dict(partials_ptr="*fp32", window_ptr="*fp32", steps_ptr="*fp32", step_index_ptr="*i64",
                           ext_scale_ptr="*fp32", found_inf_ptr="*fp32", divisor_ptr="*fp32"))

#: (param dtype, fp32 master) pairs the optimizer produces (fp16 always has a master)
PARAM_CONFIGS = ((torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True))
STATE_DTYPES = (torch.float32, torch.bfloat16)


def specializations() -> Iterator[Spec]:
    """Every variant this module launches, from the same ``_*_spec`` functions the launchers
    use, so the compile tests cover exactly what runs."""
    yield _SUMSQ_SPEC
    yield _FINALIZE_SPEC
    for (pd, master), sd, flag in itertools.product(PARAM_CONFIGS, STATE_DTYPES, (False, True)):
        yield _adam_spec(pd, master, sd, flag)
        yield _sgd_spec(pd, master, sd, flag)
    for src, with_sumsq in itertools.product((torch.float32, torch.bfloat16, torch.float16), (False, True)):
        yield _accumulate_spec(src, with_sumsq)


def _launch(spec: Spec, grid, *args, **scalars) -> None:
    spec.kernel[grid](*args, **scalars, **spec.constexprs, num_warps=NUM_WARPS)


# ================================================================== launchers
# Each launcher checks its arguments, then hands the kernel's arguments, in the order of its
# ``torch.library`` op, to _dispatch: launched now (eager), called as the op (while
# torch.compile traces: the op is opaque to it), or recorded by :func:`deferred` for the
# optimizer's compiled step to replay as ops.
_RECORDING: Optional["_Deferral"] = None


class _Deferral(TorchDispatchMode):
    """The recording of :func:`deferred`: the launches not run yet (``calls``), and a watch on
    every aten op run meanwhile. An op that touches the memory of a recorded launch's tensor
    (reads what it would write, writes what it would read, or reads its value on the host)
    first runs the launches recorded so far, in order, as an eager step would have by then;
    later launches are recorded again. So deferring a launch never changes what any code sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []
        self._memory: set = set()

    def record(self, op, args: tuple) -> None:
        self.calls.append((op, args))
        self._memory.update(_memory_of(args))

    def flush(self) -> None:
        calls = list(self.calls)
        self.calls.clear()
        self._memory.clear()
        for op, args in calls:
            op(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a view reads no data (what is later done through it is seen then)
        if self.calls and not func.is_view and self._touches((args, kwargs)):
            self.flush()  # (this mode is off inside its own handler: the launches run as usual)
        return func(*args, **kwargs)

    def _touches(self, tree) -> bool:
        for t in pytree.tree_leaves(tree):
            if isinstance(t, Tensor):
                key = _storage_key(t)
                if key is None or key in self._memory:  # no storage to compare (a wrapper subclass): assume so
                    return True
        return False


def _storage_key(t: Tensor):
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _memory_of(tree) -> set:
    """The storages of the tensors in ``tree``, as (device, address)."""
    keys = {_storage_key(t) for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)}
    return {k for k in keys if k is not None and k[1] != 0}


@contextlib.contextmanager
def deferred() -> Iterator[List[tuple]]:
    """Record the launches of :func:`sumsq`, :func:`finalize`, :func:`adam_` and :func:`sgd_`
    made inside the block instead of running them: a list of ``(op, args)`` for :func:`replay`,
    complete when the block ends.

    The optimizer's step under ``torch.compile`` runs its host side eagerly in this block and
    replays the launches as the ``fastaccum::*`` ops in the compiled graph, after the block.
    Any aten op in the block that touches a recorded launch's memory runs the launches recorded
    until then first (see _Deferral), so the host side sees what an eager step would: it only
    costs those launches their place in the graph."""
    global _RECORDING
    outer, _RECORDING = _RECORDING, _Deferral()
    try:
        with _RECORDING:
            yield _RECORDING.calls
    finally:
        _RECORDING = outer


def replay(calls: Sequence[tuple]) -> None:
    """Run what :func:`deferred` recorded, as ``fastaccum::*`` op calls (traced by torch.compile)."""
    for op, args in calls:
        op(*args)


def _dispatch(name: str, args: tuple) -> None:
    if _RECORDING is not None:
        _RECORDING.record(_op(name), args)
    elif torch.compiler.is_compiling():
        _op(name)(*args)
    else:
        _IMPLS[name](*args, readdress=False)


def _op(name: str):
    _define_ops()
    return getattr(torch.ops.fastaccum, name).default


def sumsq(table: SegmentTable, grad: Tensor, partials: Tensor, base: int = 0) -> None:
    """Write ``table.n_tiles`` partial sums of squares of the fresh segments' gradient into
    ``partials[base : base + table.n_tiles]`` (stale segments count 0). One launch, no sync."""
    table.check_flat("grad", grad)
    if partials.numel() < base + table.n_tiles or partials.dtype != torch.float32:
        raise ValueError(f"partials needs {base + table.n_tiles} fp32 elements, got {partials.numel()} {partials.dtype}")
    _dispatch("bucket_sumsq", (table.segs, table.tiles, grad, partials, int(base)))


def _sumsq_impl(segs: Tensor, tiles: Tensor, grad: Tensor, partials: Tensor, base: int, readdress: bool = True) -> None:
    with _device_guard(grad):
        _launch(_SUMSQ_SPEC, (tiles.numel(),), segs, tiles, grad, partials, base)


def finalize(partials: Optional[Tensor], window: Tensor, steps: Tensor, step_index: Tensor, *,
             weight_divisor: Union[float, Tensor] = 1.0, max_norm: Optional[float] = None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             check_finite: bool = True, dynamic: bool = False, growth_factor: float = 2.0,
             backoff_factor: float = 0.5, growth_interval: int = 2000, scale_applied: bool = True) -> None:
    """Decide the step on the device (one single-program launch for the whole optimizer).

    Reads the partials of every bucket (``None``: no norm pass ran, the norm is 0) and the
    window state; writes the norm, the non-finite flag (``found_inf`` from GradScaler or
    another rank is OR-ed in), the multiplier ``clip_coef / (loss_scale * weight_divisor *
    grad_scale)``, the skip flag, the loss-scale update (``dynamic``: GradScaler semantics), the
    skipped-step counter, and adds 1 to ``steps[step_index]`` unless skipped.
    ``weight_divisor`` may be a 1-element fp32 device tensor (e.g. an all-reduced weight sum).
    ``max_norm`` None or <= 0: no clipping. ``check_finite=False``: no inf check from the norm.
    """
    if window.dtype != torch.float32 or window.numel() < WINDOW_SLOTS:
        raise ValueError(f"window must be an fp32 tensor of {WINDOW_SLOTS} slots (new_window_state)")
    if steps.dtype != torch.float32 or step_index.dtype != torch.int64:
        raise ValueError("steps must be fp32 and step_index int64")
    div_t = weight_divisor if isinstance(weight_divisor, Tensor) else None
    _dispatch("finalize", (partials, window, steps, step_index, 1.0 if div_t is not None else float(weight_divisor),
                           float(max_norm or 0.0), bool(check_finite), bool(dynamic), float(growth_factor),
                           float(backoff_factor), int(growth_interval), grad_scale, found_inf, div_t,
                           bool(scale_applied)))


def _finalize_impl(partials: Optional[Tensor], window: Tensor, steps: Tensor, step_index: Tensor,
                   weight_divisor: float, max_norm: float, check_finite: bool, dynamic: bool, growth_factor: float,
                   backoff_factor: float, growth_interval: int, grad_scale: Optional[Tensor] = None,
                   found_inf: Optional[Tensor] = None, divisor: Optional[Tensor] = None, scale_applied: bool = True,
                   readdress: bool = True) -> None:
    n_partials = 0 if partials is None else partials.numel()
    with _device_guard(window):
        _launch(_FINALIZE_SPEC, (1,),
                window if partials is None else partials, n_partials, window, steps, step_index, step_index.numel(),
                window if grad_scale is None else grad_scale, window if found_inf is None else found_inf,
                window if divisor is None else divisor, float(weight_divisor), float(max_norm),
                float(growth_factor), float(backoff_factor), float(growth_interval),
                int(grad_scale is not None), int(found_inf is not None), int(divisor is not None),
                int(check_finite), int(dynamic), int(scale_applied))


def _lr_args(lr: Union[float, Tensor], window: Tensor):
    """(lr as a Python float, lr as a 1-element fp32 tensor or None)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.device != window.device:
            raise ValueError("a tensor lr must have one element and live on the parameters' device")
        return 0.0, lr if lr.dtype == torch.float32 else lr.float()
    return float(lr), None


def adam_(table: SegmentTable, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor],
          master: Optional[Tensor], steps: Tensor, window: Tensor, *, lr: Union[float, Tensor], beta1: float,
          beta2: float, eps: float, weight_decay: float, decoupled: bool, maximize: bool = False, seed: int = 0) -> None:
    """Adam/AdamW over every segment of ``table``: one launch; returns at once on the device when
    ``window[W_SKIP]`` is set. The gradient is read (times ``window[W_MULTIPLIER]``), never written.
    ``seed`` keys the stochastic-rounding noise, which is also counted by each parameter's step in
    ``steps``: the same seed at every step (as a captured CUDA graph replays it) draws new noise."""
    sd = exp_avg.dtype
    table.check_flat("grad", grad)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)):
        table.check_flat(name, t, (sd,) if sd in STATE_DTYPES else STATE_DTYPES)
    table.check_flat("master", master)
    if table.param_dtype == torch.float16 and master is None:
        raise ValueError("float16 parameters need fp32 master weights")
    lr_f, lr_t = _lr_args(lr, window)
    _dispatch("bucket_adam", (table.params, table.addresses, table.segs, table.tiles, grad, exp_avg, exp_avg_sq,
                              max_exp_avg_sq, master, steps, window, lr_f, lr_t, float(beta1), float(beta2),
                              float(eps), float(weight_decay), bool(decoupled), bool(maximize),
                              int(seed) & 0x7FFFFFFF))


def _adam_impl(params: List[Tensor], addrs: List[int], segs: Tensor, tiles: Tensor, grad: Tensor, exp_avg: Tensor,
               exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor], master: Optional[Tensor], steps: Tensor,
               window: Tensor, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled: bool, maximize: bool, seed: int, readdress: bool = True) -> None:
    if readdress:
        segs = _addressed(segs, params, addrs)
    spec = _adam_spec(params[0].dtype, master is not None, exp_avg.dtype, max_exp_avg_sq is not None)
    with _device_guard(grad):
        _launch(spec, (tiles.numel(),), segs, tiles, grad, exp_avg, exp_avg_sq,
                exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq, grad if master is None else master,
                steps, window, window if lr_tensor is None else lr_tensor, lr, beta1, beta2, eps, weight_decay,
                int(lr_tensor is not None), int(decoupled), int(maximize), seed & 0x7FFFFFFF)


def sgd_(table: SegmentTable, grad: Tensor, momentum_buffer: Optional[Tensor], master: Optional[Tensor],
         steps: Tensor, window: Tensor, *, lr: Union[float, Tensor], momentum: float = 0.0, dampening: float = 0.0,
         nesterov: bool = False, weight_decay: float = 0.0, maximize: bool = False, seed: int = 0) -> None:
    """SGD (momentum, dampening, nesterov, weight decay) over every segment of ``table``: one
    launch. The momentum buffer starts as the gradient when ``steps`` reads 1 for the segment.
    ``seed``: as for :func:`adam_`."""
    table.check_flat("grad", grad)
    table.check_flat("momentum_buffer", momentum_buffer, STATE_DTYPES)
    table.check_flat("master", master)
    if (momentum != 0) != (momentum_buffer is not None):
        raise ValueError("pass a momentum_buffer exactly when momentum != 0")
    lr_f, lr_t = _lr_args(lr, window)
    _dispatch("bucket_sgd", (table.params, table.addresses, table.segs, table.tiles, grad, momentum_buffer, master,
                             steps, window, lr_f, lr_t, float(momentum), float(dampening), float(weight_decay),
                             bool(nesterov), bool(maximize), int(seed) & 0x7FFFFFFF))


def _sgd_impl(params: List[Tensor], addrs: List[int], segs: Tensor, tiles: Tensor, grad: Tensor,
              momentum_buffer: Optional[Tensor], master: Optional[Tensor], steps: Tensor, window: Tensor, lr: float,
              lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              maximize: bool, seed: int, readdress: bool = True) -> None:
    if readdress:
        segs = _addressed(segs, params, addrs)
    sd = momentum_buffer.dtype if momentum_buffer is not None else torch.float32
    spec = _sgd_spec(params[0].dtype, master is not None, sd, momentum_buffer is not None)
    with _device_guard(grad):
        _launch(spec, (tiles.numel(),), segs, tiles, grad, grad if momentum_buffer is None else momentum_buffer,
                grad if master is None else master, steps, window, window if lr_tensor is None else lr_tensor, lr,
                momentum, dampening, weight_decay, int(lr_tensor is not None), int(nesterov), int(maximize),
                seed & 0x7FFFFFFF)


def _addressed(segs: Tensor, params: Sequence[Tensor], addrs: Sequence[int]) -> Tensor:
    """``segs`` with its rows pointing at ``params``: the kernels write the parameters through
    the addresses in the table, and a traced graph may hand the op other tensors than the ones
    the table was built for (functionalisation passes copies, and copies them back after the
    op). Rebuilt on the device, no sync; the table itself is left as it is."""
    ptrs = [p.data_ptr() for p in params]
    if ptrs == list(addrs):
        return segs
    rows = segs.reshape(len(params), S_FIELDS).clone()
    new = torch.tensor(ptrs, dtype=torch.int64)
    if segs.device.type == "cuda":
        new = new.pin_memory()
    rows[:, S_ADDR] = new.to(segs.device, non_blocking=True)
    return rows.reshape(-1)


def accumulate_(dst: Tensor, src: Tensor, alpha: float = 1.0, sumsq_out: Optional[Tensor] = None) -> None:
    """``dst += alpha * src`` (dst fp32, src fp32/bf16/fp16, same number of elements, both
    contiguous), 64-bit offsets. ``sumsq_out`` (fp32, ``cdiv(n, BLOCK)`` elements): per-block
    sums of squares of ``src`` as well. One launch, no sync."""
    n = dst.numel()
    if src.numel() != n or dst.dtype != torch.float32 or not dst.is_contiguous():
        raise ValueError("accumulate_ needs a contiguous fp32 dst and a src with as many elements")
    src = src.reshape(-1)
    if not src.is_contiguous():
        src = src.contiguous()
    blocks = max(1, triton.cdiv(n, BLOCK))
    if sumsq_out is not None and (sumsq_out.numel() < blocks or sumsq_out.dtype != torch.float32):
        raise ValueError(f"sumsq_out needs {blocks} fp32 elements")
    with _device_guard(dst):
        _launch(_accumulate_spec(src.dtype, sumsq_out is not None), (blocks,), dst, src, n, float(alpha),
                dst if sumsq_out is None else sumsq_out)


# ================================================================== the optimizer-facing helper
@dataclass
class BucketStep:
    """The per-optimizer objects of the bucket kernels, and the call sequence of one step.

    The caller (the optimizer) owns the flat buffers and the parameters; this object owns the
    tables' bookkeeping, the partials, the step-index tensor and the window state::

        bs = BucketStep(device, loss_scale=2.0**16)
        steps = torch.zeros(n_params_total, device=device)          # or the optimizer's own
        bs.set_tables([SegmentTable.build(...), ...])                # when a key changes
        bs.norm(grads)                                               # sumsq per bucket
        bs.finalize(steps, weight_divisor=..., max_norm=..., dynamic=True)   # 1 launch
        for table, bucket in ...: adam_(table, ..., steps, bs.window, ...)   # 1 launch per bucket

    ``window[W_NORM]``, ``window[W_SKIP]`` etc. are device values: read them only when needed.
    """

    device: torch.device
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.window = new_window_state(self.device, self.loss_scale)
        self.tables: List[SegmentTable] = []
        self.bases: List[int] = []
        self.partials: Optional[Tensor] = None
        self.step_index: Optional[Tensor] = None

    def set_tables(self, tables: Sequence[SegmentTable]) -> None:
        self.tables = list(tables)
        self.bases = list(itertools.accumulate([0] + [t.n_tiles for t in self.tables[:-1]]))
        total = sum(t.n_tiles for t in self.tables)
        if self.partials is None or self.partials.numel() < total:
            self.partials = torch.empty(max(total, 1), dtype=torch.float32, device=self.device)
        self.step_index = step_index_for(self.tables, self.device)

    def norm(self, grads: Sequence[Tensor]) -> None:
        """``sumsq`` for each table (``grads[k]``: the flat buffer of table ``k``'s bucket)."""
        for table, grad, base in zip(self.tables, grads, self.bases):
            sumsq(table, grad, self.partials, base)

    def finalize(self, steps: Tensor, *, with_norm: bool = True, **kw) -> None:
        total = sum(t.n_tiles for t in self.tables)
        parts = self.partials[:total] if with_norm else None
        finalize(parts, self.window, steps, self.step_index, check_finite=with_norm, **kw)


# ================================================================== torch.library ops
# One op per launcher, declared with the tensors it mutates so that torch.compile orders and
# functionalises them correctly. The parameters are reached through the table's addresses:
# they are passed as ``params`` (declared mutated), with the addresses the table holds, and an
# op given other tensors (functionalisation's copies) writes those (see _addressed).
_IMPLS = {"bucket_sumsq": _sumsq_impl, "finalize": _finalize_impl, "bucket_adam": _adam_impl,
          "bucket_sgd": _sgd_impl}
_OPS_DEFINED = False


def _define_ops() -> None:
    global _OPS_DEFINED
    if _OPS_DEFINED:
        return
    from torch.library import custom_op

    @custom_op("fastaccum::bucket_sumsq", mutates_args=("partials",))
    def bucket_sumsq(segs: Tensor, tiles: Tensor, grad: Tensor, partials: Tensor, base: int) -> None:
        _sumsq_impl(segs, tiles, grad, partials, base)

    @custom_op("fastaccum::finalize", mutates_args=("window", "steps"))
    def finalize_op(partials: Optional[Tensor], window: Tensor, steps: Tensor, step_index: Tensor,
                    weight_divisor: float, max_norm: float, check_finite: bool, dynamic: bool, growth_factor: float,
                    backoff_factor: float, growth_interval: int, grad_scale: Optional[Tensor] = None,
                    found_inf: Optional[Tensor] = None, divisor: Optional[Tensor] = None,
                    scale_applied: bool = True) -> None:
        _finalize_impl(partials, window, steps, step_index, weight_divisor, max_norm, check_finite, dynamic,
                       growth_factor, backoff_factor, growth_interval, grad_scale, found_inf, divisor, scale_applied)

    @custom_op("fastaccum::bucket_adam", mutates_args=("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"))
    def bucket_adam(params: List[Tensor], addrs: List[int], segs: Tensor, tiles: Tensor, grad: Tensor,
                    exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor], master: Optional[Tensor],
                    steps: Tensor, window: Tensor, lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float,
                    eps: float, weight_decay: float, decoupled: bool, maximize: bool, seed: int) -> None:
        _adam_impl(params, addrs, segs, tiles, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, steps, window, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decoupled, maximize, seed)

    @custom_op("fastaccum::bucket_sgd", mutates_args=("params", "momentum_buffer", "master"))
    def bucket_sgd(params: List[Tensor], addrs: List[int], segs: Tensor, tiles: Tensor, grad: Tensor,
                   momentum_buffer: Optional[Tensor], master: Optional[Tensor], steps: Tensor, window: Tensor,
                   lr: float, lr_tensor: Optional[Tensor], momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool, maximize: bool, seed: int) -> None:
        _sgd_impl(params, addrs, segs, tiles, grad, momentum_buffer, master, steps, window, lr, lr_tensor, momentum,
                  dampening, weight_decay, nesterov, maximize, seed)

    # the ops write their arguments in place and return nothing: under fake tensors, nothing to do
    for op in (bucket_sumsq, finalize_op, bucket_adam, bucket_sgd):
        op.register_fake(_no_output)

    _OPS_DEFINED = True


def _no_output(*args, **kwargs) -> None:
    return None


def register_ops() -> None:
    """Define the ``fastaccum::bucket_sumsq`` / ``finalize`` / ``bucket_adam`` / ``bucket_sgd`` ops (idempotent)."""
    _define_ops()
