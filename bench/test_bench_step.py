"""One optimizer step (issue 2): fastaccum (every available backend) vs torch.optim.AdamW
foreach and fused, fp32 parameters, ~10M and ~100M parameters. No timing asserts.

    python -m pytest bench/test_bench_step.py --benchmark-only
    FASTACCUM_BENCH_QUICK=1 python -m pytest bench/test_bench_step.py --benchmark-only   # seconds

Each round: untimed ``prepare`` (a backward pass delivers fresh gradients, see
``fastaccum.tools.bench``), then the timed ``opt.step(); opt.zero_grad()``. The parameters
are laid out like GPT blocks (``fastaccum.tools.bench.param_shapes``). ``extra_info`` carries
bytes/param (fastaccum 32: the update also writes g = 0; torch 28: zero_grad frees the
gradient), GB/s from the median, and % of the streaming bandwidth measured in the same
session. Compare rows of one group (same size) only: they ran minutes apart at most, on a
machine that may be shared.
"""
from __future__ import annotations

import pytest
import torch

from fastaccum.tools import bench as harness

CPU = torch.device("cpu")
IMPLS = [f"fastaccum-{b}" for b in harness.fastaccum_backends(CPU)] + ["torch-foreach", "torch-fused"]


@pytest.mark.parametrize("n", harness.env_sizes(), ids=harness.format_count)
@pytest.mark.parametrize("impl", IMPLS)
def test_step_fp32(benchmark, impl, n, stream_bandwidth, bench_threads):
    runner = harness.Runner(impl, n, "fp32", "step", 1, CPU)
    benchmark.group = f"AdamW step, fp32, {harness.format_count(n)} params"
    try:
        benchmark.pedantic(runner.run, setup=runner.prepare, rounds=harness.rounds_for(n), warmup_rounds=2,
                           iterations=1)
        median = benchmark.stats.stats.median
        gbps = runner.bytes_per_param * n / median / 1e9
        benchmark.extra_info.update(
            impl=impl, params=n, n_tensors=len(harness.param_shapes(n)), dtype="fp32", threads=bench_threads,
            bytes_per_param=runner.bytes_per_param, bytes_note=runner.bytes_note,
            gbps=round(gbps, 3), stream_update_gbps=round(stream_bandwidth.update_gbps, 3),
            pct_bandwidth=round(100 * gbps / stream_bandwidth.reference_gbps, 1),
            params_per_s=round(n / median),
        )
    finally:
        runner.close()
        harness.release_free_memory()
