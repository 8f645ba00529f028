"""`sp.*`: the sequence-parallel dialect. Values in a sharded graph have LOCAL shapes; a
tensor sharded on the sequence carries `Shard(dim)` on the `sp` axis.

A sequence factor may sit inside a merged dim: `[B, S, H]` viewed as `[B*S, H]` keeps the
sequence in dim 0 with `inner` = 1; the attrs `dim`, `inner` and `length` (global N) locate
it. Ops that talk to other ranks (`sp.gather`, `sp.all_reduce`, `attn.ring`) have no plain
reference: the runtime supplies their implementation with a communicator.
"""
from __future__ import annotations

from typing import Any

import torch

from seqweave.ir.graph import Node
from seqweave.ir.ops.attn import Sdpa, SdpaBackward
from seqweave.ir.ops.attn_linear import LinearAttention, LinearAttentionBackward
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.types import Replicate, Shard, TensorType, ValueType

SP_AXIS = "sp"


def split_factor(shape: tuple[int, ...], dim: int, length: int, inner: int) -> tuple[int, ...]:
    """`shape` with `dim` split into (outer, length, inner): the sequence factor made explicit."""
    outer = shape[dim] // (length * inner)
    return shape[:dim] + (outer, length, inner) + shape[dim + 1:]


def take_positions(x: torch.Tensor, positions: torch.Tensor, dim: int, length: int, inner: int,
                   padded: int | None = None, fill: float = 0) -> torch.Tensor:
    """The rows of the sequence factor at `positions`, from a tensor holding all `length` of them;
    positions from `length` up to `padded` are padding rows holding `fill`."""
    split = x.reshape(split_factor(tuple(x.shape), dim, length, inner))
    if padded is not None and padded > length:
        grow = [0, 0] * (split.dim() - dim - 2) + [0, padded - length]
        split = torch.nn.functional.pad(split, grow, value=fill)
    local = split.index_select(dim + 1, positions.to(x.device))
    return local.reshape(x.shape[:dim] + (-1,) + x.shape[dim + 1:])


def with_placement(t: TensorType, placement: Any) -> TensorType:
    return TensorType(t.shape, t.dtype, ((SP_AXIS, placement),))


class ShardOp(OpDef):
    """x (whole sequence) , positions [N/P] int64 -> x's rows at this rank's positions.

    `sp.shard(x, positions, dim=d, inner=i, length=N)`: free, no communication (every rank
    holds the whole x).
    """

    name = "sp.shard"

    def infer(self, node: Node) -> list[ValueType]:
        x, positions = node.args[0].type, node.args[1].type
        local = int(positions.shape[0]) * int(x.shape[node.kwargs["dim"]]) // node.kwargs["length"]
        shape = list(x.shape)
        shape[node.kwargs["dim"]] = local
        return [TensorType.of(shape, x.dtype, ((SP_AXIS, Shard(node.kwargs["dim"])),))]

    def verify(self, node: Node) -> None:
        x = node.args[0].type
        step = node.kwargs["length"] * node.kwargs["inner"]
        if int(x.shape[node.kwargs["dim"]]) % step:
            raise fail(node, f"dim {node.kwargs['dim']} of {x} does not hold a sequence factor of {step}")

    def reference(self, node: Node, x, positions, **kwargs: Any) -> torch.Tensor:
        return take_positions(x, positions, kwargs["dim"], kwargs["length"], kwargs["inner"],
                              kwargs.get("padded"), kwargs.get("fill", 0))


class _RunsInRuntime(OpDef):
    """An op that talks to other ranks: the runtime binds its implementation to a communicator."""

    pure = False  # a collective is never removed because one rank does not read its result

    def reference(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.name} exchanges data between ranks: run it through the runtime "
                        "(codegen.lower(graph, comm)), not the single-process interpreter")


class GatherOp(_RunsInRuntime):
    """x (this rank's rows) -> the whole sequence in global order, on every rank.

    `sp.gather(x, dim=d, inner=i, length=N', world=P, layout="zigzag"[, true_length=N])`: N' is the
    padded length the ranks split; padding rows (positions >= N) are dropped.
    """

    name = "sp.gather"

    def infer(self, node: Node) -> list[ValueType]:
        x = node.args[0].type
        shape = list(x.shape)
        length = node.kwargs["length"]  # padded length; `true_length` drops the padding rows
        shape[node.kwargs["dim"]] = shape[node.kwargs["dim"]] * node.kwargs["world"] * \
            node.kwargs.get("true_length", length) // length
        return [TensorType(tuple(shape), x.dtype, ((SP_AXIS, Replicate()),))]


class AllReduceOp(_RunsInRuntime):
    """x (a partial sum on every rank) -> the sum over ranks. `sp.all_reduce(x)`."""

    name = "sp.all_reduce"

    def infer(self, node: Node) -> list[ValueType]:
        return [with_placement(node.args[0].type, Replicate())]


class RingAttention(_RunsInRuntime, Sdpa):
    """`attn.sdpa` on sequence shards: q, k, v hold this rank's positions; K/V travel the ring.

    Same operands and attributes as attn.sdpa plus `layout`, `world` and `length` (the padded
    global length the ranks split; the mask then ends in `& sinks(N)` when padding was added).
    """

    name = "attn.ring"


class RingAttentionBackward(_RunsInRuntime, SdpaBackward):
    """`attn.sdpa_backward` on sequence shards (the backward ring): dq, dk, dv of this rank's rows.

    Same operands and attributes as attn.sdpa_backward plus `layout`, `world` and `length`.
    """

    name = "attn.ring_backward"


class UlyssesAttention(RingAttention):
    """`attn.sdpa` on sequence shards via two all-to-alls (sequence <-> heads); same attributes as attn.ring."""

    name = "attn.ulysses"


class UlyssesAttentionBackward(RingAttentionBackward):
    """`attn.sdpa_backward` on sequence shards via all-to-alls; same attributes as attn.ring_backward."""

    name = "attn.ulysses_backward"


class HybridAttention(RingAttention):
    """`attn.sdpa` on sequence shards: Ulysses inside groups of `ulysses` ranks, ring across groups."""

    name = "attn.hybrid"


class HybridAttentionBackward(RingAttentionBackward):
    """`attn.sdpa_backward` on sequence shards, the hybrid way; same attributes as attn.hybrid."""

    name = "attn.hybrid_backward"


class Lasp2Attention(_RunsInRuntime, LinearAttention):
    """`attn.linear` on sequence shards (LASP-2): each rank's rows start from the decayed sum of
    the earlier ranks' states, gathered once ([world, runs, B, H, D, Dv], independent of N).

    Same operands and attributes as attn.linear plus `layout`, `world` and `length` (padded).
    """

    name = "attn.lasp2"


class Lasp2AttentionBackward(_RunsInRuntime, LinearAttentionBackward):
    """`attn.linear_backward` on sequence shards: one all-gather of states and state gradients."""

    name = "attn.lasp2_backward"
