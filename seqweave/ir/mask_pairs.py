"""How many (query, key) pairs a MaskSpec allows over an N x N attention.

Bands (full, causal, sliding windows and their intersections) have a closed form that also
holds for a symbolic N; any other mask is counted exactly for an integer N by splitting the
square with `block_class` until blocks are EMPTY, FULL or small enough to evaluate.
"""
from __future__ import annotations

from fractions import Fraction

import sympy
import torch

from seqweave.ir.mask import And, BlockClass, Causal, Full, MaskSpec, Operands, Or, Range, SlidingWindow

#: The symbolic sequence length (equal to passes.cost.SEQ_LEN: same name, same assumptions).
SEQ_LEN = sympy.Symbol("N", positive=True, integer=True)
LEAF_AREA = 1 << 14        # below this many (q, kv) pairs a PARTIAL block is counted densely

Band = tuple[int | None, int | None]  # allowed kv - q offsets [lo, hi]; None = unbounded


def _band(mask: MaskSpec) -> Band | None:
    """The mask as a diagonal band lo <= kv - q <= hi, or None when it is not one."""
    if isinstance(mask, Full):
        return None, None
    if isinstance(mask, Causal):
        return None, 0
    if isinstance(mask, SlidingWindow):
        return -mask.left, mask.right
    if isinstance(mask, And):
        bands = [_band(part) for part in mask.parts]
        if any(band is None for band in bands):
            return None
        los = [band[0] for band in bands if band[0] is not None]
        his = [band[1] for band in bands if band[1] is not None]
        return (max(los) if los else None), (min(his) if his else None)
    return None


def _diagonal_sum(first: int, last: int | None, n: sympy.Expr) -> sympy.Expr:
    """Σ (n - d) for d = first..last (None: n-1): pairs on diagonals d >= 0 of an n x n square.

    A symbolic n is assumed longer than every finite bound (windows narrower than the sequence).
    """
    top = n - 1 if last is None else (sympy.Min(last, n - 1) if n.is_number else sympy.Integer(last))
    if top.is_number and top < first:
        return sympy.Integer(0)
    count = top - first + 1
    return count * (2 * n - first - top) / 2


def _band_pairs(band: Band, n: sympy.Expr) -> sympy.Expr:
    """Pairs (q, kv) in [0, n)² with lo <= kv - q <= hi."""
    lo, hi = band
    upper = _diagonal_sum(0 if lo is None else max(lo, 0), hi, n)
    lower = _diagonal_sum(1 if hi is None else max(-hi, 1), None if lo is None else -lo, n)
    return sympy.factor(upper + lower)


def _split(q: Range, kv: Range) -> tuple[tuple[Range, Range], tuple[Range, Range]]:
    """Halve the longer side of a block."""
    if q[1] - q[0] >= kv[1] - kv[0]:
        mid = (q[0] + q[1]) // 2
        return ((q[0], mid), kv), ((mid, q[1]), kv)
    mid = (kv[0] + kv[1]) // 2
    return (q, (kv[0], mid)), (q, (mid, kv[1]))


def _counted_pairs(mask: MaskSpec, n: int, operands: Operands | None) -> Fraction:
    """Allowed pairs by quadtree: EMPTY / FULL blocks from block_class, small PARTIAL ones densely.

    Data-dependent masks are averaged over their batch and head dims.
    """
    total, blocks = Fraction(0), [((0, n), (0, n))]
    while blocks:
        q, kv = blocks.pop()
        verdict = mask.block_class(q, kv, operands)
        area = (q[1] - q[0]) * (kv[1] - kv[0])
        if verdict is BlockClass.FULL:
            total += area
        elif verdict is BlockClass.PARTIAL and area <= LEAF_AREA:
            allowed = mask.evaluate(torch.arange(*q), torch.arange(*kv), operands or ())
            total += Fraction(int(allowed.sum()), allowed.shape[0] * allowed.shape[1])
        elif verdict is BlockClass.PARTIAL:
            blocks.extend(_split(q, kv))
    return total


def allowed_pairs(mask: MaskSpec, seq_len: int | sympy.Expr = SEQ_LEN,
                  operands: Operands | None = None) -> sympy.Expr:
    """How many (q, kv) pairs of an N x N attention the mask allows.

    Closed form for bands (full N², causal N(N+1)/2, sliding windows and their intersections),
    symbolic N allowed; any other mask is counted exactly for an integer N (data-dependent
    masks need their `operands`; without them the data parts count as allowing every pair,
    which gives an upper bound).
    """
    if mask.is_data_dependent() and operands is None:
        mask = structural_bound(mask)
    band = _band(mask)
    if band is not None:
        return _band_pairs(band, sympy.sympify(seq_len))
    if not sympy.sympify(seq_len).is_Integer:
        raise ValueError(f"mask {mask} has no closed-form pair count; pass an integer seq_len")
    return sympy.Rational(_counted_pairs(mask, int(seq_len), operands))


def structural_bound(mask: MaskSpec) -> MaskSpec:
    """The mask with every data-dependent part (padding, documents, dense) read as Full:
    it allows a superset of the pairs, so counts from it are upper bounds."""
    if isinstance(mask, And):
        parts = [structural_bound(part) for part in mask.parts]
        kept = [part for part in parts if not isinstance(part, Full)]
        return Full() if not kept else kept[0] if len(kept) == 1 else And(tuple(kept))
    if isinstance(mask, Or):
        parts = [structural_bound(part) for part in mask.parts]
        return Full() if any(isinstance(part, Full) for part in parts) else Or(tuple(parts))
    return Full() if mask.is_data_dependent() else mask
