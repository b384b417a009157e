"""Shared fixtures for the pytest-benchmark suites in bench/ (the harness itself is
``fastaccum.tools.bench``, the code ``fastaccum bench`` runs).

Run: ``python -m pytest bench/ --benchmark-only`` (not part of the test suite: ``testpaths``
is ``tests``). Environment:

* ``FASTACCUM_BENCH_QUICK=1``: small sizes (1M, 4M params) for a smoke run in seconds.
* ``FASTACCUM_BENCH_PARAMS=10M,100M``: the sizes of ``test_bench_step.py`` (default 10M,100M).
* ``FASTACCUM_BENCH_THREADS=N``: torch intra-op threads (default: torch's default).
"""
from __future__ import annotations

import os
import pytest
import torch

from fastaccum.tools import bench as harness


@pytest.fixture(scope="session")
def bench_threads() -> int:
    n = int(os.environ.get("FASTACCUM_BENCH_THREADS", "0") or 0)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@pytest.fixture(scope="session")
def stream_bandwidth(bench_threads) -> harness.Bandwidth:
    """The machine's streaming bandwidth with the same threads: best of three samples, since
    one sample on a shared machine can land in a busy moment (STREAM keeps the best too)."""
    samples = [harness.measure_bandwidth(torch.device("cpu")) for _ in range(3)]
    return max(samples, key=lambda b: b.reference_gbps)
