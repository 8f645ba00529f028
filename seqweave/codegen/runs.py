"""Runs of global positions: the unit every attention kernel call works on.

Kernels take one global offset per side, so positions that are not one contiguous range (a
zigzag shard holds two chunks) are split into runs, and each (q run, kv run) pair is one call.
`runs_of` splits into contiguous runs (Triton's kernels). `strided_runs` splits into
arithmetic progressions, so a striped shard (positions r, r+P, r+2P, ...) is one run of
stride P, not one run per position: PyTorch's fused CPU kernel is driven by a plan that
evaluates the mask at the run's real positions, so it can take any positive stride.
"""
from __future__ import annotations

from itertools import accumulate

from torch import Tensor

from seqweave.ir.sharding import contiguous_runs

#: (q run, kv run) pairs one attention call may launch kernels for; beyond it (positions with no
#: stride pattern, or a striped shard under kernels that take contiguous runs only) the blockwise
#: reference costs less than a launch per pair.
MAX_RUN_PAIRS = 64

Run = tuple[int, int, int]  # (local start, length, global start of the run)
StridedRun = tuple[int, int, int, int]  # (local start, length, global start, stride between positions)


def runs_of(positions: Tensor | None, length: int) -> list[Run]:
    """Split global positions into maximal contiguous runs (all of 0..length-1 when None)."""
    if positions is None:
        return [(0, length, 0)]
    runs, local = [], 0
    for start, stop in contiguous_runs(positions.cpu()):
        runs.append((local, stop - start, start))
        local += stop - start
    return runs


def strided_runs(positions: Tensor | None, length: int) -> list[StridedRun]:
    """Split global positions, greedily from the left, into maximal runs with one positive step.

    Work is per run of equal steps (`unique_consecutive`), not per position, so a striped or
    zigzag shard of any length costs a few Python steps. Positions that do not increase end up
    in runs of one.
    """
    if positions is None:
        return [(0, length, 0, 1)]
    values = positions.cpu()
    if length <= 1:
        return [(0, length, int(values[0]), 1)] if length else []
    steps, counts = (t.tolist() for t in values.diff().unique_consecutive(return_counts=True))
    ends = list(accumulate(counts))  # one past each step segment's last step
    runs, start, segment = [], 0, 0
    while start < length:
        while segment < len(ends) and ends[segment] <= start:  # the segment holding step `start`
            segment += 1
        if start == length - 1 or steps[segment] < 1:
            runs.append((start, 1, int(values[start]), 1))
            start += 1
            continue
        stop = ends[segment] + 1  # the run takes every step of this segment from `start` on
        runs.append((start, stop - start, int(values[start]), steps[segment]))
        start = stop  # the step from stop - 1 to stop joins nothing: it is the break
    return runs
