"""Peak memory of one step on CPU: the process's resident-set high-water mark above where it started.

CPU tensors have no allocator statistics, so we ask Linux: writing 5 to /proc/self/clear_refs
resets the peak resident set (VmHWM) to the current one (VmRSS); after the step VmHWM − the
starting VmRSS is what the step added at its peak. Large tensors are mmap-ed and returned on
free, so this follows tensors closely; it is the memory the operating system had to give.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{STATUS} has no {field} (peak memory needs Linux)")


def supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.path.exists(STATUS)


@dataclass
class StepPeak:
    baseline_bytes: int = 0
    peak_bytes: int = 0  # above the baseline


@contextmanager
def step_peak() -> Iterator[StepPeak]:
    """Measure the peak resident memory the body adds (bytes), for `with step_peak() as peak:`."""
    gc.collect()
    result = StepPeak(baseline_bytes=_status_kib("VmRSS") * 1024)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    yield result
    result.peak_bytes = max(0, _status_kib("VmHWM") * 1024 - result.baseline_bytes)


class LargestAllocation:
    """`with LargestAllocation() as watch:` records `watch.largest`, the element count of the
    biggest tensor any op produced in the body (a TorchDispatchMode: it sees every ATen op)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for value in out if isinstance(out, (tuple, list)) else [out]:
                    if hasattr(value, "numel"):
                        watch.largest = max(watch.largest, value.numel())
                return out

        self.largest = 0
        self._mode = _Mode()

    def __enter__(self) -> "LargestAllocation":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
