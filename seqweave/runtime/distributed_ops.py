"""Implementations of the ops that talk to other ranks (`sp.gather`, `sp.all_reduce`,
`attn.ring`, `attn.lasp2`, ...), bound to a Communicator when a sharded graph is lowered."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from seqweave.ir.graph import Node
from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.ops.attn_positions import positional_backward, positional_forward
from seqweave.ir.ops.sp import split_factor
from seqweave.ir.positions import NoPositions, PositionSpec, parse_positions
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.sharding import Layout, RingPlan, plan_ring, shard_positions
from seqweave.runtime.comm import Communicator
from seqweave.runtime.hybrid import HybridCommunicator, hybrid_attention_backward, hybrid_attention_forward
from seqweave.ir.ops.linear_recurrences import REFERENCE as LINEAR_REFERENCE
from seqweave.ir.ops.linear_recurrences import Recurrence
from seqweave.runtime.lasp2 import lasp2_backward, lasp2_forward, run_table
from seqweave.runtime.local_attention import REFERENCE, LocalAttention
from seqweave.runtime.sequence_parallel import (ring_attention_backward, ring_attention_forward,
                                                ulysses_attention_backward, ulysses_attention_forward)


def _positions_of(layout: str, world: int, length: int) -> Callable[[int], torch.Tensor]:
    return lambda rank: shard_positions(Layout(layout), rank, world, length)


@dataclass(frozen=True)
class AttentionSetup:
    """What every distributed attention op takes besides tensors, prepared once at lowering."""

    mask: MaskSpec
    score_mod: ScoreMod
    scale: float
    plan: RingPlan
    positions_of: Callable[[int], torch.Tensor]
    kernels: LocalAttention


def _attention_setup(kw: dict[str, Any], kernels: LocalAttention) -> AttentionSetup:
    mask = parse_mask(kw["mask"])
    plan = plan_ring(mask, Layout(kw["layout"]), kw["world"], kw["length"])
    return AttentionSetup(mask, parse_score_mod(kw["score_mod"]), kw["scale"], plan,
                          _positions_of(kw["layout"], kw["world"], kw["length"]), kernels)


# Attention ops get an AttentionSetup, computed once when the graph is lowered
# (parsing the mask and planning the ring are not per-step work).

def ring(comm: Communicator, step: int, s: AttentionSetup, q, k, v, operands, **kw: Any) -> tuple[torch.Tensor, ...]:
    return ring_attention_forward(comm, q, k, v, s.mask, s.score_mod, s.scale, s.plan, s.positions_of, operands,
                                  kernels=s.kernels)


def ring_backward(comm: Communicator, step: int, s: AttentionSetup, dout, q, k, v, out, lse, operands,
                  **kw: Any) -> tuple[torch.Tensor, ...]:
    return ring_attention_backward(comm, dout, q, k, v, out, lse, s.mask, s.score_mod, s.scale, s.plan,
                                   s.positions_of, operands, kernels=s.kernels)


def ulysses(comm: Communicator, step: int, s: AttentionSetup, q, k, v, operands,
            **kw: Any) -> tuple[torch.Tensor, ...]:
    return ulysses_attention_forward(comm, q, k, v, s.mask, s.score_mod, s.scale, s.positions_of, operands,
                                     kernels=s.kernels)


def ulysses_backward(comm: Communicator, step: int, s: AttentionSetup, dout, q, k, v, out, lse, operands,
                     **kw: Any) -> tuple[torch.Tensor, ...]:
    return ulysses_attention_backward(comm, dout, q, k, v, out, lse, s.mask, s.score_mod, s.scale,
                                      s.positions_of, operands, kernels=s.kernels)


def _hybrid(comm: Communicator) -> tuple[Communicator, Communicator]:
    if not isinstance(comm, HybridCommunicator):
        raise TypeError("attn.hybrid needs a HybridCommunicator (Mesh(ulysses=U, ring=R))")
    return comm.inner, comm.outer


def hybrid(comm: Communicator, step: int, s: AttentionSetup, q, k, v, operands,
           **kw: Any) -> tuple[torch.Tensor, ...]:
    return hybrid_attention_forward(*_hybrid(comm), q, k, v, s.mask, s.score_mod, s.scale, s.positions_of,
                                    operands, kernels=s.kernels)


def hybrid_backward(comm: Communicator, step: int, s: AttentionSetup, dout, q, k, v, out, lse, operands,
                    **kw: Any) -> tuple[torch.Tensor, ...]:
    return hybrid_attention_backward(*_hybrid(comm), dout, q, k, v, out, lse, s.mask, s.score_mod, s.scale,
                                     s.positions_of, operands, kernels=s.kernels)


def gather(comm: Communicator, step: int, node: Node, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Every rank's rows, put back at their global positions (undoing zigzag / striping).

    One all-gather into a [world, *x] buffer; when the ranks' rows already follow one another
    in global order (contiguous layout, nothing before the sequence dim) that buffer is the
    result, else one copy puts rows in place. Padding rows are dropped by a view.
    """
    dim, inner, length, world = kw["dim"], kw["inner"], kw["length"], kw["world"]
    stacked = comm.all_gather(x, step, f"gather of %{node.results[0].name}")
    shape = list(x.shape)
    shape[dim] *= world
    split = split_factor(tuple(shape), dim, length, inner)
    local_shape = split_factor(tuple(x.shape), dim, length // world, inner)  # [..., outer, N'/P, inner, ...]
    if kw["layout"] == "none" and math.prod(local_shape[:dim + 1]) == 1:
        whole = stacked.view(split)  # nothing before the positions: rank-major order is global order
    else:
        whole = x.new_empty(split)
        positions_of = _positions_of(kw["layout"], world, length)
        for rank in range(world):
            positions = positions_of(rank).to(x.device)  # planned on the CPU; CUDA refuses a CPU index
            whole.index_copy_(dim + 1, positions, stacked[rank].view(local_shape))
        del stacked
    true_length = kw.get("true_length", length)
    whole = whole.narrow(dim + 1, 0, true_length)  # drop padding rows (a view)
    shape[dim] = shape[dim] * true_length // length
    return whole.reshape(shape)


def all_reduce(comm: Communicator, step: int, node: Node, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    return comm.all_reduce(x.clone(), step, f"all_reduce of %{node.results[0].name}")


def _lasp2(comm: Communicator, step: int, node: Node, linear: dict[str, Recurrence]) -> Callable[..., Any]:
    """attn.lasp2 / its backward bound to `comm`, the run table planned once here."""
    kw = node.kwargs
    table = run_table(_positions_of(kw["layout"], kw["world"], kw["length"]), kw["world"])
    name = kw.get("recurrence", "decay")
    recurrence = linear[name]
    if node.op == "attn.lasp2_backward":
        return lambda dout, q, k, v, gate=None, **_: lasp2_backward(comm, step, name, recurrence, dout, q, k, v, gate,
                                                                   kw["decay"], kw["scale"], table)
    return lambda q, k, v, gate=None, **_: lasp2_forward(comm, step, name, recurrence, q, k, v, gate, kw["decay"],
                                                        kw["scale"], table)


DISTRIBUTED_OPS: dict[str, Callable[..., Any]] = {"attn.ring": ring, "attn.ring_backward": ring_backward,
                                                  "attn.ulysses": ulysses, "attn.ulysses_backward": ulysses_backward,
                                                  "attn.hybrid": hybrid, "attn.hybrid_backward": hybrid_backward,
                                                  "sp.gather": gather, "sp.all_reduce": all_reduce,
                                                  "attn.lasp2": _lasp2, "attn.lasp2_backward": _lasp2}


def bind(comm: Communicator, step: int, node: Node, kernels: LocalAttention = REFERENCE,
         linear: dict[str, Recurrence] = LINEAR_REFERENCE) -> Callable[..., Any]:
    """The step function of a distributed node: its implementation bound to `comm`, with the
    attention ops' mask, score mod and ring plan prepared once here, running `kernels` (linear
    attention: `linear`) locally."""
    implementation = DISTRIBUTED_OPS[node.op]
    if node.op.startswith("attn.lasp2"):
        return _lasp2(comm, step, node, linear)
    if not node.op.startswith("attn."):
        return functools.partial(implementation, comm, step, node)
    setup = _attention_setup(node.kwargs, kernels)
    spec = parse_positions(node.kwargs.get("positions", "none"))
    if isinstance(spec, NoPositions):
        return functools.partial(implementation, comm, step, setup)
    return _with_positions(implementation, comm, step, setup, spec, node)


def _with_positions(implementation: Callable[..., Any], comm: Communicator, step: int, setup: AttentionSetup,
                    spec: PositionSpec, node: Node) -> Callable[..., Any]:
    """A distributed attention carrying positions: this rank rotates its own rows of q and k by
    their global positions before anything is sent, and its gradients back after
    (`ir.ops.attn_positions`); a far rotation runs the op once more under its own ring plan."""
    setups = {setup.mask: setup}

    def setup_for(mask: MaskSpec) -> AttentionSetup:
        if mask not in setups:
            kw = node.kwargs
            setups[mask] = replace(setup, mask=mask, plan=plan_ring(mask, Layout(kw["layout"]), kw["world"],
                                                                   kw["length"]))
        return setups[mask]

    rank = comm.rank  # a HybridCommunicator's own group is the world: its rank is the global one
    rows = setup.positions_of(rank)
    if node.op.endswith("_backward"):
        def run_backward(dout, q, k, v, out, lse, operands, **kw):
            attend_backward = lambda dout_, q_, k_, v_, out_, lse_, mask: implementation(  # noqa: E731
                comm, step, setup_for(mask), dout_, q_, k_, v_, out_, lse_, operands)
            return positional_backward(attend_backward, dout, q, k, v, out, lse, setup.mask, spec, operands,
                                       rows, rows)
        return run_backward

    def run(q, k, v, operands, **kw):
        attend = lambda q_, k_, v_, mask: implementation(comm, step, setup_for(mask), q_, k_, v_, operands)  # noqa: E731
        return positional_forward(attend, q, k, v, setup.mask, spec, operands, rows, rows)
    return run
