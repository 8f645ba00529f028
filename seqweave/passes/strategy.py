"""`choose_strategy`: the sequence-parallel form of one attention layer with the fewest bytes sent.

The one chooser: the compiler (`attention="auto"`), `seqweave explain --sp` and the demo all
call it with the same inputs (mask, shapes, layout, whether the mesh has hybrid groups), so
what is explained is what runs. Candidates are the dense ring, the mask-aware ring ("halo",
when its plan under the layout that will run skips sends), Ulysses and, on a hybrid mesh,
hybrid for every U | P; the figures come from `cost.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from seqweave.ir.mask import MaskSpec, Operands, Sinks
from seqweave.ir.sharding import Layout, RingPlan, padded_length, plan_ring
from seqweave.passes.cost import (BATCH, ELEMENT_BYTES, HEAD_DIM, KV_HEADS, Q_HEADS, SEQ_LEN, WORLD, CostEstimate,
                                  Strategy, estimate_for, hybrid_label, evaluate_expr, hybrid_bytes, plan_skips,
                                  ring_bytes, ulysses_bytes)


@dataclass(frozen=True)
class LayerShape:
    """Concrete numbers of one attention layer on `world` ranks (`seq_len` before padding)."""

    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    world: int
    element_bytes: int = 2

    def values(self, seq_len: int | None = None) -> dict[str, int]:
        """Keyword values for `CostEstimate.evaluate` (N = `seq_len`, default the unpadded length)."""
        return {BATCH.name: self.batch, SEQ_LEN.name: self.seq_len if seq_len is None else seq_len,
                Q_HEADS.name: self.q_heads, KV_HEADS.name: self.kv_heads, HEAD_DIM.name: self.head_dim,
                WORLD.name: self.world, ELEMENT_BYTES.name: self.element_bytes}


@dataclass(frozen=True)
class StrategyChoice:
    """The cheapest strategy, why, and what every candidate costs (bytes per device per layer)."""

    strategy: Strategy
    estimate: CostEstimate
    reason: str
    candidates: tuple[tuple[str, int], ...]
    seq_len: int                      # padded length the figures are for
    ulysses_size: int = 1             # ranks per all-to-all group (P for ulysses)
    plan: RingPlan | None = None      # the ring schedule (halo, hybrid)


@dataclass(frozen=True)
class _Candidate:
    strategy: Strategy
    label: str
    forward: sympy.Expr
    backward: sympy.Expr
    ulysses_size: int = 1
    plan: RingPlan | None = None


def head_split_problem(q_heads: int, kv_heads: int, group: int, name: str = "P") -> str | None:
    """Why heads cannot be split evenly over `group` ranks (named `name` in the message), or None."""
    if q_heads % group:
        return f"Hq={q_heads} is not divisible by {name}={group} (Hq % {name} = {q_heads % group})"
    if kv_heads % group and group % kv_heads:
        return (f"Hkv={kv_heads} neither divides nor is a multiple of {name}={group}: "
                "K/V heads can be neither split nor replicated evenly")
    return None


def _head_split_candidate(mask: MaskSpec, layout: Layout, seq_len: int, group: int, world: int) -> _Candidate:
    """Ulysses (group == world) or hybrid with a mask-aware ring across world // group groups."""
    if group == world:
        return _Candidate(Strategy.ULYSSES, Strategy.ULYSSES.value, ulysses_bytes(),
                          ulysses_bytes(backward=True), group)
    rings = world // group
    plan = plan_ring(mask, layout, rings, seq_len)
    return _Candidate(Strategy.HYBRID, hybrid_label(group, rings), hybrid_bytes(group, rings, plan),
                      hybrid_bytes(group, rings, plan, backward=True), group, plan)


def _candidates(mask: MaskSpec, shape: LayerShape, layout: Layout, seq_len: int,
                hybrid: bool) -> tuple[list[_Candidate], list[str]]:
    """Every applicable strategy, and a line for each one refused."""
    found = [_Candidate(Strategy.RING, Strategy.RING.value, ring_bytes(), ring_bytes(backward=True))]
    # The ring runs under the plan of the layout it will run with: with a window narrower than
    # a shard (contiguous layout) it stops forwarding what no later rank needs.
    plan = plan_ring(mask, layout, shape.world, seq_len)
    if plan_skips(plan):
        found.append(_Candidate(Strategy.HALO, Strategy.HALO.value, ring_bytes(plan),
                                ring_bytes(plan, backward=True), plan=plan))
    refused = []
    groups = range(2, shape.world + 1) if hybrid else [shape.world] if shape.world > 1 else []
    for group in (g for g in groups if shape.world % g == 0):
        is_ulysses = group == shape.world
        problem = head_split_problem(shape.q_heads, shape.kv_heads, group, "P" if is_ulysses else "U")
        if problem is None:
            found.append(_head_split_candidate(mask, layout, seq_len, group, shape.world))
        else:
            label = Strategy.ULYSSES.value if is_ulysses else hybrid_label(group, shape.world // group)
            refused.append(f"{label} refused: {problem}")
    return found, refused


def choose_strategy(mask: MaskSpec, shape: LayerShape, layout: Layout = Layout.ZIGZAG, *,
                    training: bool = True, operands: Operands | None = None,
                    hybrid: bool = False) -> StrategyChoice:
    """The strategy sending the fewest bytes from the busiest device (forward, + backward if `training`).

    Candidates: dense ring, halo (the ring under `plan_ring` for `layout`, when it skips sends),
    ulysses (refused when Hq % P != 0 or K/V heads do not split), and with `hybrid` (a mesh
    with Ulysses groups) hybrid for every U | P. Ties go to the earlier of that order. The mask
    is the one the ranks run: when N is padded to split, padding keys are hidden (`& sinks(N)`).
    Overlap of communication with compute is not modelled.
    """
    seq_len = padded_length(shape.seq_len, shape.world, layout)
    if seq_len != shape.seq_len:
        mask = mask & Sinks(shape.seq_len)
    values = shape.values(seq_len)
    found, refused = _candidates(mask, shape, layout, seq_len, hybrid)
    costs = [evaluate_expr(c.forward + (c.backward if training else 0), **values) for c in found]
    best = found[costs.index(min(costs))]
    estimate = estimate_for(best.label, best.forward, best.backward, mask, seq_len, operands)
    listed = tuple((c.label, cost) for c, cost in zip(found, costs))
    return StrategyChoice(best.strategy, estimate, _reason(best.label, listed, refused, training),
                          listed, seq_len, best.ulysses_size, best.plan)


def _reason(label: str, listed: tuple[tuple[str, int], ...], refused: list[str], training: bool) -> str:
    what = "forward+backward" if training else "forward"
    costs = ", ".join(f"{name} {cost:,}" for name, cost in listed)
    return "; ".join([f"{label} sends the fewest bytes per device per layer ({what}): {costs}", *refused])
