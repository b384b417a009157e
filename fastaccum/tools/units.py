"""Counts and sizes as users type them, and as the tools print them.

Counts (``--params 350M``, ``--tokens 0.5M``): k/M/G/B are powers of 1000 (B = billion).
Memory (``--memory 6GB``): ``KB MB GB TB`` and the bare ``K M G T`` are powers of 1000
(``6GB`` = ``6G`` = 6·10⁹ bytes), ``KiB MiB GiB TiB`` powers of 1024 (``6GiB`` = 6·2³⁰ ≈ 6.44·10⁹),
the SI/IEC convention: a bare ``G`` means what ``GB`` means, never ``GiB``.
"""
from __future__ import annotations

import math
import re
from typing import Optional

_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}

MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


class UnitError(ValueError):
    """A count or size that cannot be read; the message says what to write instead."""


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000. Suffixes k/K, m/M, g/G/b/B (billion); underscores allowed."""
    s = str(text).strip().replace("_", "")
    if not s:
        raise UnitError("empty parameter count")
    suffix = s[-1].lower() if s[-1].isalpha() else ""
    number = s[:-1] if suffix else s
    if suffix not in _COUNT_SUFFIX:
        raise UnitError(f"unknown suffix {s[-1]!r} in {text!r}; use k, M or B (e.g. 10M)")
    try:
        value = float(number)
    except ValueError:
        raise UnitError(f"{text!r} is not a number (e.g. 10M, 2.5e6)") from None
    n = value * _COUNT_SUFFIX[suffix]
    if not math.isfinite(n) or n < 1 or n != int(n):
        raise UnitError(f"{text!r} must be a whole number >= 1")
    return int(n)


def format_count(n: float) -> str:
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f}{suf}" if v == int(v) else f"{v:.3g}{suf}"
    return f"{n:.0f}"


def parse_memory(text: str, arg: str = "--memory") -> int:
    """``"6GB"`` = ``"6G"`` -> 6_000_000_000 (SI), ``"6GiB"`` -> 6 * 2**30 (IEC); a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        if str(text).strip().startswith("-"):
            raise UnitError(f"{arg} {text!r}: memory must be > 0 (e.g. 6GB)")
        raise UnitError(f"{arg} {text!r} is not a size; write a number and a unit, e.g. 6GB, 512MiB")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in MEMORY_UNITS:
        raise UnitError(f"{arg} {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB or K, M, G, T "
                        "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    n = int(value * MEMORY_UNITS[unit])
    if n <= 0:
        raise UnitError(f"{arg} {text!r}: memory must be > 0 (e.g. 6GB)")
    return n


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"
