"""Memory planning for ``fastaccum plan``: what micro-batch fits, how many accumulation steps
reach the target batch, and Adam's β2 for the batch actually used.

Everything here is arithmetic on documented formulas, so it is testable by hand; only
:func:`measure_activations` runs a model (``--measure``) and replaces the activation estimate
with a measurement.

Memory per parameter, per mode (bytes; "static" = independent of the batch):

=================================  ======  =====  ======  =====  =====
mode                               params  grads  master  state  total
=================================  ======  =====  ======  =====  =====
torch AdamW, fp32 params             4       4      -       8     16
torch AdamW, bf16 params (+state)    2       2      -       4      8
fastaccum, fp32 params               4       4      -       8     16
fastaccum, bf16 + fp32 master        2       4      4       8     18
fastaccum, bf16 + stoch. rounding    2       4      -       8     14
fastaccum, step-in-backward (fp32)   4       0      -       8     12
=================================  ======  =====  ======  =====  =====

fastaccum's "grads" are the flat fp32 accumulation buffer: it persists between windows
(torch frees and re-allocates ``.grad`` every window, so its peak is the same). The first
backward of a window hands autograd's fresh gradient to the hook, which copies it into the
buffer: one such fp32 tensor is alive at a time (transient: the largest tensor x 4). bf16
parameters hold their bf16 gradients during backward until they are folded into the buffer:
on a GPU the batched fold holds up to its cap (1 % of the device memory, at least 32 MiB, or
``FASTACCUM_FOLD_CAP_MB``) besides the one being folded ("transient": the largest tensor x 2
bytes + the cap, or + all of them when they are fewer bytes than the cap). The step-in-backward
mode allocates no buffer at all: each fp32 gradient is used by its hook and released, so
one gradient is alive at a time (transient: the largest tensor x 4 bytes). It cannot
accumulate: its micro-batch *is* the per-device batch.

Activations (``--measure`` replaces this estimate): per transformer layer and sequence of
length ``s`` (hidden ``h``, ``a`` heads), with 16-bit activations, no tensor/sequence
parallelism and no recomputation, Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eq. (2), https://arxiv.org/abs/2205.05198:

    s·h·(34 + 5·a·s/h) bytes

The ``5·a·s/h`` part is the stored attention scores, softmax and its dropout mask; fused
(flash / ``scaled_dot_product_attention``) kernels do not store them, so ``--attention flash``
(default) drops it. In fp32 (no autocast) the 32 s·h bytes of 16-bit tensors double and the
2 s·h bytes of dropout masks stay: ``s·h·(66 + 9·a·s/h)``. Outside the layers (same paper,
section 4.3): the fp32 logits kept for the cross-entropy, ``4·s·V``; the final LayerNorm
input, ``2·s·h`` (``4·s·h`` in fp32), and the embedding dropout mask, ``s·h``.

β2 (Marek et al. 2025, "Small Batch Size Training for Language Models: When Vanilla SGD
Works, and Why Gradient Accumulation Is Wasteful", https://arxiv.org/abs/2507.07101): keep
the half-life of Adam's second-moment average fixed in *tokens* when the batch changes,
which gives ``β2* = β2 ** (B*/B)`` for a batch of ``B*`` instead of ``B`` sequences of the
same length. They also find that on one device small batches without accumulation train as
well or better per FLOP, and recommend accumulation only for multi-device training
bottlenecked by communication.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import fastaccum
from fastaccum import batched_fold_cap

from . import units as _units
from .memory import MemoryProbe, release_free_memory
from .memory import device_free_memory as _device_free_memory
from .units import fmt_bytes, format_count

KORTHIKANTI = "Korthikanti et al. 2022, eq. (2), https://arxiv.org/abs/2205.05198"
MAREK = "Marek et al. 2025 (https://arxiv.org/abs/2507.07101)"


class PlanError(ValueError):
    """Bad input for the planner; the message names the argument and the fix."""


# --------------------------------------------------------------------------- units
def parse_memory(text: str, arg: str = "--memory") -> int:
    """``"6GB"`` -> 6_000_000_000 (SI), ``"6GiB"`` -> 6 * 2**30 (binary); a bare number is bytes."""
    try:
        return _units.parse_memory(text, arg)
    except _units.UnitError as e:
        raise PlanError(str(e)) from None


# --------------------------------------------------------------------------- model
@dataclass
class ModelSpec:
    """What the planner knows about the model."""

    params: int
    layers: Optional[int] = None
    hidden: Optional[int] = None
    seq_len: Optional[int] = None
    vocab: Optional[int] = None
    heads: Optional[int] = None
    largest_tensor: Optional[int] = None  # elements of the biggest parameter (bf16 transient gradient)
    source: str = "given"
    inferred: Dict[str, str] = field(default_factory=dict)  # shape field -> where its value came from

    def has_shape(self) -> bool:
        return all(x is not None for x in (self.layers, self.hidden, self.seq_len))


def gpt_param_count(layers: int, hidden: int, vocab: int = 0, seq_len: int = 0) -> int:
    """GPT-2-style count: 12h^2 + 13h per block (qkv, proj, 4h MLP, biases, 2 LayerNorms),
    tied token embedding V·h, learned positions s·h, final LayerNorm 2h."""
    return layers * (12 * hidden * hidden + 13 * hidden) + vocab * hidden + seq_len * hidden + 2 * hidden


@dataclass(frozen=True)
class StandardShape:
    name: str
    params: int  # the published (nominal) count
    layers: int
    hidden: int
    heads: int
    context: int
    vocab: int = 50257


# GPT-2 (Radford et al. 2019, Table 2; context 1024) and GPT-3 (Brown et al. 2020, Table 2.1,
# https://arxiv.org/abs/2005.14165; context 2048), both with the 50257-token BPE vocabulary.
# GPT-3 13B is listed with hidden 5140; 40 heads of 128 make 5120, used here.
STANDARD_SHAPES: Tuple[StandardShape, ...] = (
    StandardShape("GPT-2 small", 124_000_000, 12, 768, 12, 1024),
    StandardShape("GPT-3 Medium", 350_000_000, 24, 1024, 16, 2048),
    StandardShape("GPT-2 medium", 355_000_000, 24, 1024, 16, 1024),
    StandardShape("GPT-3 Large", 760_000_000, 24, 1536, 16, 2048),
    StandardShape("GPT-2 large", 774_000_000, 36, 1280, 20, 1024),
    StandardShape("GPT-3 XL", 1_300_000_000, 24, 2048, 24, 2048),
    StandardShape("GPT-2 XL", 1_500_000_000, 48, 1600, 25, 1024),
    StandardShape("GPT-3 2.7B", 2_700_000_000, 32, 2560, 32, 2048),
    StandardShape("GPT-3 6.7B", 6_700_000_000, 32, 4096, 32, 2048),
    StandardShape("GPT-3 13B", 13_000_000_000, 40, 5120, 40, 2048),
    StandardShape("GPT-3 175B", 175_000_000_000, 96, 12288, 96, 2048),
)


def nearest_shape(params: int) -> StandardShape:
    """The standard GPT shape whose published parameter count is nearest (by ratio) to ``params``."""
    return min(STANDARD_SHAPES, key=lambda sh: abs(math.log(params / sh.params)))


def infer_shape(spec: ModelSpec) -> ModelSpec:
    """Fill the shape numbers the user left out from the nearest standard GPT shape (by
    parameter count) and record each one in ``spec.inferred``; given numbers are kept.

    Without ``--seq-len`` the sequence length is that shape's context (1024 for GPT-2
    sizes, 2048 for GPT-3 sizes).
    """
    if spec.has_shape():
        return spec
    sh = nearest_shape(spec.params)
    why = f"{sh.name} ({format_count(sh.params)} params), nearest standard shape to {format_count(spec.params)}"
    fill = {"layers": sh.layers, "hidden": sh.hidden, "vocab": sh.vocab}
    if spec.hidden is None:
        fill["heads"] = sh.heads  # heads go with the hidden size they divide
    for key, value in fill.items():
        if getattr(spec, key) is None:
            setattr(spec, key, value)
            spec.inferred[key] = why
    if spec.seq_len is None:
        spec.seq_len = sh.context
        spec.inferred["seq_len"] = f"default: the context of {sh.name}"
    if spec.largest_tensor is None and spec.hidden:
        spec.largest_tensor = max(4 * spec.hidden * spec.hidden, (spec.vocab or 0) * spec.hidden)
    return spec


def load_factory(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the callable (cwd is importable, like ``python -m``)."""
    import os
    import sys

    if path.count(":") != 1:
        raise PlanError(f"--model {path!r}: expected module:factory, e.g. --model mypkg.models:build_model")
    mod_name, attr = path.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise PlanError(f"--model {path!r}: cannot import {mod_name!r} ({e}); check the module name and PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 - user code failing at import is reported, not a crash
        raise PlanError(f"--model {path!r}: importing {mod_name!r} raised {type(e).__name__}: {e}") from None
    fn = mod
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise PlanError(f"--model {path!r}: module {mod_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise PlanError(f"--model {path!r}: {attr!r} is not callable; point at a function returning an nn.Module")
    return fn


def build_model(path: str, device: Any = None) -> Any:
    import torch

    fn = load_factory(path)
    model = None
    if device is None:
        # counting only: build on the meta device (no memory); a factory that cannot run
        # there (loads a checkpoint, calls .item(), ...) is built for real below
        try:
            with torch.device("meta"):
                model = fn()
        except Exception:  # noqa: BLE001 - any failure here just means "try for real"
            model = None
    if model is None:
        try:
            model = fn()
        except Exception as e:  # noqa: BLE001 - user code: one-line error, not a traceback
            raise PlanError(f"--model {path!r}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise PlanError(f"--model {path!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def spec_from_module(model: Any, path: str) -> ModelSpec:
    """Parameter count, largest tensor, and shapes from a Hugging Face-style ``config`` when present."""
    ps = [p for p in model.parameters() if p.requires_grad]
    if not ps:
        raise PlanError(f"--model {path!r}: the module has no trainable parameters")
    cfg = getattr(model, "config", None)

    def pick(*names: str) -> Optional[int]:
        for n in names:
            v = getattr(cfg, n, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
        return None

    return ModelSpec(
        params=sum(p.numel() for p in ps),
        largest_tensor=max(p.numel() for p in ps),
        layers=pick("num_hidden_layers", "n_layer", "num_layers"),
        hidden=pick("hidden_size", "n_embd", "d_model"),
        seq_len=pick("max_position_embeddings", "n_positions", "n_ctx"),
        vocab=pick("vocab_size"),
        heads=pick("num_attention_heads", "n_head"),
        source=path,
    )


# --------------------------------------------------------------------- activations
def activation_bytes_per_sequence(spec: ModelSpec, bits: int, attention: str = "flash") -> int:
    """Korthikanti et al. 2022 eq. (2) per layer, plus the output layer (see module docstring)."""
    if not spec.has_shape():
        raise PlanError("activation estimate needs --layers, --hidden and --seq-len (or use --measure with --model)")
    s, h, L = spec.seq_len, spec.hidden, spec.layers
    assert s is not None and h is not None and L is not None
    if attention == "eager" and not spec.heads:
        raise PlanError("--attention eager stores the attention scores: give --heads")
    a = spec.heads or 0
    if bits == 16:
        per_layer = s * h * 34 + (5 * a * s * s if attention == "eager" else 0)
        ln = 2 * s * h
    else:
        per_layer = s * h * 66 + (9 * a * s * s if attention == "eager" else 0)
        ln = 4 * s * h
    extra = 4 * s * (spec.vocab or 0) + ln + s * h
    return L * per_layer + extra


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    state_bytes: int
    act_bits: int  # 16: autocast/bf16 activations; 32: fp32
    transient_bytes_per_elem: int = 0  # the largest gradient alive until it is folded or copied
    can_accumulate: bool = True
    kwargs: str = ""
    short: str = ""  # table label
    batched_fold: bool = False  # bf16 gradients held for the batched fold (up to its cap) during backward

    @property
    def static_per_param(self) -> int:
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.state_bytes


MODES: Tuple[Mode, ...] = (
    Mode("torch-fp32", "torch AdamW, fp32 params", 4, 4, 0, 8, 32, kwargs="torch.optim.AdamW",
         short="torch fp32"),
    Mode("torch-bf16", "torch AdamW, bf16 params+state", 2, 2, 0, 4, 16, kwargs="torch.optim.AdamW (bf16 model)",
         short="torch bf16"),
    Mode("fastaccum-fp32", "fastaccum, fp32 params", 4, 4, 0, 8, 32, 4, kwargs="fastaccum.AdamW",
         short="fastaccum fp32"),
    Mode("fastaccum-bf16-master", "fastaccum, bf16 + fp32 master", 2, 4, 4, 8, 16, 2, batched_fold=True,
         kwargs="fastaccum.AdamW (bf16 model)", short="fastaccum bf16+master"),
    Mode("fastaccum-bf16-sr", "fastaccum, bf16 + stochastic rounding", 2, 4, 0, 8, 16, 2, batched_fold=True,
         kwargs="fastaccum.AdamW(..., master_weights=False)", short="fastaccum bf16+SR"),
    Mode("fastaccum-step-in-backward", "fastaccum, step-in-backward (fp32)", 4, 0, 0, 8, 32, 4, False,
         kwargs="fastaccum.AdamW(..., step_in_backward=True)", short="fastaccum step-in-bwd"),
)
MODE_KEYS = [m.key for m in MODES]


@dataclass
class ModeRow:
    mode: str
    label: str
    short: str
    params_bytes: int
    grads_bytes: int
    master_bytes: int
    state_bytes: int
    transient_bytes: int
    static_bytes: int
    activation_bytes_per_seq: float
    activation_fixed_bytes: float
    max_micro_batch: int
    fits: bool
    micro_batch: Optional[int] = None
    accumulation_steps: Optional[int] = None
    effective_batch: Optional[int] = None
    reaches_target: Optional[bool] = None
    exact: Optional[bool] = None  # effective batch == target
    note: Optional[str] = None


def split_batch(target_per_device: int, max_micro: int, can_accumulate: bool = True) -> Tuple[int, int]:
    """(micro-batch, accumulation steps) with micro x steps == ``target_per_device`` exactly.

    The largest micro-batch that fits (<= ``max_micro``) *and* divides the target: a recipe's
    batch is reproduced exactly (256 with max 11 -> 8 x 32, not 11 x 24 = 264). A micro-batch
    of 1 always divides, so with accumulation the target is always hit; without accumulation
    (step-in-backward) the micro-batch is the batch, capped at ``max_micro``.
    """
    if max_micro < 1:
        return 0, 0
    if target_per_device <= max_micro:
        return target_per_device, 1
    if not can_accumulate:
        return max_micro, 1
    micro = next(d for d in range(max_micro, 0, -1) if target_per_device % d == 0)
    return micro, target_per_device // micro


def beta2_for(beta2: float, batch: float, ref_batch: float) -> float:
    """Marek et al. 2025 half-life rule: ``β2 ** (batch / ref_batch)`` (same sequence length),
    by the library's one implementation, :func:`fastaccum.scale_betas`."""
    return fastaccum.scale_betas((0.0, beta2), ref_batch, batch)[1]


def half_life_tokens(beta2: float, batch: float, seq_len: Optional[int]) -> Optional[float]:
    """Tokens after which exp_avg_sq's weight on a gradient halves: ln(1/2)/ln(β2) steps x batch x s."""
    if not seq_len or beta2 <= 0 or beta2 >= 1:
        return None
    return math.log(0.5) / math.log(beta2) * batch * seq_len


@dataclass
class PlanInput:
    spec: ModelSpec
    memory_bytes: int
    memory_source: str
    target_batch: Optional[int] = None  # sequences over all devices
    target_tokens: Optional[int] = None
    devices: int = 1
    headroom: float = 0.10
    attention: str = "flash"
    beta2: float = 0.999
    beta2_batch: Optional[int] = None  # batch the given beta2 was tuned at (default: the target)
    dtype: str = "bf16"  # which fastaccum mode the summary recommends
    measured: Optional[Dict[str, Any]] = None  # from measure_activations


def plan(inp: PlanInput) -> Dict[str, Any]:
    """The plan as a JSON-ready dict (schema ``fastaccum.plan/1``)."""
    spec = inp.spec
    if spec.params <= 0:
        raise PlanError("--params must be > 0")
    if inp.devices < 1:
        raise PlanError(f"--devices {inp.devices}: must be >= 1")
    if not (0 <= inp.headroom < 1):
        raise PlanError(f"--headroom {inp.headroom}: must be in [0, 1), e.g. 0.1 to keep 10% free")
    if not (0 < inp.beta2 < 1):
        raise PlanError(f"--beta2 {inp.beta2}: must be in (0, 1), e.g. 0.999")
    usable = int(inp.memory_bytes * (1 - inp.headroom))
    smallest = min(m.param_bytes for m in MODES) * spec.params
    if inp.memory_bytes < smallest:
        raise PlanError(
            f"--memory {fmt_bytes(inp.memory_bytes)} is below the {fmt_bytes(smallest)} the bf16 parameters alone "
            f"need ({spec.params:,} params); give more memory or a smaller model")

    target_batch = inp.target_batch
    if inp.target_tokens is not None:
        if not spec.seq_len or "seq_len" in spec.inferred:
            raise PlanError("--tokens needs --seq-len (tokens per sequence) to turn tokens into sequences")
        target_batch = math.ceil(inp.target_tokens / spec.seq_len)
    per_device_target = math.ceil(target_batch / inp.devices) if target_batch else None

    act: Dict[int, Tuple[float, float, str]] = {}  # bits -> (per sequence, fixed, source)
    if inp.measured is not None:
        per, fixed = inp.measured["per_sample_bytes"], inp.measured["fixed_bytes"]
        act[16] = act[32] = (per, fixed, "measured (--measure)")
    else:
        for bits in (16, 32):
            act[bits] = (float(activation_bytes_per_sequence(spec, bits, inp.attention)), 0.0,
                         f"estimate, {KORTHIKANTI}, {inp.attention} attention, {bits}-bit activations")

    rows: List[ModeRow] = []
    for m in MODES:
        n = spec.params
        transient = m.transient_bytes_per_elem * (spec.largest_tensor or 0)
        if m.batched_fold:
            # (counted whatever the device: on a CPU it over-counts by at most the cap)
            transient += min(batched_fold_cap(inp.memory_bytes), m.param_bytes * n)
        static = n * m.static_per_param + transient
        per_seq, fixed, _ = act[m.act_bits]
        room = usable - static - fixed
        max_micro = int(room // per_seq) if room > 0 and per_seq > 0 else 0
        if max_micro >= 1 and static + fixed + per_seq * 1 > usable:  # a negative fitted intercept
            max_micro = 0
        row = ModeRow(
            mode=m.key, label=m.label, short=m.short, params_bytes=n * m.param_bytes, grads_bytes=n * m.grad_bytes,
            master_bytes=n * m.master_bytes, state_bytes=n * m.state_bytes, transient_bytes=transient,
            static_bytes=static, activation_bytes_per_seq=per_seq, activation_fixed_bytes=fixed,
            max_micro_batch=max_micro, fits=max_micro >= 1,
        )
        if not row.fits:
            row.note = "does not fit"
        elif per_device_target:
            micro, accum = split_batch(per_device_target, max_micro, m.can_accumulate)
            row.micro_batch, row.accumulation_steps = micro, accum
            row.effective_batch = micro * accum * inp.devices
            row.reaches_target = row.effective_batch >= target_batch
            row.exact = row.effective_batch == target_batch
            if not m.can_accumulate and not row.reaches_target:
                row.note = "no accumulation"
            elif not row.exact:
                row.note = f"not exact: {target_batch} over {inp.devices} devices"
        else:
            row.micro_batch, row.accumulation_steps = max_micro, 1
            row.effective_batch = max_micro * inp.devices
        rows.append(row)

    chosen_key = "fastaccum-fp32" if inp.dtype == "fp32" else "fastaccum-bf16-master"
    chosen = next(r for r in rows if r.mode == chosen_key)
    recommendation = _recommend(inp, spec, chosen, target_batch)
    return {
        "schema": "fastaccum.plan/1",
        "model": asdict(spec),
        "memory": {"budget_bytes": inp.memory_bytes, "source": inp.memory_source, "headroom": inp.headroom,
                   "usable_bytes": usable},
        "target": {"batch_sequences": target_batch, "tokens": inp.target_tokens, "devices": inp.devices,
                   "per_device_sequences": per_device_target},
        "activations": {
            "bytes_per_sequence_16bit": act[16][0], "bytes_per_sequence_32bit": act[32][0],
            "fixed_bytes": act[16][1], "source": act[16][2], "attention": inp.attention,
            "measured": inp.measured,
        },
        "modes": [asdict(r) for r in rows],
        "chosen_mode": chosen_key,
        "recommendation": recommendation,
    }


def _recommend(inp: PlanInput, spec: ModelSpec, chosen: ModeRow, target_batch: Optional[int]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"mode": chosen.mode, "notes": []}
    if not chosen.fits:
        out["notes"].append(f"{chosen.label} does not fit; see the table for a mode that does")
        return out
    out.update(micro_batch=chosen.micro_batch, accumulation_steps=chosen.accumulation_steps,
               effective_batch=chosen.effective_batch)
    ref = inp.beta2_batch or target_batch or chosen.effective_batch
    eff = chosen.effective_batch or 1
    b2 = beta2_for(inp.beta2, eff, ref)
    no_acc_batch = (chosen.micro_batch or 1) * inp.devices
    b2_small = beta2_for(inp.beta2, no_acc_batch, ref)
    out["beta2"] = {
        "given": inp.beta2, "tuned_at_batch": ref,
        "tuned_at_batch_source": "--beta2-batch" if inp.beta2_batch else "assumed: the target batch",
        "for_chosen_batch": b2, "chosen_batch": eff,
        "without_accumulation": b2_small, "without_accumulation_batch": no_acc_batch,
        "half_life_tokens": half_life_tokens(inp.beta2, ref, spec.seq_len),
        "rule": f"beta2* = beta2 ** (B*/B), same token half-life of exp_avg_sq, {MAREK}",
    }
    if target_batch and not chosen.exact and chosen.reaches_target is not None:
        out["notes"].append(
            f"the target batch {target_batch} cannot be hit exactly: it does not split evenly over {inp.devices} "
            f"devices; {chosen.effective_batch} is the nearest above it")
    if (target_batch and chosen.exact and (chosen.accumulation_steps or 1) > 1 and chosen.micro_batch
            and chosen.micro_batch * 2 <= chosen.max_micro_batch):
        alt = math.ceil(math.ceil(target_batch / inp.devices) / chosen.max_micro_batch)
        alt_micro = math.ceil(math.ceil(target_batch / inp.devices) / alt)
        out["notes"].append(
            f"{chosen.micro_batch} is the largest micro-batch that divides the target exactly (up to "
            f"{chosen.max_micro_batch} fits); {alt_micro} x {alt} = {alt_micro * alt * inp.devices} needs fewer "
            "micro-steps but changes the batch")
    if (chosen.accumulation_steps or 1) > 1 and inp.devices == 1:
        out["notes"].append(
            f"on one device {MAREK} recommend training at the batch that fits "
            f"({no_acc_batch}) without accumulation, with beta2 = {b2_small:.6g} (and the learning rate "
            f"re-tuned): equal or better per-FLOP results, {chosen.accumulation_steps}x more optimizer steps")
    elif (chosen.accumulation_steps or 1) == 1 and target_batch:
        out["notes"].append("the target batch fits in one micro-batch: no accumulation needed")
    if inp.measured is None:
        out["notes"].append("activations are an estimate; --measure --model module:factory measures them")
    else:
        out["notes"].append(f"activations measured with the model as the factory builds it "
                            f"({inp.measured.get('dtype', '?')}) and used for every mode; under bf16 autocast "
                            "they are about half of fp32")
    return out


# ------------------------------------------------------------------------- measure
def _default_loss(out: Any) -> Any:
    import torch

    if isinstance(out, dict):
        out = out.get("loss", next(iter(out.values())))
    elif hasattr(out, "loss") and getattr(out, "loss") is not None:
        out = out.loss
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise PlanError(f"--measure: the model returned {type(out).__name__}; return a tensor or an object with .loss")
    return out.float().mean()


def measure_activations(model: Any, make_input: Callable[[int], Any], device: Any, budget_bytes: int,
                        static_bytes: int = 0, max_batch: int = 1 << 16, max_runs: int = 16) -> Dict[str, Any]:
    """Run forward+backward with growing micro-batches; fit activation memory = fixed + per·b.

    Memory is what the step adds above the state right before it: CUDA ``max_memory_allocated``
    (out-of-memory is caught and ends the search), elsewhere peak RSS (Linux ``VmHWM`` reset
    through ``clear_refs``). On CPU an out-of-memory would kill the process instead of raising,
    so no run is started whose predicted total (``static_bytes`` + what the last two runs
    extrapolate to) exceeds the budget: the search stays under it.
    """
    import torch

    device = torch.device(device)
    model.to(device).train()
    probe = MemoryProbe(device)
    limit = budget_bytes - static_bytes
    runs: List[Dict[str, Any]] = []

    def to_dev(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(to_dev(v) for v in x)
        if isinstance(x, dict):
            return {k: to_dev(v) for k, v in x.items()}
        return x

    def one(b: int) -> Optional[int]:
        inputs = to_dev(make_input(b))
        probe.start()
        try:
            out = model(*inputs) if isinstance(inputs, tuple) else (
                model(**inputs) if isinstance(inputs, dict) else model(inputs))
            _default_loss(out).backward()
            del out
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        peak = probe.stop()
        del inputs
        for p in model.parameters():  # keep the gradient memory allocated, as in training
            if p.grad is not None:
                p.grad.zero_()
        release_free_memory()
        return peak

    def predict(b: int) -> Optional[float]:
        """Activation bytes at batch ``b`` extrapolated from the two largest runs, plus a margin.

        The slope is never below the average per sample of the largest run, and 10% of the
        room is kept as a margin for RSS noise (allocator arenas, page granularity): a run is
        only started when this says it stays under the budget.
        """
        good = sorted((r["batch"], r["activation_bytes"]) for r in runs if r["ok"])
        if len(good) < 2:
            return None
        (b1, m1), (b2, m2) = good[-2], good[-1]
        slope = max((m2 - m1) / (b2 - b1), m2 / b2 if b2 else 0.0, 0.0)
        return m2 + slope * (b - b2) + 0.10 * limit

    def run(b: int, pred: Optional[float]) -> bool:
        """Measure batch ``b`` and record it; True when it fitted."""
        peak = one(b)
        ok = peak is not None and peak <= limit
        runs.append({"batch": b, "activation_bytes": peak, "total_bytes": None if peak is None else peak + static_bytes,
                     "ok": ok, "predicted_bytes": pred})
        return ok

    one(1)  # untimed warm-up: allocates .grad (kept, as in training) and lazy state
    b, bad = 1, None
    while b <= max_batch and len(runs) < max_runs:
        pred = predict(b)
        if pred is not None and pred > limit:
            bad = b
            break
        if not run(b, pred):
            bad = b
            break
        b *= 2
    good_b = max((r["batch"] for r in runs if r["ok"]), default=0)
    # bisect between the largest batch that fitted and the first that did not (or was predicted not to)
    hi = bad if bad is not None else good_b
    lo = good_b
    while bad is not None and hi - lo > max(1, lo // 16) and len(runs) < max_runs:
        mid = (lo + hi) // 2
        pred = predict(mid)
        if pred is not None and pred > limit:
            hi = mid
            continue
        if run(mid, pred):
            lo = mid
        else:
            hi = mid
    good = sorted((r["batch"], r["activation_bytes"]) for r in runs if r["ok"])
    if not good:
        raise PlanError(f"--measure: even a micro-batch of 1 does not fit in {fmt_bytes(budget_bytes)} "
                        f"(after {fmt_bytes(static_bytes)} of parameters and state)")
    # least squares over the larger batches only: at small batches RSS moves in allocator-sized
    # steps (freed memory is reused) and says little about the per-sample slope
    big = [(b, m) for b, m in good if b >= good[-1][0] / 8]
    if len(big) >= 2:
        mb = sum(b for b, _ in big) / len(big)
        mm = sum(m for _, m in big) / len(big)
        var = sum((b - mb) ** 2 for b, _ in big)
        per = sum((b - mb) * (m - mm) for b, m in big) / var if var else mm / mb
        per = max(per, 1.0)
        fixed = mm - per * mb  # may be < 0: it is the line's intercept, only used with b >= 1
    else:
        per, fixed = max(good[-1][1] / good[-1][0], 1.0), 0.0
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {
        "device": str(device), "dtype": ",".join(dtypes), "per_sample_bytes": per, "fixed_bytes": fixed,
        "largest_batch_measured": good[-1][0], "budget_bytes": budget_bytes, "static_bytes": static_bytes,
        "method": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) above the state before each run",
        "runs": runs,
    }


def device_free_memory(device: Any) -> Tuple[int, str]:
    """Free memory of ``device`` (see :func:`fastaccum.tools.memory.device_free_memory`)."""
    free, source = _device_free_memory(device)
    if free is None:
        raise PlanError("cannot read the free memory of this machine; pass --memory (e.g. --memory 16GB)")
    return free, source


# ----------------------------------------------------------------- the command
@dataclass
class PlanOptions:
    """Everything ``fastaccum plan`` takes, as parsed (no arithmetic done yet)."""

    memory: Optional[str] = None  # as typed, e.g. "6GB"; None: free memory of ``device``
    params: Optional[int] = None
    layers: Optional[int] = None
    hidden: Optional[int] = None
    seq_len: Optional[int] = None
    vocab: Optional[int] = None
    heads: Optional[int] = None
    model: Optional[str] = None  # module:factory
    input: Optional[str] = None  # module:fn, for --measure
    measure: bool = False
    device: Any = None  # torch.device for --measure and the default --memory
    headroom: float = 0.10
    batch: Optional[int] = None
    tokens: Optional[int] = None
    devices: int = 1
    dtype: str = "bf16"
    attention: str = "flash"
    beta2: float = 0.999
    beta2_batch: Optional[int] = None


def _input_fn(opts: PlanOptions, model: Any) -> Callable[[int], Any]:
    if opts.input:
        try:
            return load_factory(opts.input)
        except PlanError as e:
            raise PlanError(str(e).replace("--model", "--input")) from None
    fn = getattr(model, "example_input", None)
    if not callable(fn):
        raise PlanError("--measure needs the model's input: pass --input module:fn (fn(batch_size) -> tensor) or "
                        "give the module an example_input(batch_size) method")
    return fn


def model_spec(opts: PlanOptions) -> ModelSpec:
    """The model as the options describe it: a factory, a parameter count and/or shape numbers."""
    if opts.model:
        model = build_model(opts.model)
        spec = spec_from_module(model, opts.model)
        for k in ("layers", "hidden", "seq_len", "vocab", "heads"):
            if getattr(opts, k) is not None:
                setattr(spec, k, getattr(opts, k))
        if opts.params is not None:
            raise PlanError("--params and --model both give the parameter count; drop --params")
        return spec
    if opts.params is None and not (opts.layers and opts.hidden):
        raise PlanError("give the model: --params N (with --layers --hidden --seq-len for activations), "
                        "--layers/--hidden/--seq-len/--vocab, or --model module:factory")
    params = opts.params if opts.params is not None else gpt_param_count(
        opts.layers, opts.hidden, opts.vocab or 0, opts.seq_len or 0)
    largest = None
    if opts.hidden:
        largest = max(4 * opts.hidden * opts.hidden, (opts.vocab or 0) * opts.hidden)
    return ModelSpec(params=params, layers=opts.layers, hidden=opts.hidden, seq_len=opts.seq_len,
                     vocab=opts.vocab, heads=opts.heads, largest_tensor=largest,
                     source="--params" if opts.params is not None else "GPT-2 count from the shape")


def _measure(opts: PlanOptions, spec: ModelSpec, memory: int) -> Dict[str, Any]:
    import torch

    device = opts.device
    real = build_model(opts.model, device=device)
    make_input = _input_fn(opts, real)
    usable = int(memory * (1 - opts.headroom))
    mode = next(m for m in MODES if m.key == ("fastaccum-fp32" if opts.dtype == "fp32" else "fastaccum-bf16-master"))
    static = spec.params * mode.static_per_param
    if static >= usable:
        raise PlanError(f"--memory {fmt_bytes(memory)}: the {fmt_bytes(static)} of parameters, buffers and "
                        f"optimizer state of {mode.label} leave nothing for activations; give more memory")

    def wrapped(b: int) -> Any:
        try:
            return make_input(b)
        except Exception as e:  # noqa: BLE001 - user code: report, do not crash
            raise PlanError(f"--measure: the input function raised {type(e).__name__}: {e}") from None

    try:
        measured = measure_activations(real, wrapped, device, usable, static_bytes=static)
    except (RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"--measure: running the model failed: {type(e).__name__}: {e}") from None
    del real
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return measured


def make_plan(opts: PlanOptions) -> Dict[str, Any]:
    """``fastaccum plan`` without the printing: options in, the plan dict (schema ``fastaccum.plan/1``) out."""
    if opts.measure and not opts.model:
        raise PlanError("--measure runs a real model: give --model module:factory")
    if opts.input and not opts.measure:
        raise PlanError("--input is only used with --measure; add --measure or drop --input")
    spec = model_spec(opts)
    if opts.memory:
        memory, source = parse_memory(opts.memory), "--memory"
    else:
        memory, source = device_free_memory(opts.device or "cpu")
    if not opts.measure:
        infer_shape(spec)
    measured = _measure(opts, spec, memory) if opts.measure else None
    return plan(PlanInput(
        spec=spec, memory_bytes=memory, memory_source=source, target_batch=opts.batch, target_tokens=opts.tokens,
        devices=opts.devices, headroom=opts.headroom, attention=opts.attention, beta2=opts.beta2,
        beta2_batch=opts.beta2_batch, dtype=opts.dtype, measured=measured,
    ))
