"""Which fused-kernel calls one (q run, kv run) attention becomes: the CPU flash plan.

PyTorch's fused CPU flash kernel knows two masks by itself (none, and top-left causal) and
otherwise takes a dense additive mask over everything it is given. So the queries are split
into blocks of BLOCK_Q rows, the mask's tile classes (`tile_grid`'s whole-grid rules, EMPTY /
FULL / PARTIAL over BLOCK_Q x TILE_KV tiles) say which keys each block can see, and each block
becomes a few *pieces*, one kernel call each:

- a run of FULL tiles: no mask at all;
- a run of PARTIAL tiles (short FULL / EMPTY runs between them folded in): the mask is
  evaluated on that [q block, key run] only, and the call gets no mask (all visible), is
  skipped (none visible), gets `is_causal=True` (the run is exactly the top-left causal
  triangle) or gets that small dense mask;
- EMPTY runs: no call.

When every block's pieces add up to one whole-call shape (every query sees the same keys, or
the whole call is exactly causal at aligned positions) the plan is that single call, so the
kernel's own causal skipping and threading run over the whole sequence. No mask larger than
one [BLOCK_Q, key run] piece is ever built.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from seqweave.codegen.triton.schedule import OperandSchedules, tile_classes_per_tile
from seqweave.codegen.triton.tile_grid import EMPTY, FULL, PARTIAL, Blocks, make_blocks, tile_grid
from seqweave.ir.mask import Causal, MaskSpec

BLOCK_Q = 512  # rows per block; on 2 cores, 256-row calls ran ~30% slower than 512, 1024 no faster overall
TILE_KV = 128  # key granularity of the visibility spans
MIN_SPLIT = 1024  # a FULL / EMPTY run shorter than this (keys) stays inside its PARTIAL neighbour's call
PLANS_KEPT = 8  # memoised plans; one holds a plan's dense masks (a few MB at 8k tokens)

NO_MASK, CAUSAL, MASKED = "none", "causal", "masked"
_operand_plans = OperandSchedules(capacity=PLANS_KEPT)  # data-dependent plans, while their operands are unchanged


@dataclass(frozen=True)
class Piece:
    """One kernel call: local query rows [q0, q1) x local keys [k0, k1) and how they are masked.

    `bias` is the additive float mask ([b, h, Q, K], b / h possibly 1) when kind is MASKED;
    `hidden` ([b, h, Q] bool) marks rows that see no key in this piece, or is None when every
    row sees one (the kernel returns lse 0 for such rows, the contract wants -inf).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: str
    bias: Tensor | None = None
    hidden: Tensor | None = None


@dataclass(frozen=True)
class Span:
    """The global positions of one (q run, kv run) pair: row i of a side is at start + stride * i
    (stride 1 for contiguous runs, P for a striped shard of P ranks)."""

    q_len: int
    kv_len: int
    q_start: int
    kv_start: int
    q_stride: int = 1
    kv_stride: int = 1

    def blocks(self) -> Blocks:
        """The plan's [BLOCK_Q x TILE_KV] tiles as global position bounds."""
        return make_blocks(self.q_len, self.kv_len, BLOCK_Q, TILE_KV, self.q_start, self.kv_start,
                           self.q_stride, self.kv_stride)

    def q_positions(self, first: int, stop: int, device: torch.device | None = None) -> Tensor:
        """Global positions of local rows [first, stop)."""
        return self.q_start + self.q_stride * torch.arange(first, stop, device=device)

    def kv_positions(self, first: int, stop: int, device: torch.device | None = None) -> Tensor:
        return self.kv_start + self.kv_stride * torch.arange(first, stop, device=device)


def plan(mask: MaskSpec, span: Span, operands: Sequence[Tensor], dtype: torch.dtype) -> list[Piece]:
    """The kernel calls that compute this attention exactly, in query-block order (memoised)."""
    if span.q_len == 0 or span.kv_len == 0:
        return []
    sizes = (BLOCK_Q, TILE_KV, MIN_SPLIT)  # in the keys, so a test that changes them gets fresh plans
    if not mask.is_data_dependent():
        return _structured_plan(mask, span, dtype, sizes)
    key = ("cpu_flash", str(mask), span, dtype, sizes)
    return _operand_plans.get(key, operands, lambda: _build(mask, span, operands, dtype))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=PLANS_KEPT)
def _structured_plan(mask: MaskSpec, span: Span, dtype: torch.dtype, sizes: tuple[int, int, int]) -> list[Piece]:
    """Masks of positions alone: every layer, and the backward, reuse the forward's plan."""
    return _build(mask, span, (), dtype)


def _build(mask: MaskSpec, span: Span, operands: Sequence[Tensor], dtype: torch.dtype) -> list[Piece]:
    grid = tile_classes(mask, span, operands)
    whole = _whole_call(mask, span, operands, grid)
    if whole is not None:
        return whole
    return [p for m, row in enumerate(grid) for p in _block_pieces(mask, span, operands, dtype, row, m * BLOCK_Q)]


def tile_classes(mask: MaskSpec, span: Span, operands: Sequence[Tensor]) -> Tensor:
    """[q blocks, kv tiles] EMPTY / FULL / PARTIAL, exact at ragged ends (tiles are clamped)."""
    shape = (-(-span.q_len // BLOCK_Q), -(-span.kv_len // TILE_KV))
    grid = tile_grid(mask, span.blocks(), operands)
    if grid is None and (span.q_stride, span.kv_stride) != (1, 1):  # block_class takes ranges: evaluate every tile
        grid = torch.tensor(PARTIAL, dtype=torch.int8)
    elif grid is None:  # a mask kind without a whole-grid rule: block_class tile by tile
        grid = tile_classes_per_tile(mask, span.q_len, span.kv_len, BLOCK_Q, TILE_KV, span.q_start,
                                     span.kv_start, operands)
    return torch.broadcast_to(grid, shape)


def _runs(row: Tensor, kv_len: int) -> list[tuple[int, int, int]]:
    """(class, first key, stop key) runs of equal tile classes along one block's row."""
    codes = row.tolist()
    runs, start = [], 0
    for i in range(1, len(codes) + 1):
        if i == len(codes) or codes[i] != codes[start]:
            runs.append((codes[start], start * TILE_KV, min(i * TILE_KV, kv_len)))
            start = i
    return runs


def _fold_short_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Short FULL runs next to a PARTIAL run, and short EMPTY gaps between two runs, become
    PARTIAL, then equal neighbours merge: one slightly larger masked call costs less than an
    extra call and an LSE merge. EMPTY runs at either end are never folded (pure waste)."""
    def folds(i: int) -> bool:
        cls, k0, k1 = runs[i]
        neighbours = [runs[j][0] for j in (i - 1, i + 1) if 0 <= j < len(runs)]
        if cls == EMPTY:
            return len(neighbours) == 2 and k1 - k0 < MIN_SPLIT and PARTIAL in neighbours
        return cls == FULL and k1 - k0 < MIN_SPLIT and PARTIAL in neighbours
    marked = [(PARTIAL if folds(i) else c, k0, k1) for i, (c, k0, k1) in enumerate(runs)]
    merged: list[tuple[int, int, int]] = []
    for cls, k0, k1 in marked:
        if merged and merged[-1][0] == cls:
            merged[-1] = (cls, merged[-1][1], k1)
        else:
            merged.append((cls, k0, k1))
    return merged


def _block_pieces(mask: MaskSpec, span: Span, operands: Sequence[Tensor], dtype: torch.dtype,
                  row: Tensor, q0: int) -> list[Piece]:
    """The pieces of the query block starting at local row q0."""
    q1 = min(q0 + BLOCK_Q, span.q_len)
    pieces = []
    for cls, k0, k1 in _fold_short_runs(_runs(row, span.kv_len)):
        if cls == FULL:
            pieces.append(Piece(q0, q1, k0, k1, NO_MASK))
        elif cls == PARTIAL:
            piece = _evaluated(mask, span, operands, dtype, (q0, q1, k0, k1))
            pieces += [piece] if piece is not None else []
    return pieces


def _evaluated(mask: MaskSpec, span: Span, operands: Sequence[Tensor], dtype: torch.dtype,
               box: tuple[int, int, int, int]) -> Piece | None:
    """A PARTIAL run as the cheapest exact call, from the mask evaluated on it (None: nothing visible)."""
    allowed = _allowed(mask, span, operands, box)
    if not bool(allowed.any()):
        return None
    if bool(allowed.all()):
        return Piece(*box, NO_MASK)
    if _triangle(allowed):
        return Piece(*box, CAUSAL)
    seen = allowed.any(-1)
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return Piece(*box, MASKED, bias, None if bool(seen.all()) else ~seen)


def _whole_call(mask: MaskSpec, span: Span, operands: Sequence[Tensor], grid: Tensor) -> list[Piece] | None:
    """One call for everything, when the tile classes allow it (see the module docstring)."""
    if bool((grid == EMPTY).all()):
        return []
    seen = (grid != EMPTY).any(0)
    if bool(((grid == FULL) == seen).all()):  # every block sees the same keys, all of them FULL
        first, last = (int(i) for i in seen.nonzero()[[0, -1], 0])
        return [Piece(0, span.q_len, first * TILE_KV, min((last + 1) * TILE_KV, span.kv_len), NO_MASK)]
    if _is_causal(mask, span, operands, grid):
        return [Piece(0, span.q_len, 0, span.kv_len, CAUSAL)]
    return None


def _is_causal(mask: MaskSpec, span: Span, operands: Sequence[Tensor], grid: Tensor) -> bool:
    """True when the mask is exactly top-left causal over the whole call: aligned positions, the
    causal tile classes, and each block's diagonal tiles evaluate to the causal triangle."""
    aligned = (span.q_start, span.q_stride) == (span.kv_start, span.kv_stride)
    if not aligned or not torch.equal(grid, torch.broadcast_to(tile_grid(Causal(), span.blocks(), ()), grid.shape)):
        return False
    for m, row in enumerate(grid):
        partial = (row == PARTIAL).nonzero().flatten()
        if not len(partial):  # FULL / EMPTY tiles are exact, and these are causal's
            continue
        q0, q1 = m * BLOCK_Q, min((m + 1) * BLOCK_Q, span.q_len)
        k0, k1 = int(partial[0]) * TILE_KV, min((int(partial[-1]) + 1) * TILE_KV, span.kv_len)
        if not _triangle(_allowed(mask, span, operands, (q0, q1, k0, k1)), q0 - k0):
            return False
    return True


def _allowed(mask: MaskSpec, span: Span, operands: Sequence[Tensor], box: tuple[int, int, int, int]) -> Tensor:
    """The mask evaluated on local rows [q0, q1) x keys [k0, k1), on the host."""
    q0, q1, k0, k1 = box
    device = operands[0].device if operands else None
    return mask.evaluate(span.q_positions(q0, q1, device), span.kv_positions(k0, k1, device), operands).cpu()


def _triangle(allowed: Tensor, diagonal: int = 0) -> bool:
    """allowed is the kernel's top-left causal mask (row i sees exactly keys 0..i), shifted right
    by `diagonal` keys when the box starts that many keys before its first row."""
    q, k = allowed.shape[-2:]
    return bool((allowed == torch.ones(q, k, dtype=torch.bool).tril(diagonal)).all())
