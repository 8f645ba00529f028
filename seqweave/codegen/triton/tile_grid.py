"""Tile classes for a whole grid at once: `MaskSpec.block_class`'s interval rules as tensor ops.

Calling `block_class` tile by tile costs a Python call per tile (130k tiles for a 32k causal
forward), and for document masks a handful of tensor ops per tile: seconds per call, which
training with packed documents cannot afford. These rules compute the same classes for every
tile in one pass, one rule per mask kind (And / Or combine their parts' grids). Each rule agrees
with `block_class` exactly, except `document`, whose rule looks at each block's smallest and
largest id: exact for packed (non-decreasing) ids, PARTIAL where it cannot tell otherwise, and
never EMPTY or FULL where `block_class` would disagree. Kinds without a rule return None and
the caller falls back to per-tile classification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from seqweave.ir.mask import And, Causal, Chunked, Document, Full, MaskSpec, Or, Padding, Sinks, SlidingWindow

EMPTY, FULL, PARTIAL = 0, 1, 2


@dataclass(frozen=True)
class Blocks:
    """Global [first, last] positions of each q block (column vectors) and kv block (row vectors)."""

    q_first: Tensor  # [M, 1]
    q_last: Tensor
    kv_first: Tensor  # [1, N]
    kv_last: Tensor


def make_blocks(q_len: int, kv_len: int, block_m: int, block_n: int, q_offset: int, kv_offset: int,
                q_stride: int = 1, kv_stride: int = 1) -> Blocks:
    """Blocks of positions offset + stride * i. With a stride above 1 a block holds only some of
    the positions in [first, last]; every rule here stays sound on it (EMPTY and FULL verdicts on
    an interval hold for every subset of it), it may only say PARTIAL where a finer look would not."""
    def bounds(length: int, block: int, offset: int, stride: int) -> tuple[Tensor, Tensor]:
        first = torch.arange(0, length, block)
        return offset + stride * first, offset + stride * (torch.clamp(first + block, max=length) - 1)
    q_first, q_last = bounds(q_len, block_m, q_offset, q_stride)
    kv_first, kv_last = bounds(kv_len, block_n, kv_offset, kv_stride)
    return Blocks(q_first[:, None], q_last[:, None], kv_first[None, :], kv_last[None, :])


def _classes(all_true: Tensor, all_false: Tensor) -> Tensor:
    return torch.where(all_false, EMPTY, torch.where(all_true, FULL, PARTIAL)).to(torch.int8)


def _causal(mask: Causal, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    return _classes(b.kv_last <= b.q_first, b.kv_first > b.q_last)


def _window(mask: SlidingWindow, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    lo, hi = b.kv_first - b.q_last, b.kv_last - b.q_first  # every value of kv - q in the tile
    return _classes((lo >= -mask.left) & (hi <= mask.right), (hi < -mask.left) | (lo > mask.right))


def _sinks(mask: Sinks, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    rows = torch.zeros_like(b.q_first, dtype=torch.bool)
    return _classes(rows | (b.kv_last < mask.n), rows | (b.kv_first >= mask.n))


def _chunked(mask: Chunked, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    q_lo, q_hi = b.q_first // mask.size, b.q_last // mask.size
    kv_lo, kv_hi = b.kv_first // mask.size, b.kv_last // mask.size
    return _classes((q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo), (q_hi < kv_lo) | (kv_hi < q_lo))


def _full(mask: Full, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    return torch.full(torch.broadcast_shapes(b.q_first.shape, b.kv_first.shape), FULL, dtype=torch.int8)


def _block_reduce(values: Tensor, first: Tensor, last: Tensor, reduce: Callable) -> Tensor:
    """reduce(values[:, first_i:last_i + 1]) per block i, for [B, S] values -> [B, num_blocks]."""
    if int(last.max()) >= values.shape[1]:
        raise ValueError(f"the mask operand covers positions 0..{values.shape[1] - 1} but attention reaches "
                         f"position {int(last.max())}; pass operands over the whole (global) sequence")
    return torch.stack([reduce(values[:, int(f):int(l) + 1], dim=1) for f, l in zip(first.flatten(), last.flatten())], 1)


def _document(mask: Document, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    ids = operands[mask.operand]
    amin = lambda x, dim: x.amin(dim)  # noqa: E731
    amax = lambda x, dim: x.amax(dim)  # noqa: E731
    q_min, q_max = (_block_reduce(ids, b.q_first, b.q_last, r)[:, :, None] for r in (amin, amax))
    kv_min, kv_max = (_block_reduce(ids, b.kv_first, b.kv_last, r)[:, None, :] for r in (amin, amax))
    one_document = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
    disjoint = (q_max < kv_min) | (kv_max < q_min)
    return _classes(one_document.all(0), disjoint.all(0))


def _padding(mask: Padding, b: Blocks, operands: Sequence[Tensor]) -> Tensor:
    valid = operands[mask.operand]
    valid = valid if valid.dtype == torch.bool else valid != 0
    all_valid = _block_reduce(valid, b.kv_first, b.kv_last, torch.all).all(0)[None, :]
    none_valid = ~_block_reduce(valid, b.kv_first, b.kv_last, torch.any).any(0)[None, :]
    rows = torch.zeros_like(b.q_first, dtype=torch.bool)
    return _classes(rows | all_valid, rows | none_valid)


def _and(mask: And, b: Blocks, operands: Sequence[Tensor]) -> Tensor | None:
    parts = [tile_grid(p, b, operands) for p in mask.parts]
    if any(p is None for p in parts):
        return None
    grid = torch.stack(torch.broadcast_tensors(*parts))
    return _classes((grid == FULL).all(0), (grid == EMPTY).any(0))


def _or(mask: Or, b: Blocks, operands: Sequence[Tensor]) -> Tensor | None:
    parts = [tile_grid(p, b, operands) for p in mask.parts]
    if any(p is None for p in parts):
        return None
    grid = torch.stack(torch.broadcast_tensors(*parts))
    return _classes((grid == FULL).any(0), (grid == EMPTY).all(0))


RULES: dict[type, Callable[..., Tensor | None]] = {
    Full: _full, Causal: _causal, SlidingWindow: _window, Sinks: _sinks, Chunked: _chunked,
    Document: _document, Padding: _padding, And: _and, Or: _or}


def tile_grid(mask: MaskSpec, blocks: Blocks, operands: Sequence[Tensor]) -> Tensor | None:
    """[M, N] (or broadcastable) int8 classes of every tile, or None when a part has no rule (dense)."""
    rule = RULES.get(type(mask))
    return None if rule is None else rule(mask, blocks, operands)
