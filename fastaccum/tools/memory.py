"""Memory probes shared by ``fastaccum bench`` and ``fastaccum plan --measure``.

Peak memory added by a piece of code: CUDA allocator statistics on a GPU, peak RSS
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU. Also the bytes held
by a set of tensors and the free memory of a device.
"""
from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor


def _proc_status() -> Dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def current_rss() -> Optional[int]:
    """Resident set size of this process in bytes (Linux /proc), or None elsewhere."""
    return _proc_status().get("VmRSS")


def peak_rss() -> int:
    """Peak RSS since :func:`reset_peak_rss` (Linux), else the process-lifetime peak."""
    hwm = _proc_status().get("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # ru_maxrss: KiB on Linux, bytes on macOS

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``clear_refs`` 5); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory(full_gc: bool = False) -> None:
    """Give freed heap memory back to the OS so RSS baselines are not inflated by earlier rows.

    glibc keeps freed chunks below its (dynamic) mmap threshold in the heap; ``malloc_trim``
    returns them. It changes no allocation behaviour of the code being measured. A full
    ``gc.collect()`` costs ~0.2 s with torch loaded, so by default only the young generations.
    """
    gc.collect() if full_gc else gc.collect(1)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class MemoryProbe:
    """Peak memory added between :meth:`start` and :meth:`stop`: CUDA allocator stats, else peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()
            self.base = current_rss() or 0
            reset_peak_rss()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        return max(0, peak_rss() - self.base)


def held_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views into one flat buffer count once)."""
    seen: Dict[Tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.numel() > 0:
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def available_memory(default: int = 8 * 1024**3) -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (Linux), else ``default``."""
    found = meminfo_available()
    return default if found is None else found


def meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_free_memory(device: Any) -> Tuple[Optional[int], str]:
    """Free memory of ``device``: CUDA ``mem_get_info``; CPU ``MemAvailable`` of /proc/meminfo
    (None when it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device} (torch.cuda.mem_get_info)"
    return meminfo_available(), "MemAvailable of /proc/meminfo"
