"""Contiguous runs of global positions: the unit every attention kernel call works on.

Kernels (Triton's and PyTorch's fused CPU one) take one global offset per side, so positions
that are not one contiguous range (a zigzag shard holds two chunks) are split into runs, and
each (q run, kv run) pair is one call.
"""
from __future__ import annotations

from torch import Tensor

Run = tuple[int, int, int]  # (local start, length, global start of the run)


def runs_of(positions: Tensor | None, length: int) -> list[Run]:
    """Split global positions into maximal contiguous runs (all of 0..length-1 when None)."""
    if positions is None:
        return [(0, length, 0)]
    positions = positions.cpu()
    breaks = (positions[1:] - positions[:-1] != 1).nonzero().flatten().add(1).tolist()
    starts, stops = [0] + breaks, breaks + [length]
    return [(a, b - a, int(positions[a])) for a, b in zip(starts, stops)]
