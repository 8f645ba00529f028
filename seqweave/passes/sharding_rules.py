"""One rule per op for `shard-sequence`: given the sharded operands, how the op runs on a shard.

A rule sees the node with operands already mapped into the sharded graph and returns the
(op, args, kwargs) to emit and where the sequence sits in each result (`Seq` or None for
replicated). Rules may ask `ctx.shard(value, seq)` for the local rows of a replicated value
(free: every rank holds it whole). A rule that cannot run an op on shards raises
`Unshardable` with the reason.
"""
from __future__ import annotations

from typing import Any

from seqweave.ir.attribute_form import in_form_of
from seqweave.ir.graph import Node, Value, map_values, values_in
from seqweave.ir.mask import Sinks
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.positions import Rope, parse_positions
from seqweave.ir.types import TensorType
from seqweave.ir.sharding import Layout
from seqweave.passes.contraction_rules import CONTRACTION_RULES
from seqweave.passes.cost import Strategy
from seqweave.passes.reduction_rules import REDUCTION_RULES
from seqweave.passes.sharding_context import EMITTED, PARTIAL, Context, Emit, Rule, Seq, Unshardable
from seqweave.passes.strategy import LayerShape, choose_strategy, head_split_problem

MAX_INDEX = 2 ** 62  # `slice(..., end=huge)` means "to the end"
#: the op each strategy runs as: a halo is the ring under a plan that skips sends
RUNS_AS = {Strategy.RING: "ring", Strategy.HALO: "ring", Strategy.ULYSSES: "ulysses", Strategy.HYBRID: "hybrid"}


ELEMENTWISE = frozenset(f"core.{name}" for name in (
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "add.Scalar", "mul.Scalar", "div.Scalar", "neg",
    "pow.Tensor_Scalar", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "silu", "gelu", "relu", "cos", "sin",
    "_to_copy", "clone", "detach", "alias", "where.self", "eq.Scalar", "ne.Scalar", "eq.Tensor", "ne.Tensor",
    "lt.Scalar", "le.Scalar", "gt.Scalar", "ge.Scalar", "masked_fill.Scalar", "bitwise_and.Tensor", "abs",
    "reciprocal", "erf", "maximum", "minimum", "clamp_min", "clamp", "silu_backward", "gelu_backward",
    "threshold_backward", "sigmoid_backward", "tanh_backward",
    # more pointwise ops users' models and losses produce
    "sgn", "sign", "log1p", "expm1", "log2", "exp2", "floor", "ceil", "round", "trunc", "frac", "square",
    "sub.Scalar", "rsub.Scalar", "pow.Tensor_Tensor", "pow.Scalar", "clamp_max", "clamp.Tensor", "lerp.Scalar",
    "lt.Tensor", "le.Tensor", "gt.Tensor", "ge.Tensor", "logical_not", "logical_and", "logical_or", "bitwise_not",
    "bitwise_or.Tensor", "where.ScalarOther", "where.ScalarSelf", "masked_fill.Tensor", "isnan", "isinf",
    "softplus", "softplus_backward", "elu", "elu_backward", "leaky_relu", "leaky_relu_backward", "hardtanh",
    "hardtanh_backward", "hardswish", "hardswish_backward", "hardsigmoid", "hardsigmoid_backward", "mish",
    "mish_backward", "relu6", "logit", "atan", "sinh", "cosh", "asin", "acos", "erfinv", "xlogy.Tensor",
    "nan_to_num", "copysign.Tensor", "fmod.Scalar", "remainder.Scalar",
    # shaped like their operand (a normaliser's column of ones beside v)
    "ones_like", "zeros_like", "full_like", "empty_like", "log_sigmoid_backward"))


def elementwise_pair(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """A pointwise op with a second result (log_sigmoid_forward's buffer: the input's shape on
    CPU, empty on CUDA): each result shaped like the first is sharded like it."""
    op, args, kwargs, seqs = elementwise(ctx, node, args, kwargs)
    first = tuple(node.results[0].type.shape)
    return op, args, kwargs, [seqs[0] if tuple(r.type.shape) == first else None for r in node.results]


def _tensor_args(args: tuple) -> list[Value]:
    return [v for v in values_in(args) if isinstance(v.type, TensorType)]


def elementwise(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """Broadcasting ops: the sequence dim aligns from the right; full-length replicated operands are sliced."""
    out_rank = len(node.results[0].type.shape)
    sharded = [(v, ctx.seq(v)) for v in _tensor_args(args) if ctx.seq(v) is not None]
    if not sharded:
        return node.op, args, kwargs, [None]
    anchor, seq = sharded[0]
    out_dim = seq.dim + out_rank - len(anchor.type.shape)
    full = int(node.results[0].type.shape[out_dim])

    def align(value: Any) -> Any:
        if not isinstance(value, Value) or not isinstance(value.type, TensorType):
            return value
        dim = out_dim - (out_rank - len(value.type.shape))
        if dim < 0 or ctx.global_shape(value)[dim] == 1:
            return value
        have = ctx.seq(value)
        if have is None and ctx.global_shape(value)[dim] == full:
            return ctx.shard(value, Seq(dim, seq.inner))
        if have == Seq(dim, seq.inner):
            return value
        raise Unshardable(f"{node.op}: operands hold the sequence in different places ({have} vs {seq})")

    return node.op, map_values(args, align), map_values(kwargs, align), [Seq(out_dim, seq.inner)]


def _prod(values) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def _resolve(shape: list[int], numel: int) -> list[int]:
    """A view's shape with its -1 filled in."""
    if -1 in shape:
        known = _prod(d for d in shape if d != -1)
        shape = [numel // known if d == -1 else d for d in shape]
    return [int(d) for d in shape]


def view(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """view/reshape: views keep row-major order, so the sequence factor keeps its flat stride."""
    source, shape = args[0], list(args[1])
    seq = ctx.seq(source)
    if seq is None:
        return node.op, args, kwargs, [None]
    in_shape = ctx.global_shape(source)
    stride = seq.inner * _prod(in_shape[seq.dim + 1:])  # flat stride of one sequence position
    out = _resolve(shape, _prod(in_shape))
    for dim in range(len(out)):
        dim_stride = _prod(out[dim + 1:])
        if dim_stride <= stride and stride % dim_stride == 0 and stride * ctx.length <= dim_stride * out[dim]:
            local = list(out)
            local[dim] = ctx.local(out[dim])
            return node.op, (source, local, *args[2:]), kwargs, [Seq(dim, stride // dim_stride)]
    raise Unshardable(f"{node.op} to {out} splits the sequence across dims")


def unsqueeze(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    dim = args[1] % (len(ctx.global_shape(args[0])) + 1)
    return node.op, args, kwargs, [Seq(seq.dim + (dim <= seq.dim), seq.inner)]


def squeeze(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """squeeze(x, dim | dims): size-1 dims go; the sequence dim (never size 1 here) moves left past them."""
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    shape = ctx.global_shape(args[0])
    asked = args[1] if len(args) > 1 else list(range(len(shape)))
    asked = asked if isinstance(asked, (list, tuple)) else [asked]
    dropped = {d % len(shape) for d in asked if shape[d % len(shape)] == 1}
    return node.op, args, kwargs, [Seq(seq.dim - sum(d < seq.dim for d in dropped), seq.inner)]


def transpose(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    rank = len(ctx.global_shape(args[0]))
    a, b = (args[1] % rank, args[2] % rank) if node.op == "core.transpose.int" else (0, 1)
    moved = b if seq.dim == a else a if seq.dim == b else seq.dim
    return node.op, args, kwargs, [Seq(moved, seq.inner)]


def permute(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    rank = len(ctx.global_shape(args[0]))
    order = [d % rank for d in args[1]]
    return node.op, args, kwargs, [Seq(order.index(seq.dim), seq.inner)]


def select(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """select(x, dim, index) on another dim than the sequence's drops that dim."""
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    dim = args[1] % len(ctx.global_shape(args[0]))
    if dim == seq.dim:
        raise Unshardable(f"{node.op} picks one position of the sharded sequence dim")
    return node.op, args, kwargs, [Seq(seq.dim - (dim < seq.dim), seq.inner)]


def select_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """select_backward(grad, input_sizes, dim, index): grad re-enters `dim`, sized as this rank's piece."""
    grad, sizes, dim, index = args[:4]
    seq = ctx.seq(grad)
    if seq is None:
        return node.op, args, kwargs, [None]
    dim = dim % len(sizes)
    out_dim = seq.dim + (dim <= seq.dim)
    local = list(sizes)
    local[out_dim] = ctx.local(int(sizes[out_dim]))
    return node.op, (grad, local, dim, index, *args[4:]), kwargs, [Seq(out_dim, seq.inner)]


def expand(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    sizes = list(args[1])
    offset = len(sizes) - len(ctx.global_shape(args[0]))
    sizes[seq.dim + offset] = -1
    return node.op, (args[0], sizes, *args[2:]), kwargs, [Seq(seq.dim + offset, seq.inner)]


def slice_(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    rank = len(ctx.global_shape(args[0]))
    dim = (args[1] if len(args) > 1 else 0) % rank
    if dim != seq.dim:
        return node.op, args, kwargs, [seq]
    start, end = (list(args[2:4]) + [None, None])[:2]
    if (start in (None, 0)) and (end is None or end >= ctx.global_shape(args[0])[dim]):
        return node.op, (args[0], dim, 0, MAX_INDEX, *args[4:]), kwargs, [seq]
    raise Unshardable(f"{node.op} takes part of the sharded sequence dim ({start}:{end})")


def amax(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """amax over dims that are not the sequence dim keeps the shard."""
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None]
    rank = len(ctx.global_shape(args[0]))
    dims = [d % rank for d in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]])]
    if seq.dim in dims:
        raise Unshardable(f"{node.op} reduces over the sequence")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dim = seq.dim if keepdim else seq.dim - sum(d < seq.dim for d in dims)
    return node.op, args, kwargs, [Seq(dim, seq.inner)]


def row_wise(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """softmax and its kin over a dim that is not the sequence's treat positions independently."""
    tensors = [v for v in _tensor_args(args) if ctx.seq(v) is not None]
    if not tensors:
        return node.op, args, kwargs, [None] * len(node.results)
    seq = ctx.seq(tensors[0])
    dim = args[1] if node.op in ("core._softmax", "core._log_softmax") else args[2]
    if dim % len(ctx.global_shape(tensors[0])) == seq.dim:
        raise Unshardable(f"{node.op} normalises over the sequence")
    args = tuple(_aligned_like(ctx, a, seq) for a in args)
    return node.op, args, kwargs, [seq] * len(node.results)


def _aligned_like(ctx: Context, value: Any, seq: Seq) -> Any:
    """A whole same-shaped operand (a softmax backward's output) sliced like the sharded one."""
    if isinstance(value, Value) and isinstance(value.type, TensorType) and ctx.seq(value) is None:
        return ctx.shard(value, seq)
    return value


def embedding(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """The seed: slice the token ids (not the embeddings) to this rank's positions."""
    weight, ids = args[0], args[1]
    shape = ctx.global_shape(ids)
    if ctx.seq(ids) is None and shape and shape[-1] == ctx.length:
        ids = ctx.shard(ids, Seq(len(shape) - 1))
    seq = ctx.seq(ids)
    return node.op, (weight, ids, *args[2:]), kwargs, [seq]


def layer_norm(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is not None and seq.dim >= len(ctx.global_shape(args[0])) - len(args[1]):
        raise Unshardable("layer norm over the sequence dim")
    return node.op, args, kwargs, [seq] * len(node.results)


def split(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % len(ctx.global_shape(args[0]))
    if seq is not None and dim == seq.dim:
        raise Unshardable(f"{node.op} splits the sequence dim")
    return node.op, args, kwargs, [seq] * len(node.results)


def cat(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    # torch.cat skips 1-D empty tensors: the `torch.tensor([])` an empty HF DynamicCache starts from.
    tensors = [t for t in args[0] if tuple(ctx.global_shape(t)) != (0,)] or list(args[0])
    args = (tensors, *args[1:])
    if len(tensors) == 1:  # a cat of one tensor is a copy of it, sharded as it is
        return "core.clone", (tensors[0],), {}, [ctx.seq(tensors[0])]
    seqs = {ctx.seq(t) for t in tensors} - {None}
    if not seqs:
        return node.op, args, kwargs, [None]
    if len(seqs) > 1:
        raise Unshardable("cat of tensors sharded in different places")
    seq = seqs.pop()
    dim = (args[1] if len(args) > 1 else 0) % len(ctx.global_shape(tensors[0]))
    if dim == seq.dim:
        raise Unshardable("cat along the sequence dim")
    tensors = [t if ctx.seq(t) else ctx.shard(t, seq) for t in tensors]
    return node.op, (tensors, *args[1:]), kwargs, [seq]


def stack(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """stack(tensors, dim): a new dim at `dim`; the sequence moves past it if it sits at or after it."""
    tensors = list(args[0])
    seqs = {ctx.seq(t) for t in tensors} - {None}
    if not seqs:
        return node.op, args, kwargs, [None]
    if len(seqs) > 1:
        raise Unshardable("stack of tensors sharded in different places")
    seq = seqs.pop()
    dim = (args[1] if len(args) > 1 else 0) % (len(ctx.global_shape(tensors[0])) + 1)
    tensors = [t if ctx.seq(t) else ctx.shard(t, seq) for t in tensors]
    return node.op, (tensors, *args[1:]), kwargs, [Seq(seq.dim + (dim <= seq.dim), seq.inner)]


def unbind(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """unbind(x, dim) along another dim than the sequence's: each piece keeps the shard."""
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None] * len(node.results)
    dim = (args[1] if len(args) > 1 else 0) % len(ctx.global_shape(args[0]))
    if dim == seq.dim:
        raise Unshardable(f"{node.op} splits the sharded sequence dim into positions")
    return node.op, args, kwargs, [Seq(seq.dim - (dim < seq.dim), seq.inner)] * len(node.results)


def strategy(ctx: Context, q: Value, k: Value, kwargs: dict) -> str:
    """"ring", "ulysses" or "hybrid" for one attention: as asked, or (auto) `choose_strategy`'s
    pick, the same function `explain --sp` reports. The forward and the backward of a layer see
    the same mask and shapes, so they agree."""
    b, q_heads, _, head_dim = ctx.global_shape(q)
    kv_heads = ctx.global_shape(k)[1]
    if ctx.attention == "hybrid":
        problem = head_split_problem(q_heads, kv_heads, ctx.ulysses, "U")
        if problem:
            raise Unshardable(f"hybrid attention refused: {problem}; use attention='ring'")
        return "hybrid"
    if ctx.attention == "ulysses":
        problem = head_split_problem(q_heads, kv_heads, ctx.world)
        if problem:
            raise Unshardable(f"ulysses attention refused: {problem}; use attention='ring' or 'auto'")
        return "ulysses"
    if ctx.attention == "ring":
        return "ring"
    shape = LayerShape(b, ctx.length, q_heads, kv_heads, head_dim, ctx.world, q.type.dtype.itemsize)
    choice = choose_strategy(parse_mask(kwargs["mask"]), shape, Layout(ctx.layout))
    return RUNS_AS[choice.strategy]


def _sharded_operands(ctx: Context, tensors: list[Value], operands: list, what: str) -> list[Value]:
    """q/k/v-like operands sharded on dim 2 (slicing whole ones); mask operands must stay whole."""
    if any(ctx.seq(t) is not None for t in operands):
        raise Unshardable("a mask operand is sharded; mask operands must be whole on every rank")
    sharded = [t if ctx.seq(t) == Seq(2) else ctx.shard(t, Seq(2)) if ctx.seq(t) is None else None for t in tensors]
    if None in sharded:
        raise Unshardable(f"{what} are not sharded on their sequence dim")
    return sharded


def _distributed_attrs(ctx: Context, kwargs: dict) -> dict:
    """The attention's attributes on shards: padded length, and padding keys masked (`& sinks(N)`)."""
    mask = parse_mask(kwargs["mask"])
    if ctx.padded != ctx.length:
        mask = mask & Sinks(ctx.length)
    attrs = {**kwargs, "mask": in_form_of(kwargs["mask"], mask), "layout": ctx.layout, "world": ctx.world,
             "length": ctx.padded}
    return {**attrs, "ulysses": ctx.ulysses} if ctx.attention == "hybrid" else attrs


def _padded_operands(ctx: Context, operands: list, kwargs: dict) -> list:
    """Mask operands padded with zeros to the padded length along their sequence dims, so
    positions >= N can be looked up: the last dim of [B, N] segment ids, key flags and rotary
    positions, both sequence dims of a dense [B, H, N, N] mask (size-1 dims broadcast and
    stay). The `sinks(N)` term masks padding keys whatever they hold; padding query rows are
    dropped. Rotary frequencies have no sequence dim, whatever their size."""
    if ctx.padded == ctx.length:
        return operands
    spec = parse_positions(kwargs.get("positions", "none"))
    frequencies = spec.freqs if isinstance(spec, Rope) else -1
    return [t if index == frequencies else _pad_sequence_dims(ctx, t) for index, t in enumerate(operands)]


def _pad_sequence_dims(ctx: Context, operand: Value) -> Value:
    shape = ctx.global_shape(operand)
    dims = (len(shape) - 2, len(shape) - 1) if len(shape) == 4 else (len(shape) - 1,)
    grow = [0] * (2 * len(shape))  # constant_pad_nd lists (before, after) from the last dim back
    padded_shape = list(shape)
    for dim in dims:
        if shape[dim] == ctx.length:
            grow[2 * (len(shape) - 1 - dim) + 1] = ctx.padded - ctx.length
            padded_shape[dim] = ctx.padded
    if padded_shape == list(shape):
        return operand
    return ctx.emit("core.constant_pad_nd", (operand, grow, 0), {}, [None], "", tuple(padded_shape))[0]


def attention(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """attn.sdpa on shards becomes attn.ring or attn.ulysses; mask operands stay whole (global positions)."""
    q, k, v, operands = args
    if kwargs.get("sparsity"):
        raise Unshardable("double sparsity is a single-device decode approximation")
    qkv = _sharded_operands(ctx, [q, k, v], operands, "q, k, v")
    op = f"attn.{strategy(ctx, q, k, kwargs)}"
    return op, (*qkv, _padded_operands(ctx, operands, kwargs)), _distributed_attrs(ctx, kwargs), [Seq(2), Seq(2)]


def _rows_aligned(ctx: Context, value: Value, seq: Seq, fill: int = 0) -> Value:
    """`value` (e.g. the targets of a loss) sharded like the rows it goes with; padding rows get `fill`."""
    return value if ctx.seq(value) is not None else ctx.shard(value, seq, fill)


def _target_seq(node: Node, seq: Seq) -> Seq:
    """Where the targets hold the sequence: input [M, C] rows -> target [M]; input [B, C, *S]
    (nll_loss2d, cross-entropy on [B, C, N]) -> target [B, *S], the class dim removed."""
    if seq.dim == 1:
        raise Unshardable(f"{node.op}: the class dim holds the sequence")
    return Seq(seq.dim - (seq.dim > 1), seq.inner)


def nll_loss(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """A mean loss is the global mean: sum on each rank, all-reduce sum and count, then divide
    (never a mean of per-rank means; no 0/0 on a rank whose targets are all ignored)."""
    logp, target, weight, reduction, ignore_index = args
    seq = ctx.seq(logp)
    if seq is None:
        return node.op, args, kwargs, [None, None]
    if reduction not in (1, 2):
        raise Unshardable(f"{node.op} with reduction={reduction} on rows sharded in dim {seq.dim}")
    target = _rows_aligned(ctx, target, _target_seq(node, seq), fill=ignore_index)  # padding rows are ignored
    shapes = [(), ()]
    total, count = ctx.emit(node.op, (logp, target, weight, 2, ignore_index), kwargs, [PARTIAL, PARTIAL],
                            node.loc, *shapes)
    if reduction == 2:  # the count stays a partial sum: all-reduced only where something reads it
        return EMITTED, (ctx.all_reduce(total), count), {}, [None, PARTIAL]
    total, count = ctx.all_reduce(total), ctx.all_reduce(count)
    (mean,) = ctx.emit("core.div.Tensor", (total, count), {}, [None], node.loc, ())
    return EMITTED, (mean, count), {}, [None, None]


def nll_loss_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """Rows of the gradient; the saved total_weight is already the global count."""
    grad, logp, target, *rest = args
    seq = ctx.seq(logp)
    if seq is None:
        return node.op, args, kwargs, [None]
    target = _rows_aligned(ctx, target, _target_seq(node, seq), fill=rest[2])  # rest: weight, reduction, ignore_index
    return node.op, (grad, logp, target, *rest), kwargs, [seq]


def embedding_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    grad, indices, *rest = args
    seq = ctx.seq(grad)
    if seq is None:
        return node.op, args, kwargs, [None]
    indices = _rows_aligned(ctx, indices, Seq(seq.dim, seq.inner))
    return node.op, (grad, indices, *rest), kwargs, [PARTIAL]


def layer_norm_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    seq = ctx.seq(args[0])
    if seq is None:
        return node.op, args, kwargs, [None] * len(node.results)
    aligned = tuple(_rows_aligned(ctx, a, seq) if i in (1, 3, 4) and isinstance(a, Value) else a
                    for i, a in enumerate(args))
    return node.op, aligned, kwargs, [seq, PARTIAL, PARTIAL]


def slice_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    grad, sizes, dim, start, end, step = args
    seq = ctx.seq(grad)
    if seq is None:
        return node.op, args, kwargs, [None]
    dim %= len(sizes)
    if dim == seq.dim and not (start == 0 and end >= sizes[dim] and step == 1):
        raise Unshardable(f"{node.op} of part of the sequence dim")
    local = list(sizes)
    local[seq.dim] = ctx.local(sizes[seq.dim])
    end = MAX_INDEX if dim == seq.dim else end
    return node.op, (grad, local, dim, start, end, step), kwargs, [seq]


def attention_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """attn.sdpa_backward on shards becomes the backward of the forward's choice (ring or Ulysses)."""
    *tensors, operands = args
    op = f"attn.{strategy(ctx, tensors[1], tensors[2], kwargs)}_backward"
    tensors = _sharded_operands(ctx, tensors, operands, "attention backward operands")
    return op, (*tensors, _padded_operands(ctx, operands, kwargs)), _distributed_attrs(ctx, kwargs), [Seq(2)] * 3


def _lasp2_attrs(ctx: Context, kwargs: dict) -> dict:
    return {**kwargs, "layout": ctx.layout, "world": ctx.world, "length": ctx.padded}


def linear_attention(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """attn.linear on shards becomes attn.lasp2 (padding rows come after every real row, so
    they reach no real output and need no mask)."""
    if ctx.layout == "striped":  # every row its own run: the states gathered would grow with N
        raise Unshardable("linear attention (LASP-2) needs contiguous runs of rows; striped balance "
                          "interleaves them: use balance='zigzag' or 'none'")
    qkv = _sharded_operands(ctx, list(args), [], "q, k, v and gate")
    return "attn.lasp2", tuple(qkv), _lasp2_attrs(ctx, kwargs), [Seq(2)]


def linear_attention_backward(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    tensors = _sharded_operands(ctx, list(args), [], "linear attention backward operands")
    return "attn.lasp2_backward", tuple(tensors), _lasp2_attrs(ctx, kwargs), [Seq(2)] * len(node.results)


RULES: dict[str, Rule] = {
    **{name: elementwise for name in ELEMENTWISE},
    **{f"core.{name}": view for name in ("view", "_unsafe_view", "reshape")},
    "core.unsqueeze": unsqueeze, "core.squeeze.dim": squeeze, "core.squeeze.dims": squeeze, "core.squeeze": squeeze,
    "core.transpose.int": transpose, "core.t": transpose, "core.permute": permute,
    "core.select.int": select, "core.select_backward": select_backward,
    "core.expand": expand, "core.slice.Tensor": slice_,
    "core.amax": amax, "core._log_softmax": row_wise, "core._softmax": row_wise,
    "core._log_softmax_backward_data": row_wise, "core._softmax_backward_data": row_wise,
    "core.nll_loss_forward": nll_loss, "core.nll_loss_backward": nll_loss_backward,
    "core.nll_loss2d_forward": nll_loss, "core.nll_loss2d_backward": nll_loss_backward,
    "core.embedding_dense_backward": embedding_backward, "core.native_layer_norm_backward": layer_norm_backward,
    "core.slice_backward": slice_backward, "attn.sdpa_backward": attention_backward,
    "core.embedding": embedding, "core.native_layer_norm": layer_norm,
    "core.split.Tensor": split, "core.split_with_sizes": split, "core.cat": cat, "core.stack": stack,
    "core.unbind.int": unbind, **CONTRACTION_RULES, **REDUCTION_RULES,
    "core.log_sigmoid_forward": elementwise_pair,
    "attn.sdpa": attention, "attn.linear": linear_attention, "attn.linear_backward": linear_attention_backward,
}


def rule_for(ctx: Context, node: Node, args: tuple, kwargs: dict) -> Emit:
    """The rule's emission; ops without a rule run replicated when no operand is sharded."""
    rule = RULES.get(node.op)
    if rule is not None:
        return rule(ctx, node, args, kwargs)
    if any(ctx.seq(v) is not None for v in _tensor_args((args, kwargs))):
        raise Unshardable(f"no sequence-sharding rule for {node.op}")
    return node.op, args, kwargs, [None] * len(node.results)
