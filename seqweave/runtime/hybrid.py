"""Hybrid sequence parallelism (USP): Ulysses inside groups of U ranks, ring across the R groups.

Ranks g*U .. g*U+U-1 form Ulysses group g; ranks with the same index j inside their group
form a ring. The all-to-all turns each group's sequence shards into head shards over the
group's positions; the ring then runs across groups on those heads (each group is one ring
"rank" holding its members' positions), and a second all-to-all restores sequence shards.
"""
from __future__ import annotations

from typing import Sequence

import torch.distributed as dist
from torch import Tensor

from seqweave.ir.mask import MaskSpec
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.sharding import (PositionsOf, gathered_order, group_positions, hybrid_groups, hybrid_plan,
                                  ring_positions)
from seqweave.runtime.comm import Communicator
from seqweave.runtime.local_attention import REFERENCE, LocalAttention
from seqweave.runtime.sequence_parallel import (ring_attention_backward, ring_attention_forward, sum_kv_replicas,
                                                to_heads, to_sequence, ulysses_kv)


def hybrid_attention_forward(inner: Communicator, outer: Communicator, q: Tensor, k: Tensor, v: Tensor,
                             mask: MaskSpec, score_mod: ScoreMod, scale: float, positions_of: PositionsOf,
                             operands: Sequence[Tensor] = (), *,
                             kernels: LocalAttention = REFERENCE) -> tuple[Tensor, Tensor]:
    """This rank's (out, lse): all-to-all in the Ulysses group, ring across groups, all-to-all back."""
    group = outer.rank
    _, k, v = ulysses_kv(inner, q, k, v)
    _, perm, inverse = gathered_order(inner.world, group_positions(positions_of, inner.world, group))
    qh, kh, vh = to_heads(inner, (q, k, v), perm, 0, "hybrid forward all-to-all of q/k/v")
    plan = hybrid_plan(mask, positions_of, inner.world, outer.world)
    out, lse = ring_attention_forward(outer, qh, kh, vh, mask, score_mod, scale, plan,
                                      ring_positions(positions_of, inner.world), operands, kernels=kernels)
    out, lse = to_sequence(inner, (out, lse), inverse, 1, "hybrid forward all-to-all of out/lse")
    return out, lse


def hybrid_attention_backward(inner: Communicator, outer: Communicator, dout: Tensor, q: Tensor, k: Tensor,
                              v: Tensor, out: Tensor, lse: Tensor, mask: MaskSpec, score_mod: ScoreMod,
                              scale: float, positions_of: PositionsOf,
                              operands: Sequence[Tensor] = (), *,
                              kernels: LocalAttention = REFERENCE) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of this rank's shards: the forward's path in reverse; replicated K/V heads summed."""
    group = outer.rank
    heads, k_rep, v_rep = ulysses_kv(inner, q, k, v)
    _, perm, inverse = gathered_order(inner.world, group_positions(positions_of, inner.world, group))
    tensors = to_heads(inner, (dout, q, k_rep, v_rep, out, lse), perm, 0, "hybrid backward all-to-all")
    plan = hybrid_plan(mask, positions_of, inner.world, outer.world)
    grads = ring_attention_backward(outer, *tensors, mask, score_mod, scale, plan,
                                    ring_positions(positions_of, inner.world), operands, kernels=kernels)
    dq, dk, dv = to_sequence(inner, grads, inverse, 1, "hybrid backward all-to-all of dq/dk/dv")
    return (dq, *sum_kv_replicas(heads, dk, dv))


class HybridCommunicator(Communicator):
    """The whole group's communicator, carrying this rank's Ulysses-group (`inner`) and ring-group
    (`outer`) communicators for `attn.hybrid`."""

    def __init__(self, ulysses: int, timeout_s: float) -> None:
        super().__init__(timeout_s=timeout_s)
        self.inner, self.outer = make_hybrid_communicators(ulysses, timeout_s)


def make_hybrid_communicators(ulysses: int, timeout_s: float) -> tuple[Communicator, Communicator]:
    """This rank's Ulysses-group and ring-group communicators (every rank creates every group, in order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inner_groups, outer_groups = hybrid_groups(world, ulysses)
    mine = {}
    for kind, groups in (("inner", inner_groups), ("outer", outer_groups)):
        for members in groups:
            handle = dist.new_group(members)  # the world's default backend: NCCL on CUDA, gloo on CPU
            if rank in members:
                mine[kind] = Communicator(handle, timeout_s=timeout_s)
    return mine["inner"], mine["outer"]

