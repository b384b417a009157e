"""CPU backend benchmarks (issue 4): pytest-benchmark, no timing asserts.

Run (about 2-3 min at the full size on 2 cores; ``-s`` is not needed, the table is printed):

    python -m pytest bench/test_bench_cpu.py --benchmark-only -q -p no:randomly
    FASTACCUM_BENCH_CPU_PARAMS=10M python -m pytest bench/test_bench_cpu.py ...   # quick

Layout: ``FASTACCUM_BENCH_CPU_PARAMS`` (default 100M) fp32 parameters in 24 large + 48 small
tensors (98 % / 2 %, odd sizes so the vector tails run), ``FASTACCUM_BENCH_CPU_THREADS``
(default 2) threads for torch and fastaccum alike.

Method: the rows of one scenario are timed *interleaved* (round-robin, ``..._ROUNDS``
rounds, default 5) in one process, so a neighbour stealing a core hurts every row alike;
each row reports its median and best time. Untimed ``prepare`` work before each timed run
delivers fresh gradients. pytest-benchmark records the fastaccum row; the full table
(ms/step, GB/s, % of the streaming bound, ratios) goes to ``extra_info``, to the terminal
and to ``bench-results/cpu_bench.json``.

Bytes per parameter (the minimum each algorithm moves; GB/s = bytes * params / time):

=========================  =====  ===============================================
fastaccum step, fp32        28    read p, g, m, v; write p, m, v (g is never zeroed:
                                  the next window's first gradient overwrites it)
fastaccum step, bf16 state  20    read p, g, m(2), v(2); write p, m(2), v(2)
torch fused/foreach step    28    read p, g, m, v; write p, m, v
torch step + zero_grad      32    + write g = 0 (``zero_grad(set_to_none=False)``)
fastaccum step stage        32    norm/inf read of g (4) + fused step (28)
torch step stage            48    unscale_ (8) + clip: norm (4) + scale (8) + step (28)
=========================  =====  ===============================================

The streaming bound is ``fastaccum.backends.cpu._C.stream``: the same threads and chunking as the
kernels, reading 4 fp32 arrays and writing back 4 (fastaccum's pattern) or 3 (torch's),
with no arithmetic to speak of. "% bound" = the row's GB/s / the bound's GB/s.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch

from fastaccum.tools import bench as harness
from fastaccum.backends import BackendUnavailableError, get_backend

try:
    get_backend("cpu")
except BackendUnavailableError as e:
    pytest.skip(f"cpu backend not built: {e}", allow_module_level=True)

import fastaccum  # noqa: E402
from fastaccum.backends.cpu import _C  # noqa: E402

N_PARAMS = harness.parse_count(os.environ.get("FASTACCUM_BENCH_CPU_PARAMS", "100M"))
THREADS = int(os.environ.get("FASTACCUM_BENCH_CPU_THREADS", "2"))
ROUNDS = int(os.environ.get("FASTACCUM_BENCH_CPU_ROUNDS", "5"))
ACCUM = 8
LR, BETAS, EPS, WD, MAX_NORM = 1e-3, (0.9, 0.999), 1e-8, 1e-2, 1.0
RESULTS: Dict[str, dict] = {}
OUT = Path(os.environ.get("FASTACCUM_BENCH_CPU_OUT", "bench-results/cpu_bench.json"))


def sizes(n: int) -> List[int]:
    """24 large + 48 small tensors, odd sizes, summing to ``n``."""
    small = max(1, (n * 2 // 100) // 48) | 1
    large = max(1, (n - 48 * small) // 24)
    out = [large | 1] * 23
    out.append(max(1, n - 48 * small - sum(out)))
    return out + [small] * 48


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)
    gc.collect()
    harness.release_free_memory()


def make_params(dtype: torch.dtype, seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 0.02).to(dtype).requires_grad_() for n in sizes(N_PARAMS)]


def clone_params(params: List[torch.Tensor], dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    return [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in params]


def make_grads(params: List[torch.Tensor], seed: int, dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * 1e-3).to(dtype or p.dtype) for p in params]


# ----------------------------------------------------------------------------------
# interleaved timing


@dataclass
class Row:
    name: str
    run: Callable[[], None]
    prepare: Callable[[], None] = lambda: None
    bytes_per_param: int = 0
    note: str = ""
    times: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def time_interleaved(rows: List[Row], rounds: int = ROUNDS, warmup: int = 1) -> None:
    """The harness's one timing loop (round-robin, rotated each round) over these rows."""
    times = harness.time_rounds({str(i): row for i, row in enumerate(rows)}, rounds, warmup)
    for i, row in enumerate(rows):
        row.times.extend(times[str(i)])


def stream_rows(nwrite_list=(4, 3)) -> List[Row]:
    """Streaming-bound rows: 4 fp32 arrays of N_PARAMS elements, read 4, write nwrite."""
    arrays = [torch.ones(N_PARAMS) for _ in range(4)]
    ptrs = [a.data_ptr() for a in arrays]
    rows = []
    for w in nwrite_list:
        rows.append(Row(f"stream bound (read 4, write {w})",
                        lambda w=w: _C.stream(ptrs, w, N_PARAMS, torch.get_num_threads()),
                        bytes_per_param=16 + 4 * w, note="fastaccum.backends.cpu._C.stream"))
    rows[0]._keep = arrays  # type: ignore[attr-defined]
    return rows


def report(key: str, title: str, rows: List[Row], reference: str, ours: str, bound: Optional[str],
           benchmark, extra: Optional[dict] = None) -> dict:
    ref = next(r for r in rows if r.name == reference)
    bound_row = next((r for r in rows if r.name == bound), None) if bound else None
    bound_gbps = bound_row.bytes_per_param * N_PARAMS / bound_row.median / 1e9 if bound_row else None
    table = []
    for r in rows:
        gbps = r.bytes_per_param * N_PARAMS / r.median / 1e9 if r.bytes_per_param else None
        table.append(dict(
            row=r.name, ms_median=r.median * 1e3, ms_best=r.best * 1e3, bytes_per_param=r.bytes_per_param,
            gbps=gbps, pct_of_bound=(100 * gbps / bound_gbps) if (gbps and bound_gbps) else None,
            speedup_vs_reference=ref.median / r.median, note=r.note,
        ))
    result = dict(title=title, params=N_PARAMS, threads=THREADS, rounds=ROUNDS, isa=_C.isa(),
                  reference=reference, rows=table, **(extra or {}))
    ours_row = next(r for r in rows if r.name == ours)
    result["ratio"] = ref.median / ours_row.median
    if bound_row is not None:
        # achieved GB/s over the bound's GB/s (for the same bytes/param: bound time / our time)
        result["pct_of_bound"] = next(r["pct_of_bound"] for r in table if r["row"] == ours)
    RESULTS[key] = result
    benchmark.extra_info.update(result)
    _print_table(result)
    _write()
    return result


def _print_table(result: dict) -> None:
    lines = [f"\n## {result['title']}  ({harness.format_count(result['params'])} params, {result['threads']} threads, "
             f"isa {result['isa']}, median of {result['rounds']} interleaved rounds)",
             f"{'row':<44} {'ms':>9} {'best':>9} {'B/p':>4} {'GB/s':>7} {'%bound':>7} {'x ref':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['row']:<44} {r['ms_median']:9.2f} {r['ms_best']:9.2f} {r['bytes_per_param']:4d} "
                     f"{(r['gbps'] or float('nan')):7.1f} {(r['pct_of_bound'] or float('nan')):7.1f} "
                     f"{r['speedup_vs_reference']:7.2f}")
    lines.append(f"ratio (reference time / fastaccum time) = {result['ratio']:.2f}"
                 + (f";  fastaccum at {result['pct_of_bound']:.1f} % of the streaming bound (GB/s)"
                    if result.get("pct_of_bound") else ""))
    for k in ("peak_rss_added_mb", "held_mb"):
        if k in result:
            lines.append(f"{k} = {result[k]:.1f}")
    print("\n".join(lines))


def _write() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(RESULTS, indent=1, default=str))


def _bench_ours(benchmark, row: Row) -> None:
    benchmark.pedantic(row.run, setup=row.prepare, rounds=max(2, ROUNDS // 2), iterations=1, warmup_rounds=0)


# ----------------------------------------------------------------------------------
# step rows


def fastaccum_step_row(name: str, params, grads, **kw) -> Row:
    opt = fastaccum.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend="cpu", **kw)

    def prepare():
        # as in training: backward hands the gradient to the hook, which copies it into the
        # (stale) buffer segment; the timed step then only reads it
        harness.simulated_loss(params, grads).backward()

    row = Row(name, opt.step, prepare, note="opt.step() (fused update; the gradient is only read)")
    row._opt = opt  # type: ignore[attr-defined]
    return row


def torch_step_row(name: str, params, grads, zero: bool = False, **kw) -> Row:
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)

    def prepare():
        for p, g in zip(params, grads):
            if zero and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g

    def run():
        opt.step()
        if zero:
            opt.zero_grad(set_to_none=False)

    return Row(name, run, prepare, note="opt.step()" + (" + zero_grad(set_to_none=False)" if zero else ""))



def fastaccum_window(params, gsets, accum: int) -> Callable[[], None]:
    """fastaccum's accumulation window on the cpu backend: ``opt.backward`` + ``step`` +
    ``zero_grad`` per micro-batch, with a dynamic loss scale and clipping."""
    opt = fastaccum.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend="cpu",
                          accumulation_steps=accum, loss_scale="dynamic", max_grad_norm=MAX_NORM)

    def run() -> None:
        for k in range(accum):
            opt.backward(harness.simulated_loss(params, gsets[k % 2]))
            opt.step()
            opt.zero_grad()

    return run


def torch_recipe_window(params, gsets, accum: int) -> Callable[[], None]:
    """The torch recipe for one accumulation window: GradScaler-scaled ``loss / accum``
    backward per micro-batch, then unscale_, clip_grad_norm_, fused AdamW, update, zero_grad."""
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    scaler = torch.amp.GradScaler("cpu")

    def run() -> None:
        for k in range(accum):
            scaler.scale(harness.simulated_loss(params, gsets[k % 2]) / accum).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    return run


def test_a_step_fp32(benchmark):
    """(a) step alone, fp32: fastaccum cpu vs torch fused / foreach and the streaming bound."""
    params = make_params(torch.float32)
    grads = make_grads(params, 1)
    rows = [fastaccum_step_row("fastaccum cpu", params, grads)]
    tp = clone_params(params)
    rows.append(torch_step_row("torch AdamW fused", tp, grads, fused=True))
    rows[-1].bytes_per_param = 28
    tz = clone_params(params)
    rows.append(torch_step_row("torch AdamW fused + zero_grad", tz, [g.clone() for g in grads], zero=True,
                               fused=True))
    rows[-1].bytes_per_param = 32
    tf = clone_params(params)
    rows.append(torch_step_row("torch AdamW foreach", tf, grads, foreach=True))
    rows[-1].bytes_per_param = 28
    rows[0].bytes_per_param = 28
    cls, why = harness.deepspeed_adam_class()
    if cls is not None:
        dp = clone_params(params)
        ds = cls(dp, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
        rows.append(Row("DeepSpeedCPUAdam", ds.step, lambda: [setattr(p, "grad", g) for p, g in zip(dp, grads)],
                        bytes_per_param=28))
    rows += stream_rows()
    time_interleaved(rows)

    # (e) peak RSS during the step: nothing but the tensors themselves
    opt = rows[0]._opt  # type: ignore[attr-defined]
    rows[0].prepare()
    probe = harness.MemoryProbe(torch.device("cpu"))
    probe.start()
    opt.step()
    added = probe.stop()
    held = harness.held_bytes([*params, *[t for st in opt.state.values() for t in st.values()
                                          if isinstance(t, torch.Tensor)], *[b.grad for b in opt._buckets]])
    extra = dict(peak_rss_added_mb=added / 2**20, held_mb=held / 2**20,
                 peak_rss_added_pct_of_held=100 * added / held,
                 deepspeed=None if cls is not None else why,
                 torch_triad_gbps=harness.measure_bandwidth(torch.device("cpu")).triad_gbps)
    report("a_step_fp32", "(a) AdamW step alone, fp32 params and state", rows, "torch AdamW fused",
           "fastaccum cpu", "stream bound (read 4, write 3)", benchmark, extra)
    _bench_ours(benchmark, rows[0])


def test_d_step_bf16_state(benchmark):
    """(d) state_dtype=bf16 step vs torch fused (fp32 state)."""
    params = make_params(torch.float32)
    grads = make_grads(params, 1)
    rows = [fastaccum_step_row("fastaccum cpu, bf16 moments", params, grads, state_dtype=torch.bfloat16)]
    rows[0].bytes_per_param = 20
    rows.append(torch_step_row("torch AdamW fused", clone_params(params), grads, fused=True))
    rows[-1].bytes_per_param = 28
    rows += stream_rows((3,))
    time_interleaved(rows)
    report("d_step_bf16_state", "(d) AdamW step, state_dtype=bf16 (fastaccum) vs fp32 state (torch)", rows,
           "torch AdamW fused", "fastaccum cpu, bf16 moments", "stream bound (read 4, write 3)", benchmark)
    _bench_ours(benchmark, rows[0])


# ----------------------------------------------------------------------------------
# step stage: dynamic loss scale + clip + zeroing


def test_b_step_stage(benchmark):
    """(b) the step stage with dynamic loss scaling, clipping and zeroing, fp32 params."""
    params = make_params(torch.float32)
    grads = make_grads(params, 1)
    opt = fastaccum.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend="cpu",
                          loss_scale="dynamic", max_grad_norm=MAX_NORM)

    def fa_prepare():
        opt.backward(harness.simulated_loss(params, grads))  # grads x loss scale, into the buffer

    def fa_run():
        opt.step()
        opt.zero_grad()

    tparams = clone_params(params)
    topt = torch.optim.AdamW(tparams, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    scaler = torch.amp.GradScaler("cpu")

    def t_prepare():
        scaler.scale(harness.simulated_loss(tparams, grads)).backward()

    def t_run():
        scaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_(tparams, MAX_NORM)
        scaler.step(topt)
        scaler.update()
        topt.zero_grad()

    rows = [
        Row("fastaccum cpu (norm pass + fused step)", fa_run, fa_prepare, 32,
            "opt.step(); opt.zero_grad()  [loss_scale='dynamic', max_grad_norm=1]"),
        Row("torch recipe, fused AdamW", t_run, t_prepare, 48,
            "unscale_, clip_grad_norm_, scaler.step, update, zero_grad"),
    ]
    rows += stream_rows((4,))
    time_interleaved(rows)
    report("b_step_stage", "(b) step stage: dynamic loss scale + clip + zeroing, fp32", rows,
           "torch recipe, fused AdamW", "fastaccum cpu (norm pass + fused step)", "stream bound (read 4, write 4)",
           benchmark)
    _bench_ours(benchmark, rows[0])


# ----------------------------------------------------------------------------------
# full cycle: 8 micro-batches + step stage


def test_c_full_cycle_bf16(benchmark):
    """(c) 8 micro-batch accumulations + the step stage: fastaccum on bf16 params (fp32
    buffer and master weights) vs the torch recipe on fp32 params."""
    p32 = make_params(torch.float32)
    params = clone_params(p32, torch.bfloat16)
    gsets = [make_grads(params, s, torch.bfloat16) for s in (1, 2)]
    fa_run = fastaccum_window(params, gsets, ACCUM)

    gsets32 = [[g.float() for g in gs] for gs in gsets]
    t_run = torch_recipe_window(p32, gsets32, ACCUM)

    # produce: read g_micro + write the fresh gradient (4 per micro-batch for bf16); fastaccum
    # bf16: the first micro-batch overwrites the stale buffer (2 + 4), the others add (10),
    # norm (4), step 32 (30 + the bf16 param write's read-for-ownership);
    # torch fp32: 8 x 8 + 7 x 12 + 20 + 28
    rows = [
        Row("fastaccum cpu, bf16 params", fa_run, bytes_per_param=ACCUM * 4 + 6 + (ACCUM - 1) * 10 + 4 + 32,
            note="8 x opt.backward/step/zero_grad, loss_scale='dynamic', max_grad_norm=1"),
        Row("torch recipe, fp32 params", t_run, bytes_per_param=ACCUM * 8 + (ACCUM - 1) * 12 + 20 + 28,
            note="8 x scaler.scale(loss/8).backward + unscale_, clip, step, update, zero_grad"),
    ]
    rows += stream_rows((4,))
    time_interleaved(rows, rounds=max(2, ROUNDS - 2))
    report("c_cycle_bf16", f"(c) full cycle: {ACCUM} micro-batches + step stage", rows,
           "torch recipe, fp32 params", "fastaccum cpu, bf16 params", "stream bound (read 4, write 4)", benchmark)
    _bench_ours(benchmark, rows[0])


# ----------------------------------------------------------------------------------
# kernels alone


def test_kernels_gbps(benchmark):
    """Each kernel alone over one flat buffer, with its bytes/param and % of the bound."""
    n = N_PARAMS
    buf = torch.zeros(n)
    g32 = torch.randn(n) * 1e-3
    g16 = g32.to(torch.bfloat16)
    cpu = get_backend("cpu")
    rows = [
        Row("accumulate fp32 -> fp32 buffer", lambda: cpu.accumulate_(buf, g32, 1.0), bytes_per_param=12),
        Row("accumulate bf16 -> fp32 buffer", lambda: cpu.accumulate_(buf, g16, 1.0), bytes_per_param=10),
        Row("accumulate bf16 + sum of squares", lambda: cpu.accumulate_(buf, g16, 1.0, return_sumsq=True),
            bytes_per_param=10),
        Row("grad_norm (norm + inf/nan check)", lambda: cpu.grad_norm(buf), bytes_per_param=4),
        Row("accumulate fp32 + sum of squares of the result", lambda: cpu.accumulate_(buf, g32, 0.0, result_sumsq=True),
            bytes_per_param=12),
        Row("torch: buf.add_(bf16 grad)", lambda: buf.add_(g16), bytes_per_param=10),
        Row("torch: vector_norm", lambda: torch.linalg.vector_norm(buf), bytes_per_param=4),
    ]
    rows += stream_rows((4,))
    # a read-only pass (the norm) is bound by the read-only stream, not the read/write one
    rows.append(Row("stream bound (read 1, write 0)", lambda: _C.stream([buf.data_ptr()], 0, n, torch.get_num_threads()),
                    bytes_per_param=4))
    time_interleaved(rows)
    norm_gbps = 4 * n / next(r for r in rows if r.name.startswith("grad_norm")).median / 1e9
    read_gbps = 4 * n / rows[-1].median / 1e9
    print(f"grad_norm at {100 * norm_gbps / read_gbps:.1f} % of the read-only streaming bound ({read_gbps:.1f} GB/s)")
    report("kernels", "kernels alone", rows, "torch: buf.add_(bf16 grad)", "accumulate bf16 -> fp32 buffer",
           "stream bound (read 4, write 4)", benchmark)
    _bench_ours(benchmark, rows[1])


# ----------------------------------------------------------------------------------
# user-assigned gradients, the fp32 window with the fused norm, the fixed cost of a step


def test_e_step_user_grads(benchmark):
    """(e) step with gradients assigned to p.grad by the user (functional training,
    torch.autograd.grad): read in place by the kernel, no copy into the buffer."""
    params = make_params(torch.float32)
    grads = make_grads(params, 1)
    opt = fastaccum.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend="cpu")

    def assign(ps):
        for p, g in zip(ps, grads):
            p.grad = g

    rows = [
        Row("fastaccum cpu, p.grad assigned", opt.step, lambda: assign(params), 28,
            "p.grad = g; opt.step() (g read in place)"),
        fastaccum_step_row("fastaccum cpu, autograd gradients", clone_params(params), grads),
        torch_step_row("torch AdamW fused", clone_params(params), grads, fused=True),
    ]
    rows[1].bytes_per_param = rows[2].bytes_per_param = 28
    rows += stream_rows((3,))
    time_interleaved(rows)
    report("e_step_user_grads", "(e) AdamW step, p.grad assigned by the user, fp32", rows, "torch AdamW fused",
           "fastaccum cpu, p.grad assigned", "stream bound (read 4, write 3)", benchmark)
    _bench_ours(benchmark, rows[0])


def test_f_window_fp32(benchmark):
    """(f) a whole fp32 window: 4 micro-batches + dynamic loss scale + clip + step, against
    GradScaler + clip_grad_norm_ + fused AdamW. fastaccum's last fold returns the norm, so its
    step stage moves 28 B/param (torch: unscale 8 + norm 4 + clip 8 + step 28)."""
    accum = 4
    params = make_params(torch.float32)
    gsets = [make_grads(params, s) for s in (1, 2)]
    fa_run = fastaccum_window(params, gsets, accum)

    tparams = clone_params(params)
    t_run = torch_recipe_window(tparams, gsets, accum)

    # produce 8/micro-batch for both; fastaccum: copy into the stale buffer (4 + 4), adds
    # (12 each), the last one with the norm, step 28; torch: adds 12, step stage 48
    rows = [
        Row("fastaccum cpu window", fa_run, bytes_per_param=accum * 8 + 8 + (accum - 1) * 12 + 28,
            note=f"{accum} x opt.backward/step/zero_grad, loss_scale='dynamic', max_grad_norm=1"),
        Row("torch recipe window", t_run, bytes_per_param=accum * 8 + (accum - 1) * 12 + 48,
            note=f"{accum} x scaler.scale(loss/{accum}).backward + unscale_, clip, step, update, zero_grad"),
    ]
    rows += stream_rows((4,))
    time_interleaved(rows, rounds=max(3, ROUNDS - 2))
    report("f_window_fp32", f"(f) fp32 window: {accum} micro-batches + dynamic scale + clip + step", rows,
           "torch recipe window", "fastaccum cpu window", "stream bound (read 4, write 4)", benchmark)
    _bench_ours(benchmark, rows[0])


def test_g_fixed_cost(benchmark):
    """(g) the fixed cost of a step: 72 tensors of 16 elements (the update itself is ~nothing),
    and the kernel call alone on the same tensors, right after a backward like the step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(16, generator=gen).requires_grad_() for _ in range(72)]
    grads = make_grads(params, 1)
    opt = fastaccum.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, backend="cpu")
    tp = clone_params(params)
    topt = torch.optim.AdamW(tp, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    backward = lambda: harness.simulated_loss(params, grads).backward()  # noqa: E731
    for _ in range(3):
        backward()
        opt.step()
    segs = opt._segs_cache[id(opt._buckets[0])][2]
    job = segs._cpu_plan[1][0][1]
    counts = opt._buckets[0].steps.data_ptr()  # the job counts the steps, as in opt.step()

    def kernel():
        job.run_counted(counts, LR, BETAS[0], BETAS[1], EPS, WD, True, False, 1.0, False, 0, torch.get_num_threads())

    def t_prepare():
        for p, g in zip(tp, grads):
            p.grad = g

    rows = [
        Row("fastaccum cpu step, 72 x 16", opt.step, backward),
        Row("kernel call alone, 72 x 16", kernel, backward),
        Row("torch AdamW fused step, 72 x 16", topt.step, t_prepare),
    ]
    time_interleaved(rows, rounds=max(200, ROUNDS), warmup=5)
    fixed_us = (rows[0].median - rows[1].median) * 1e6
    print(f"fixed cost of a 72-tensor step: {fixed_us:.1f} us (step {rows[0].median * 1e6:.1f} us - kernel "
          f"{rows[1].median * 1e6:.1f} us); torch fused step {rows[2].median * 1e6:.1f} us")
    report("g_fixed_cost", "(g) fixed cost of a 72-tensor step", rows, "torch AdamW fused step, 72 x 16",
           "fastaccum cpu step, 72 x 16", None, benchmark, dict(fixed_cost_us=fixed_us))
    _bench_ours(benchmark, rows[0])
