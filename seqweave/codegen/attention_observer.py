"""Look at the q and k each compiled attention scores (after its rotary), for calibration.

`with observe_attention() as seen: compiled(...)` collects an `Observed` per attention call
of the graphs lowered by this process; nothing is recorded, and nothing costs, outside it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from torch import Tensor

from seqweave.ir.mask import MaskSpec


@dataclass
class Observed:
    """One attention call: its layer index, rotated q [B, Hq, Sq, D] and k, mask and operands."""

    layer: int
    q: Tensor
    k: Tensor
    mask: MaskSpec
    operands: Sequence[Tensor]


_OBSERVERS: list[list[Observed]] = []


@contextlib.contextmanager
def observe_attention() -> Iterator[list[Observed]]:
    seen: list[Observed] = []
    _OBSERVERS.append(seen)
    try:
        yield seen
    finally:
        _OBSERVERS.remove(seen)


def observed(layer: int, attend: Callable, operands: Sequence[Tensor]) -> Callable:
    """`attend(q, k, v, mask)` that first shows the call to every active observer."""
    def run(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec):
        for seen in _OBSERVERS:
            seen.append(Observed(layer, q.detach(), k.detach(), mask, operands))
        return attend(q, k, v, mask)
    return run
