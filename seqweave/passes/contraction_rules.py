"""`shard-sequence` rules for matrix products (mm, addmm, bmm).

A product keeps the sequence where one operand's free dim holds it (rows of `x @ W`), and
contracting over it leaves each rank a partial sum (a weight gradient `xᵀ @ dy`). A whole
operand meeting a sharded one is sliced to this rank's positions first: every rank holds it
whole, so that costs nothing. Padding rows are zeroed in one operand of a contraction so a
partial sum counts only real positions.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqweave.ir.graph import Node, Value
from seqweave.passes.padding_rows import without_padding
from seqweave.passes.sharding_context import PARTIAL, Context, Emit, Seq, Unshardable, as_sharded


def _contract(ctx: Context, left: Value, right: Value, left_dim: int, right_dim: int) -> tuple[Value, Value]:
    """Operands for a product contracting over the sequence (left's `left_dim` with right's `right_dim`)."""
    seq = ctx.seq(left) or ctx.seq(right)
    left = as_sharded(ctx, left, Seq(left_dim, seq.inner))
    right = as_sharded(ctx, right, Seq(right_dim, seq.inner))
    return without_padding(ctx, left), right


@dataclass(frozen=True)
class Product:
    """Where a matrix product's dims sit: left [*batch, rows, K] @ right [*batch, K, cols]."""

    rows: int        # left's free dim (the result's rows sit there too)
    cols: int        # right's free dim (and the result's)
    batch: bool      # dim 0 of both and of the result is a batch (bmm)

    def rule(self, ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
        """Batch of both, rows of left, columns of right, or a partial sum over K."""
        left, right = args[0], args[1]
        ls, rs = ctx.seq(left), ctx.seq(right)
        if ls is None and rs is None:
            return node.op, args, kwargs, [None]
        if (ls and ls.dim == self.rows + 1) or (rs and rs.dim == self.cols - 1):
            return node.op, _contract(ctx, left, right, self.rows + 1, self.cols - 1), kwargs, [PARTIAL]
        if self.batch and ((ls and ls.dim == 0) or (rs and rs.dim == 0)):
            seq = ls if ls and ls.dim == 0 else rs
            return node.op, (as_sharded(ctx, left, seq), as_sharded(ctx, right, seq)), kwargs, [seq]
        if ls and rs:
            raise Unshardable(f"{node.op} of two sequence-sharded operands is an N x N product")
        return node.op, args, kwargs, [ls or Seq(self.cols, rs.inner)]


def addmm(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """addmm(bias, a, b): rows of a (a row-sized bias is sliced with them)."""
    bias, left, right = args[:3]
    ls = ctx.seq(left)
    if ls is None and ctx.seq(right) is None and ctx.seq(bias) is None:
        return node.op, args, kwargs, [None]
    if ls is None or ls.dim != 0 or ctx.seq(right) is not None:
        raise Unshardable(f"{node.op} contracts over the sequence (with a bias)")
    if len(ctx.global_shape(bias)) == 2 and ctx.global_shape(bias)[0] != 1:
        bias = as_sharded(ctx, bias, ls)
    return node.op, (bias, left, right, *args[3:]), kwargs, [ls]


CONTRACTION_RULES = {"core.mm": Product(rows=0, cols=1, batch=False).rule, "core.addmm": addmm,
                     "core.bmm": Product(rows=1, cols=2, batch=True).rule}
