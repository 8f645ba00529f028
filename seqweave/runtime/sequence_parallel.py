"""Sequence-parallel attention over a `Communicator`: ring attention and Ulysses.

Ring: each rank keeps its query shard; K/V shards travel around the ring (rank r holds the
K/V of source (r - t) mod P at step t) and partial results merge by log-sum-exp. The
mask-aware `RingPlan` skips the compute of EMPTY steps and the sends no later rank needs,
identically on sender and receiver. The backward ring follows the same paths: dK/dV
accumulators travel with K/V and the last holder returns them straight to their source.

Ulysses: an all-to-all turns sequence shards [B, H, S/P, D] into head shards [B, H/P, S, D],
attention runs on the whole sequence for the local heads, and a second all-to-all undoes it.

Shards are [B, H, S_local, D]; every rank's shard has the same shape. `positions_of(r)`
gives the global positions (1-D int64) rank r holds, at which the MaskSpec is evaluated;
mask operands (segment ids, padding) are full-sequence tensors, the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from seqweave.errors import SeqweaveError
from seqweave.ir.mask import MaskSpec
from seqweave.ir.ops.attn_reference import lse_dtype, merge_partials
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.sharding import CH_GRADS, CH_HOME, CH_KV, PositionsOf, RingPlan, gathered_order, kv_repeat
from seqweave.runtime.comm import Communicator
from seqweave.runtime.local_attention import REFERENCE, LocalAttention



class SequenceParallelError(SeqweaveError):
    """The shards, plan or head counts do not fit the chosen sequence-parallel scheme."""


# ----------------------------------------------------------------- packing


def _pack(tensors: Sequence[Tensor]) -> Tensor:
    """Flatten tensors of one dtype into one buffer, so they travel as one message."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buffer: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    """Views of `buffer` shaped like `likes` (the inverse of `_pack`)."""
    sizes = [t.numel() for t in likes]
    return [part.view(t.shape) for part, t in zip(buffer.split(sizes), likes)]


def _accum(dtype: torch.dtype) -> torch.dtype:
    """Merge / gradient accumulation dtype: fp64 for fp64, else fp32 (as the reference does)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- ring schedule


def _check_ring(comm: Communicator, plan: RingPlan, q: Tensor, k: Tensor, positions_of: PositionsOf) -> None:
    """The plan is for this group and the shard lengths match the positions."""
    if plan.world != comm.world:
        raise SequenceParallelError(f"rank {comm.rank}: ring plan is for {plan.world} ranks but the group has "
                                    f"{comm.world}", hint="build the plan with plan_ring(..., world=group size)")
    local = positions_of(comm.rank).numel()
    if q.shape[2] != local or k.shape[2] != local:
        raise SequenceParallelError(f"rank {comm.rank}: shards hold {q.shape[2]} queries / {k.shape[2]} keys but "
                                    f"positions_of({comm.rank}) has {local} positions",
                                    hint="pass this rank's shard along the sequence dim (2) of [B, H, S, D]")


def _shift_kv(comm: Communicator, plan: RingPlan, held: Tensor | None, like: Tensor, step: int, op: str):
    """Start step `step`'s K/V shift as the plan says; `wait_one()` gives the next held K/V (or None)."""
    send = held if plan.forwards(comm.rank, step) else None
    if plan.forwards(comm.rank, step) and held is None:
        raise SequenceParallelError(f"rank {comm.rank}: ring step {step}: the plan forwards K/V this rank never "
                                    f"received", hint="use a RingPlan from plan_ring; hand-made sends must form paths")
    receives = plan.forwards((comm.rank - 1) % comm.world, step)
    return comm.shift(send, step, op, recv_like=like if receives else None, channel=CH_KV)


def _held_kv(comm: Communicator, held: Tensor | None, k: Tensor, v: Tensor, step: int) -> list[Tensor]:
    """Unpack the held K/V message, which the plan must have delivered for a computing step."""
    if held is None:
        raise SequenceParallelError(f"rank {comm.rank}: ring step {step} computes with K/V it never received",
                                    hint="the plan's sends must reach every rank whose step is not EMPTY")
    return _unpack(held, (k, v))


# ----------------------------------------------------------------- ring attention


def ring_attention_forward(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec,
                           score_mod: ScoreMod, scale: float, plan: RingPlan, positions_of: PositionsOf,
                           operands: Sequence[Tensor] = (), *,
                           kernels: LocalAttention = REFERENCE) -> tuple[Tensor, Tensor]:
    """This rank's (out [B, Hq, S_local, Dv], lse [B, Hq, S_local]) of attention over the whole ring.

    Each step's K/V shift (k and v in one message) starts before the step's compute and is
    waited after it. Fully masked rows give out = 0, lse = -inf.
    """
    _check_ring(comm, plan, q, k, positions_of)
    rank, q_pos = comm.rank, positions_of(comm.rank)
    acc = _accum(q.dtype)
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    held = like = _pack((k, v))
    for step in range(comm.world):
        pending = _shift_kv(comm, plan, held, like, step, "ring forward shift of k/v")
        if plan.computes(rank, step):
            k_s, v_s = _held_kv(comm, held, k, v, step)
            part = kernels.forward(q, k_s, v_s, mask, score_mod, scale, operands,
                                   q_pos, positions_of(plan.source(rank, step)))
            out, lse = merge_partials(out, lse, *part)
        held = pending.wait_one()
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


@dataclass
class _GradRing:
    """Per-rank backward state: dq, and the packed dK/dV accumulator of the held source."""

    dq: Tensor
    grads: Tensor | None = None
    mine: Tensor | None = None  # this rank's own finished dK/dV (packed), once complete

    def add(self, dk: Tensor, dv: Tensor) -> None:
        part = _pack((dk, dv)).to(self.dq.dtype)
        self.grads = part if self.grads is None else self.grads + part


def _move_grads(comm: Communicator, plan: RingPlan, state: _GradRing, like: Tensor, step: int):
    """After `step`'s compute: pass the dK/dV accumulator on with its K/V, or, at the end of its
    path, return it to its source. Returns (pending ring receive, pending home receive)."""
    rank, world, source = comm.rank, comm.world, plan.source(comm.rank, step)
    forwards = plan.forwards(rank, step)
    ring_recv = like if plan.forwards((rank - 1) % world, step) else None
    ring = comm.shift(state.grads if forwards else None, step, "ring backward shift of dk/dv",
                      recv_like=ring_recv, channel=CH_GRADS)
    last_holder = plan.holds(rank, step) and not forwards
    if last_holder and source == rank:
        state.mine = state.grads
    home_send = [(source, state.grads)] if last_holder and source != rank else []
    hops = plan.hops(rank)
    home_recv = [((rank + hops) % world, like)] if hops == step and hops > 0 else []
    home = comm.exchange(home_send, home_recv, step, "ring backward return of dk/dv", channel=CH_HOME)
    return ring, home


def ring_attention_backward(comm: Communicator, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float, plan: RingPlan,
                            positions_of: PositionsOf, operands: Sequence[Tensor] = (), *,
                            kernels: LocalAttention = REFERENCE) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of this rank's shards; `out`/`lse` are the ring forward's merged results.

    K/V follow the forward's paths; at every step a holder adds its share (exact, given the
    final lse) to the travelling dK/dV, which the path's last holder sends home in one message.
    """
    _check_ring(comm, plan, q, k, positions_of)
    rank, q_pos = comm.rank, positions_of(comm.rank)
    state = _GradRing(torch.zeros(q.shape, dtype=_accum(q.dtype), device=q.device))
    held = kv_like = _pack((k, v))
    grad_like = kv_like.to(state.dq.dtype)
    for step in range(comm.world):
        kv_pending = _shift_kv(comm, plan, held, kv_like, step, "ring backward shift of k/v")
        if step == 0:
            state.grads = torch.zeros_like(grad_like)  # the accumulator of this rank's own K/V
        if plan.computes(rank, step):
            k_s, v_s = _held_kv(comm, held, k, v, step)
            dq, dk, dv = kernels.backward(dout, q, k_s, v_s, out, lse, mask, score_mod, scale, operands,
                                          q_pos, positions_of(plan.source(rank, step)))
            state.dq += dq
            state.add(dk, dv)
        ring, home = _move_grads(comm, plan, state, grad_like, step)
        held = kv_pending.wait_one()
        state.grads = ring.wait_one()  # travels with `held`: None exactly when held is None
        arrived = home.wait_one()  # this rank's dK/dV, sent home by the last holder of its K/V
        state.mine = arrived if arrived is not None else state.mine
    dk, dv = _unpack(state.mine, (k, v))
    return state.dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------- Ulysses


@dataclass(frozen=True)
class UlyssesHeads:
    """How heads split over P ranks: q heads H/P per rank; K/V heads replicated `kv_repeat`
    times first when there are fewer than P of them (their gradients are summed back)."""

    world: int
    q_heads: int
    kv_heads: int
    kv_repeat: int


def ulysses_heads(world: int, q_heads: int, kv_heads: int) -> UlyssesHeads:
    """Check that Ulysses can split these heads over `world` ranks, and how."""
    if q_heads % world:
        raise SequenceParallelError(f"Ulysses needs the {q_heads} query heads divisible by the {world} ranks",
                                    hint="use ring attention (it shards the sequence, not the heads)")
    if q_heads % kv_heads:
        raise SequenceParallelError(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads",
                                    hint="grouped-query attention needs q_heads % kv_heads == 0")
    if kv_heads % world and world % kv_heads:
        raise SequenceParallelError(f"Ulysses cannot split {kv_heads} kv heads over {world} ranks: neither "
                                    f"divides the other", hint="use ring attention, or a world size dividing "
                                    "or divided by the kv head count")
    return UlyssesHeads(world, q_heads, kv_heads, kv_repeat(world, kv_heads))


def _swap(comm: Communicator, tensors: Sequence[Tensor], split_dim: int, cat_dim: int,
          step: int, op: str) -> list[Tensor]:
    """Split each tensor in P equal chunks along `split_dim`, send chunk j to rank j, and
    concatenate what arrives along `cat_dim` in rank order. One all-to-all per dtype."""
    world, result = comm.world, [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        chunks = [[tensors[i].chunk(world, split_dim)[j] for i in index] for j in range(world)]
        received = comm.all_to_all([_pack(c) for c in chunks], step, op)
        pieces = [_unpack(buffer, chunks[src]) for src, buffer in enumerate(received)]
        for n, i in enumerate(index):
            result[i] = torch.cat([piece[n] for piece in pieces], dim=cat_dim)
    return result


def to_heads(comm: Communicator, tensors: Sequence[Tensor], perm: Tensor, step: int, op: str) -> list[Tensor]:
    """Sequence shards [B, H, S/P, ...] -> head shards [B, H/P, S, ...] in global position order."""
    heads = _swap(comm, tensors, 1, 2, step, op)
    perm = perm.to(heads[0].device)  # planned on the CPU; CUDA refuses a CPU index
    return [t.index_select(2, perm) for t in heads]


def to_sequence(comm: Communicator, tensors: Sequence[Tensor], inverse: Tensor, step: int, op: str) -> list[Tensor]:
    """Head shards [B, H/P, S, ...] in global order -> sequence shards [B, H, S/P, ...]."""
    inverse = inverse.to(tensors[0].device)  # planned on the CPU; CUDA refuses a CPU index
    return _swap(comm, [t.index_select(2, inverse) for t in tensors], 2, 1, step, op)


def ulysses_kv(comm: Communicator, q: Tensor, k: Tensor, v: Tensor) -> tuple[UlyssesHeads, Tensor, Tensor]:
    """Validate heads and replicate K/V heads up to P where there are fewer."""
    heads = ulysses_heads(comm.world, q.shape[1], k.shape[1])
    if heads.kv_repeat == 1:
        return heads, k, v
    return heads, k.repeat_interleave(heads.kv_repeat, 1), v.repeat_interleave(heads.kv_repeat, 1)


def sum_kv_replicas(heads: UlyssesHeads, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
    """dK/dV of the K/V heads `ulysses_kv` replicated: each head's replicas summed back into it."""
    if heads.kv_repeat == 1:
        return dk, dv
    # replicas are adjacent (repeat_interleave)
    return tuple(g.unflatten(1, (heads.kv_heads, heads.kv_repeat)).sum(2) for g in (dk, dv))


def ulysses_attention_forward(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec,
                              score_mod: ScoreMod, scale: float, positions_of: PositionsOf,
                              operands: Sequence[Tensor] = (), *,
                              kernels: LocalAttention = REFERENCE) -> tuple[Tensor, Tensor]:
    """This rank's (out [B, Hq, S/P, Dv], lse [B, Hq, S/P]) via two all-to-alls (Ulysses)."""
    _, k, v = ulysses_kv(comm, q, k, v)
    positions, perm, inverse = gathered_order(comm.world, positions_of)
    qh, kh, vh = to_heads(comm, (q, k, v), perm, 0, "ulysses forward all-to-all of q/k/v")
    out, lse = kernels.forward(qh, kh, vh, mask, score_mod, scale, operands, positions, positions)
    out, lse = to_sequence(comm, (out, lse), inverse, 1, "ulysses forward all-to-all of out/lse")
    return out, lse


def ulysses_attention_backward(comm: Communicator, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float,
                               positions_of: PositionsOf, operands: Sequence[Tensor] = (), *,
                               kernels: LocalAttention = REFERENCE) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of this rank's sequence shards; dK/dV of replicated kv heads are summed."""
    heads, k_rep, v_rep = ulysses_kv(comm, q, k, v)
    positions, perm, inverse = gathered_order(comm.world, positions_of)
    dout_h, q_h, k_h, v_h, out_h, lse_h = to_heads(comm, (dout, q, k_rep, v_rep, out, lse), perm, 0,
                                                    "ulysses backward all-to-all of dout/q/k/v/out/lse")
    grads = kernels.backward(dout_h, q_h, k_h, v_h, out_h, lse_h, mask, score_mod, scale, operands,
                             positions, positions)
    dq, dk, dv = to_sequence(comm, grads, inverse, 1, "ulysses backward all-to-all of dq/dk/dv")
    return (dq, *sum_kv_replicas(heads, dk, dv))
