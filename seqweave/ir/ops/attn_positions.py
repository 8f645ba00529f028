"""Attention that carries its positions: rotate q and k, attend, rotate the gradients back.

One implementation for every attention backend: `attend(q, k, v, mask)` and
`attend_backward(dout, q, k, v, out, lse, mask)` are the plain-torch reference, the generated
kernels or a sequence-parallel op. `q_rows` / `kv_rows` are the global positions of the rows
this call holds (None: all of them), so a rank rotates its rows by their true positions.

A spec with a far rotation (`Rope.far`) is attention over two disjoint sets of pairs: the
attention's own mask with the near rotation, `far` with the far one; their (out, lse) merge
exactly as a ring merges key blocks, and the backward of each set, given the merged out and
lse, is that set's share of the gradient.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.ops.attn_reference import merge_partials
from seqweave.ir.positions import NoPositions, PositionSpec, Rope, rotate, rotate_back, rotate_operand

Attend = Callable[[Tensor, Tensor, Tensor, MaskSpec], tuple[Tensor, Tensor]]
AttendBackward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, MaskSpec], tuple[Tensor, Tensor, Tensor]]


def _branches(spec: Rope, mask: MaskSpec) -> list[tuple[MaskSpec, int, int]]:
    """(mask, query position override, key position override) of each set of pairs."""
    near = [(mask, -1, -1)]
    return near if not spec.far else near + [(parse_mask(spec.far), spec.far_q, spec.far_k)]


def _rotated(q: Tensor, k: Tensor, spec: Rope, operands: Sequence[Tensor], q_rows: Tensor | None,
             kv_rows: Tensor | None, q_at: int, k_at: int):
    """q and k rotated, with their tables; one set of tables when both sit at the same positions
    (self-attention without a far rotation: the common case, once per layer and step)."""
    q_rot, q_tables = rotate_operand(q, spec, operands, q_rows, q_at)
    if kv_rows is q_rows and k_at == q_at:
        return q_rot, rotate(k, *q_tables, spec), q_tables, q_tables
    k_rot, k_tables = rotate_operand(k, spec, operands, kv_rows, k_at)
    return q_rot, k_rot, q_tables, k_tables


def positional_forward(attend: Attend, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, spec: PositionSpec,
                       operands: Sequence[Tensor], q_rows: Tensor | None = None,
                       kv_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if isinstance(spec, NoPositions):
        return attend(q, k, v, mask)
    assert isinstance(spec, Rope)
    merged = None
    for branch_mask, q_at, k_at in _branches(spec, mask):
        q_rot, k_rot, _, _ = _rotated(q, k, spec, operands, q_rows, kv_rows, q_at, k_at)
        out, lse = attend(q_rot, k_rot, v, branch_mask)
        merged = (out, lse) if merged is None else merge_partials(*merged, out, lse)
    return merged


def positional_backward(attend_backward: AttendBackward, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                        out: Tensor, lse: Tensor, mask: MaskSpec, spec: PositionSpec, operands: Sequence[Tensor],
                        q_rows: Tensor | None = None, kv_rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(spec, NoPositions):
        return attend_backward(dout, q, k, v, out, lse, mask)
    assert isinstance(spec, Rope)
    total = None
    for branch_mask, q_at, k_at in _branches(spec, mask):
        q_rot, k_rot, q_tables, k_tables = _rotated(q, k, spec, operands, q_rows, kv_rows, q_at, k_at)
        dq_rot, dk_rot, dv = attend_backward(dout, q_rot, k_rot, v, out, lse, branch_mask)
        grads = (rotate_back(dq_rot, *q_tables, spec, q.dtype), rotate_back(dk_rot, *k_tables, spec, k.dtype), dv)
        total = grads if total is None else tuple(a + b for a, b in zip(total, grads))
    return total
