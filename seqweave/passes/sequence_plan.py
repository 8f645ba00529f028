"""Where the sequence sits in each value that feeds an attention: found backwards from attention.

`shard-sequence` needs to know, for a model's float inputs, token ids, position ids and the
gradients a backward receives, which dim (if any) is the sequence. Sizes alone cannot tell:
a hidden size or a batch may equal N, and a position-embedding table may have N rows. The
attentions can: the sequence is dim 2 of every q, k, v (and of every tensor of an attention's
backward). This module carries that fact backwards through the graph, op by op, as DTensor's
sharding propagation does, to every value on a path into an attention. Values off those paths
(masks, labels, weights) get no entry and stay whole until a rule needs their rows.

A step of the walk only ever names a dim whose global size is N times its `inner` factor, and
the first consumer to claim a value wins (later consumers are walked first).
"""
from __future__ import annotations

from typing import Callable, Iterator

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.types import TensorType
from seqweave.passes.sharding_rules import ELEMENTWISE, Seq

Claim = tuple[Value, Seq]
BackRule = Callable[[Node, list["Seq | None"], int], Iterator[Claim]]

#: attention ops and which of their operands carry the sequence in dim 2 (all but the mask operands)
ATTENTION_OPS = frozenset({"attn.sdpa", "attn.sdpa_backward"})
#: linear attention: every operand carries the sequence in dim 2
LINEAR_ATTENTION_OPS = frozenset({"attn.linear", "attn.linear_backward"})


def _shape(value: object) -> tuple[int, ...] | None:
    if isinstance(value, Value) and isinstance(value.type, TensorType):
        return tuple(int(d) for d in value.type.shape)
    return None


def _prod(values: object) -> int:
    result = 1
    for value in values:  # type: ignore[attr-defined]
        result *= int(value)
    return result


def _same(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    """Broadcasting and row-wise ops: each operand holds the sequence where the result does
    (aligned from the right), unless it broadcasts along it."""
    seq = next((s for s in seqs if s is not None), None)
    out = _shape(node.results[0])
    if seq is None or out is None:
        return
    for operand in node.args:
        shape = _shape(operand)
        if shape is None:
            continue
        dim = seq.dim - (len(out) - len(shape))
        if 0 <= dim < len(shape) and shape[dim] == out[seq.dim]:
            yield operand, Seq(dim, seq.inner)


def _view(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    """A view keeps row-major order: the sequence keeps its flat stride in the source."""
    seq, source = seqs[0], node.args[0]
    out, shape = _shape(node.results[0]), _shape(source)
    if seq is None or out is None or shape is None:
        return
    stride = seq.inner * _prod(out[seq.dim + 1:])
    for dim in range(len(shape)):
        dim_stride = _prod(shape[dim + 1:])
        if dim_stride <= stride and stride % dim_stride == 0 and stride * length <= dim_stride * shape[dim]:
            yield source, Seq(dim, stride // dim_stride)
            return


def _moved(source_dim: Callable[[Node, int, int], int | None]) -> BackRule:
    """Ops that move dims around: `source_dim(node, result_dim, source_rank)` is where the
    result's dim came from (None: it has no source dim)."""
    def rule(node: Node, seqs: list, length: int) -> Iterator[Claim]:
        shape = _shape(node.args[0])
        for seq in seqs:
            if seq is not None and shape is not None:
                dim = source_dim(node, seq.dim, len(shape))
                if dim is not None:
                    yield node.args[0], Seq(dim, seq.inner)
                return
    return rule


def _transpose(node: Node, dim: int, rank: int) -> int:
    a, b = (node.args[1] % rank, node.args[2] % rank) if node.op == "core.transpose.int" else (0, 1)
    return b if dim == a else a if dim == b else dim


def _permute(node: Node, dim: int, rank: int) -> int:
    return node.args[1][dim] % rank


def _unsqueeze(node: Node, dim: int, rank: int) -> int | None:
    inserted = node.args[1] % (rank + 1)
    return None if dim == inserted else dim - (inserted < dim)


def _dropped(node: Node, dim: int, rank: int) -> int | None:
    """select/unbind: the result lacks the source's dim `args[1]`."""
    removed = (node.args[1] if len(node.args) > 1 else 0) % rank
    return dim + (removed <= dim)


def _squeezed(node: Node, dim: int, rank: int) -> int | None:
    """squeeze(x, dim | dims): the result lacks those of the asked dims that have size 1."""
    shape = _shape(node.args[0])
    asked = node.args[1] if len(node.args) > 1 else list(range(rank))
    asked = asked if isinstance(asked, (list, tuple)) else [asked]
    source = dim
    for removed in sorted({d % rank for d in asked if shape[d % rank] == 1}):  # type: ignore[index]
        source += removed <= source
    return source


def _expand(node: Node, dim: int, rank: int) -> int | None:
    source = dim - (len(node.args[1]) - rank)
    return source if source >= 0 and _shape(node.args[0])[source] != 1 else None  # type: ignore[index]


def _kept(node: Node, dim: int, rank: int) -> int | None:
    """slice/split/clone-like ops keep dims in place (not along the dim they cut)."""
    cut = node.args[2] if node.op in ("core.split.Tensor", "core.split_with_sizes") and len(node.args) > 2 else \
        node.args[1] if node.op == "core.slice.Tensor" and len(node.args) > 1 else None
    return None if cut is not None and cut % rank == dim else dim


def _reduced(node: Node, dim: int, rank: int) -> int | None:
    """sum/mean over `dims`: with keepdim the dims stay, otherwise the result lacks them."""
    dims = node.args[1] if len(node.args) > 1 else list(range(rank))
    dims = sorted(d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keepdim:
        return None if dim in dims else dim
    source = dim
    for reduced in dims:
        source += reduced <= source
    return source


def _tensors_of_list(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    """cat/stack: every listed tensor holds the sequence where the result does (not along the joined dim)."""
    seq, joined = seqs[0], (node.args[1] if len(node.args) > 1 else 0)
    tensors = list(node.args[0])
    shape = _shape(tensors[0]) if tensors else None
    if seq is None or shape is None:
        return
    if node.op == "core.stack":
        joined %= len(shape) + 1
        if joined == seq.dim:
            return
        dim = seq.dim - (joined < seq.dim)
    else:
        dim = seq.dim
        if joined % len(shape) == dim:
            return
    for tensor in tensors:
        if _shape(tensor) is not None and len(_shape(tensor)) == len(shape):  # type: ignore[arg-type]
            yield tensor, Seq(dim, seq.inner)


def _contraction(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    """mm/addmm rows come from the left operand's rows; bmm's batch from both, rows from the
    left, columns from the right."""
    seq = seqs[0]
    if seq is None:
        return
    if node.op == "core.bmm":
        left, right = node.args[0], node.args[1]
        if seq.dim == 0:
            yield left, seq
            yield right, seq
        elif seq.dim == 1:
            yield left, seq
        else:
            yield right, seq
        return
    left = node.args[0] if node.op == "core.mm" else node.args[1]
    if seq.dim == 0:
        yield left, seq


def _embedding(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    seq, ids = seqs[0], node.args[1]
    shape = _shape(ids)
    if seq is not None and shape is not None and seq.dim < len(shape):
        yield ids, seq


def _first_operand_backward(node: Node, seqs: list, length: int) -> Iterator[Claim]:
    """select_backward/slice_backward(grad, sizes, dim, ...): grad's dims, less the selected one."""
    seq = seqs[0]
    if seq is None:
        return
    dim = node.args[2] % len(node.args[1])
    if node.op == "core.select_backward":
        if dim != seq.dim:
            yield node.args[0], Seq(seq.dim - (dim < seq.dim), seq.inner)
    elif dim != seq.dim:
        yield node.args[0], seq


BACK_RULES: dict[str, BackRule] = {
    **{op: _same for op in ELEMENTWISE},
    **{op: _same for op in ("core.native_layer_norm", "core.native_layer_norm_backward", "core._softmax",
                            "core._log_softmax", "core._softmax_backward_data", "core._log_softmax_backward_data",
                            "core.mse_loss_backward", "core.where.self", "core.lt.Tensor", "core.gt.Tensor")},
    **{f"core.{name}": _view for name in ("view", "_unsafe_view", "reshape")},
    "core.transpose.int": _moved(_transpose), "core.t": _moved(_transpose), "core.permute": _moved(_permute),
    "core.unsqueeze": _moved(_unsqueeze), "core.squeeze.dim": _moved(_squeezed),
    "core.squeeze.dims": _moved(_squeezed), "core.squeeze": _moved(_squeezed), "core.select.int": _moved(_dropped),
    "core.unbind.int": _moved(_dropped), "core.expand": _moved(_expand),
    "core.slice.Tensor": _moved(_kept), "core.split.Tensor": _moved(_kept), "core.split_with_sizes": _moved(_kept),
    "core.sum.dim_IntList": _moved(_reduced), "core.mean.dim": _moved(_reduced),
    "core.cat": _tensors_of_list, "core.stack": _tensors_of_list,
    "core.mm": _contraction, "core.addmm": _contraction, "core.bmm": _contraction,
    "core.embedding": _embedding,
    "core.select_backward": _first_operand_backward, "core.slice_backward": _first_operand_backward,
}


def plan_sequence(graph: Graph, length: int) -> dict[Value, Seq]:
    """For each value on a path into an attention, where its sequence sits (dim, inner)."""
    plan: dict[Value, Seq] = {}

    def claim(value: Value, seq: Seq) -> None:
        shape = _shape(value)
        if value in plan or shape is None or not 0 <= seq.dim < len(shape):
            return
        if shape[seq.dim] % (length * seq.inner) == 0:  # outer x N x inner (a [B*N, D] view)
            plan[value] = seq

    for node in reversed(graph.nodes):
        if node.op in ATTENTION_OPS or node.op in LINEAR_ATTENTION_OPS:
            # every operand but softmax attention's last (the list of mask operands)
            for operand in node.args[:-1] if node.op in ATTENTION_OPS else node.args:
                shape = _shape(operand)
                if shape is not None and len(shape) > 2 and shape[2] == length:  # keys of another length: none
                    claim(operand, Seq(2))
            continue
        rule = BACK_RULES.get(node.op)
        seqs = [plan.get(result) for result in node.results]
        if rule is not None and any(seqs):
            for value, seq in rule(node, seqs, length):
                claim(value, seq)
    return plan
