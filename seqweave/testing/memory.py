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
