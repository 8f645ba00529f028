"""`shard-sequence` rules for sums over the sequence: reductions and losses.

A sum over the sequence is a partial sum on each rank (all-reduced where a whole value is
needed, once); a mean is that sum divided by the global count, never a mean of per-rank
means. Padding rows are zeroed first. Reductions over other dims keep the shard.
"""
from __future__ import annotations

from seqweave.ir.graph import Node, Value
from seqweave.passes.padding_rows import without_padding
from seqweave.passes.sharding_context import EMITTED, PARTIAL, Context, Emit, Seq, Unshardable, as_sharded

MEAN, SUM = 1, 2  # ATen's loss reductions (0 is "none")


def _count(shape: tuple[int, ...], dims: list[int]) -> int:
    count = 1
    for dim in dims:
        count *= shape[dim]
    return count


def _dims(node: Node, args: tuple, rank: int) -> list[int]:
    """The dims a reduction sums over (all of them for sum / mean without dims)."""
    if node.op in ("core.sum", "core.mean") or len(args) < 2 or args[1] in (None, []):
        return list(range(rank))
    dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return sorted(d % rank for d in dims)


def _divided(ctx: Context, total: Value, count: int, loc: str) -> Value:
    return ctx.emit("core.div.Scalar", (total, count), {}, [PARTIAL], loc, ctx.global_shape(total))[0]


def reduce(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """sum/mean: over other dims the shard stays; over the sequence, a partial (masked) sum."""
    source = args[0]
    seq = ctx.seq(source)
    if seq is None:
        return node.op, args, kwargs, [None]
    shape = ctx.global_shape(source)
    dims = _dims(node, args, len(shape))
    if seq.dim not in dims:
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return node.op, args, kwargs, [Seq(seq.dim if keepdim else seq.dim - sum(d < seq.dim for d in dims), seq.inner)]
    out_shape = tuple(int(d) for d in node.results[0].type.shape)
    summed_op = "core.sum" if node.op in ("core.sum", "core.mean") else "core.sum.dim_IntList"
    (total,) = ctx.emit(summed_op, (without_padding(ctx, source), *args[1:]), kwargs, [PARTIAL], node.loc, out_shape)
    if node.op.startswith("core.sum"):
        return EMITTED, (total,), {}, [PARTIAL]
    return EMITTED, (_divided(ctx, total, _count(shape, dims), node.loc),), {}, [PARTIAL]


def _pair(ctx: Context, node: Node, x: Value, y: Value) -> tuple[Seq, Value, Value]:
    """The sharded one of a loss's (input, target), and both aligned to it."""
    seq = ctx.seq(x) or ctx.seq(y)
    if ctx.global_shape(x) != ctx.global_shape(y):
        raise Unshardable(f"{node.op} of operands of different shapes")
    return seq, as_sharded(ctx, x, seq), as_sharded(ctx, y, seq)


def pointwise_loss(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """mse_loss / l1_loss / smooth_l1_loss / huber_loss (x, y, reduction, ...): with a reduction,
    a summed loss over this rank's real rows, divided by the global count for a mean."""
    x, y, rest = args[0], args[1], args[3:]
    reduction = args[2] if len(args) > 2 else MEAN
    if ctx.seq(x) is None and ctx.seq(y) is None:
        return node.op, args, kwargs, [None]
    seq, x, y = _pair(ctx, node, x, y)
    if reduction not in (MEAN, SUM):
        return node.op, (x, y, reduction, *rest), kwargs, [seq]
    x, y = without_padding(ctx, x), without_padding(ctx, y)
    (total,) = ctx.emit(node.op, (x, y, SUM, *rest), kwargs, [PARTIAL], node.loc, ())
    if reduction == SUM:
        return EMITTED, (total,), {}, [PARTIAL]
    return EMITTED, (_divided(ctx, total, _count(ctx.global_shape(x), list(range(len(ctx.global_shape(x))))),
                              node.loc),), {}, [PARTIAL]


def pointwise_loss_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """(grad, x, y, reduction, ...): the gradient of this rank's rows; a mean's 1/count is the
    global count, and padding rows get none."""
    grad, x, y, reduction, *rest = args
    if ctx.seq(x) is None and ctx.seq(y) is None and ctx.seq(grad) is None:
        return node.op, args, kwargs, [None]
    if reduction not in (MEAN, SUM):
        seq, x, y = _pair(ctx, node, x, y)
        return node.op, (as_sharded(ctx, grad, seq), x, y, reduction, *rest), kwargs, [seq]
    if ctx.seq(grad) is not None:
        raise Unshardable(f"{node.op}: the gradient of a reduced loss is sharded")
    seq, x, y = _pair(ctx, node, x, y)
    shape = ctx.global_shape(x)
    if reduction == MEAN:
        (grad,) = ctx.emit("core.div.Scalar", (grad, _count(shape, list(range(len(shape))))), {}, [None],
                           node.loc, ctx.global_shape(grad))
    (local,) = ctx.emit(node.op, (grad, x, y, SUM, *rest), kwargs, [seq], node.loc, shape)
    return EMITTED, (without_padding(ctx, local),), {}, [seq]


LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
def vector_norm(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """linalg_vector_norm(x, ord, dim, keepdim): over other dims the shard stays (F.normalize's
    norm over features); over the sequence it is refused (a p-norm is not a sum of partials)."""
    source = args[0]
    seq = ctx.seq(source)
    if seq is None:
        return node.op, args, kwargs, [None]
    rank = len(source.type.shape)
    dims = args[2] if len(args) > 2 and args[2] is not None else kwargs.get("dim", list(range(rank)))
    dims = sorted(d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    if seq.dim in dims:
        raise Unshardable(f"{node.op} over the sequence dim")
    keep = bool(args[3]) if len(args) > 3 else bool(kwargs.get("keepdim", False))
    out_dim = seq.dim if keep else seq.dim - sum(d < seq.dim for d in dims)
    return node.op, args, kwargs, [Seq(out_dim, seq.inner)]


REDUCTION_RULES = {
    "core.linalg_vector_norm": vector_norm,
    **{f"core.{name}": reduce for name in ("sum", "sum.dim_IntList", "mean", "mean.dim")},
    **{f"core.{name}": pointwise_loss for name in LOSSES},
    **{f"core.{name}_backward": pointwise_loss_backward for name in LOSSES},
}
