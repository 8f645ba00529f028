"""Zeroing this rank's padding rows, where a sum over the sequence would otherwise count them.

When N does not split over the ranks the sequence is padded to `ctx.padded`. Attention never
lets a real position see a padding key, but padding rows still flow through the token-wise ops
and hold whatever those compute; any sum over the sequence (a mean-pooled classifier, an MSE
loss, a contraction over tokens) must leave them out.
"""
from __future__ import annotations

from seqweave.ir.graph import Value
from seqweave.passes.sharding_context import Context, Seq


def padding_flags(ctx: Context, seq: Seq, shape: tuple[int, ...]) -> Value | None:
    """bool, True on this rank's padding positions, shaped to broadcast against a value of
    global `shape` holding the sequence as `seq`; None when nothing is padded. The sequence
    dim may hold outer x N x inner elements (a [B*N, D] view holds B sequences)."""
    if ctx.padded == ctx.length:
        return None
    rows = ctx.padded // ctx.world
    outer = shape[seq.dim] // (ctx.length * seq.inner)
    (flags,) = ctx.emit("core.ge.Scalar", (ctx.positions, ctx.length), {}, [None], "", (rows,))
    if (outer, seq.inner) != (1, 1):
        (flags,) = ctx.emit("core.view", (flags, [1, rows, 1]), {}, [None], "", (1, rows, 1))
        (flags,) = ctx.emit("core.expand", (flags, [outer, rows, seq.inner]), {}, [None], "", (outer, rows, seq.inner))
        (flags,) = ctx.emit("core.clone", (flags,), {}, [None], "", (outer, rows, seq.inner))
    flat = [outer * rows * seq.inner] + [1] * (len(shape) - seq.dim - 1)
    return ctx.emit("core.view", (flags, flat), {}, [None], "", tuple(flat))[0]


def without_padding(ctx: Context, value: Value) -> Value:
    """`value` (sharded) with its padding rows set to zero."""
    seq = ctx.seq(value)
    shape = ctx.global_shape(value)
    flags = padding_flags(ctx, seq, shape) if seq is not None else None
    if flags is None:
        return value
    return ctx.emit("core.masked_fill.Scalar", (value, flags, 0), {}, [seq], "", shape)[0]
