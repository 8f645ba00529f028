"""Backward graphs compiled per set of absent tangents.

When the caller does not differentiate some outputs, aot_autograd's backward receives None
for their tangents (`frontend.dynamo` turns autograd's zero-filling off). The backend
compiles one backward variant per set of absent tangents, on first use: `absent-tangents`
removes what those zeros make trivial, and any absent tangent it cannot remove is fed a
real zero tensor here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from seqweave.ir.graph import Graph


class AbsentTangentDispatch:
    """Runs the backward variant compiled for exactly the set of tangents that are None in this
    call (compiled on first use; in practice every step has the same set)."""

    def __init__(self, variant: Callable[[tuple[int, ...]], Callable[[list], Any]]) -> None:
        self.programs: dict[tuple[int, ...], Callable[[list], Any]] = {}
        self.variant = variant

    def __call__(self, args: list) -> Any:
        absent = tuple(index for index, arg in enumerate(args) if arg is None)
        if absent not in self.programs:
            self.programs[absent] = self.variant(absent)
        return self.programs[absent](args)


def with_zeros(graph: Graph, indices: list[int], args: list) -> list:
    """`args` with the inputs at `indices` (None) replaced by zeros of their (local) type."""
    if not indices:
        return args
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    args, boxed = list(args), args
    boxed.clear()  # the caller's list would hold every saved activation until the backward returns
    for index in indices:
        kind = graph.inputs[index].type
        args[index] = torch.zeros(kind.concrete_shape(), dtype=kind.dtype, device=device)
    return args
