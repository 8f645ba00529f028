"""Cost model of one sequence-parallel attention layer: bytes each device sends, and FLOPs.

Every figure is a sympy expression in the symbols below, so a pass can compare strategies
symbolically, print the formula, or evaluate it for concrete shapes. Conventions:

* bytes are bytes *sent* by one device, the busiest rank, unless ``total=True`` (sum over ranks),
  counted as runtime/sequence_parallel.py sends them (its `Communicator.bytes_sent`);
* N is the padded sequence length (``padded_length``), split evenly over the ranks;
* e is bytes per element of q, k, v, out and dq, dk, dv; lse and the ring's travelling dK/dV
  accumulators are fp32 (fp64 for fp64 attention): ACCUM_BYTES = max(e, 4);
* forward and backward are separate; the backward recomputes scores from the saved LSE
  (flash style) and re-sends what it needs rather than keeping every shard it saw.

Strategies (PAPERS.md, "Sequence parallelism for softmax attention"):

* ring: each rank keeps its queries; the K/V shards travel the ring r -> r+1, one hop a step;
* halo: the same ring under a ``RingPlan`` that stops forwarding a shard once no later rank
  needs it (a causal sliding window narrower than a shard needs one hop, not P-1);
* ulysses: all-to-all from sequence-sharded to head-sharded q, k, v, full attention on
  Hq/P heads, all-to-all of the output back;
* hybrid (USP): ulysses inside groups of U ranks, ring across the R = P/U groups;
* lasp2 (linear attention): one all-gather of each run's d x Dv state in the forward, of
  states and state gradients together in the backward; independent of N.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from types import MappingProxyType

import sympy
import torch

from seqweave.ir.graph import Graph
from seqweave.ir.mask import MaskSpec, Operands
from seqweave.ir.mask_pairs import allowed_pairs
from seqweave.ir.sharding import RingPlan


def _symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, positive=True, integer=True)


BATCH = _symbol("B")
SEQ_LEN = _symbol("N")
Q_HEADS = _symbol("Hq")
KV_HEADS = _symbol("Hkv")
HEAD_DIM = _symbol("D")
WORLD = _symbol("P")
ELEMENT_BYTES = _symbol("e")
#: symbol name -> symbol; the keyword names `CostEstimate.evaluate` accepts
SYMBOLS = MappingProxyType({s.name: s for s in (BATCH, SEQ_LEN, Q_HEADS, KV_HEADS, HEAD_DIM, WORLD, ELEMENT_BYTES)})

FLOPS_PER_MAC = 2
FORWARD_MATMULS = 2        # S = Q Kᵀ, O = softmax(S) V
BACKWARD_MATMULS = 5       # recompute S, dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q
KV_TENSORS = 2             # K and V travel together (and dK, dV in the backward)
FP32_BYTES = 4
#: bytes per element of dK/dV accumulators and lse on the wire: fp32, fp64 for fp64 attention
ACCUM_BYTES = sympy.Max(ELEMENT_BYTES, FP32_BYTES)
#: Ulysses, D-vectors per token per head through the all-to-alls. Forward: q in and out back
#: per query head; k, v in per K/V head. Backward: dO, q, out in and dQ back; k, v in, dK, dV back.
A2A_SLABS_FORWARD = 2
A2A_SLABS_BACKWARD = 4
COST_FIELDS = ("forward_bytes", "backward_bytes", "forward_flops", "backward_flops")


class Strategy(enum.Enum):
    """How one attention layer is spread over the sequence-parallel ranks."""

    RING = "ring"
    HALO = "halo"
    ULYSSES = "ulysses"
    HYBRID = "hybrid"


# ------------------------------------------------------------------ estimates


@dataclass(frozen=True)
class CostEstimate:
    """Per-layer cost of one strategy: bytes sent by the busiest device and FLOPs over all devices."""

    strategy: str
    forward_bytes: sympy.Expr
    backward_bytes: sympy.Expr
    forward_flops: sympy.Expr
    backward_flops: sympy.Expr

    def evaluate(self, **values: int) -> dict[str, int]:
        """Every field as an int for concrete symbol values, e.g. ``evaluate(B=1, N=4096, ...)``."""
        return {name: evaluate_expr(getattr(self, name), **values) for name in COST_FIELDS}


def evaluate_expr(expr: sympy.Expr | int, **values: int) -> int:
    """``expr`` at the given symbol values (names as in SYMBOLS); must come out a whole number."""
    unknown = sorted(set(values) - set(SYMBOLS))
    if unknown:
        raise ValueError(f"unknown symbol(s) {unknown}; the cost model's symbols are {sorted(SYMBOLS)}")
    result = sympy.sympify(expr).subs({SYMBOLS[name]: value for name, value in values.items()})
    missing = sorted(str(s) for s in result.free_symbols)
    if missing:
        raise ValueError(f"cost {expr} still depends on {missing}; pass a value for each")
    if not result.is_integer:
        raise ValueError(f"cost {expr} = {result} is not a whole number of bytes / FLOPs at {values}; "
                         "N must be a multiple of P (pad with padded_length) and heads split evenly")
    return int(result)


def estimate_for(label: str, forward: sympy.Expr, backward: sympy.Expr, mask: MaskSpec,
              seq_len: int | sympy.Expr, operands: Operands | None) -> CostEstimate:
    """A CostEstimate with N replaced by `seq_len` everywhere (a no-op while it is the symbol N)."""
    return CostEstimate(label, sympy.sympify(forward).subs(SEQ_LEN, seq_len),
                        sympy.sympify(backward).subs(SEQ_LEN, seq_len),
                        attention_flops(mask, seq_len, operands=operands),
                        attention_flops(mask, seq_len, backward=True, operands=operands))


def ring_estimate(mask: MaskSpec, plan: RingPlan | None = None, *, seq_len: int | sympy.Expr = SEQ_LEN,
                  operands: Operands | None = None) -> CostEstimate:
    """Ring attention, as a dense ring (no plan) or under a mask-aware plan ("halo" when it skips sends)."""
    label = Strategy.HALO.value if plan is not None and plan_skips(plan) else Strategy.RING.value
    return estimate_for(label, ring_bytes(plan), ring_bytes(plan, backward=True), mask, seq_len, operands)


def ulysses_estimate(mask: MaskSpec, *, seq_len: int | sympy.Expr = SEQ_LEN,
                     operands: Operands | None = None) -> CostEstimate:
    """Ulysses over all P ranks."""
    return estimate_for(Strategy.ULYSSES.value, ulysses_bytes(), ulysses_bytes(backward=True), mask, seq_len,
                     operands)


def hybrid_estimate(mask: MaskSpec, ulysses_size: int, ring_size: int, plan: RingPlan | None = None, *,
                    seq_len: int | sympy.Expr = SEQ_LEN, operands: Operands | None = None) -> CostEstimate:
    """Ulysses inside groups of `ulysses_size` ranks, ring (optionally planned) across `ring_size` groups."""
    forward = hybrid_bytes(ulysses_size, ring_size, plan)
    backward = hybrid_bytes(ulysses_size, ring_size, plan, backward=True)
    return estimate_for(hybrid_label(ulysses_size, ring_size), forward, backward, mask, seq_len, operands)


def hybrid_label(ulysses_size: int, ring_size: int) -> str:
    return f"{Strategy.HYBRID.value}(u={ulysses_size}, r={ring_size})"


# ---------------------------------------------------------------------- bytes


def kv_heads_effective(group: int | sympy.Expr = WORLD) -> sympy.Expr:
    """K/V heads after replication for a head split over `group` ranks: max(Hkv, group).

    Ulysses splits heads, and every rank needs at least one K/V head: with fewer K/V heads
    than ranks (GQA/MQA, Hkv < group) each is replicated group/Hkv times before the all-to-all
    (`repeat_interleave`), so `group` heads travel instead of Hkv, and their dK/dV travel back
    before the replicas are summed (needs group % Hkv == 0; Hkv >= group needs Hkv % group == 0).
    """
    return sympy.Max(KV_HEADS, group)


def ring_message_elements(world: int | sympy.Expr = WORLD, kv_heads: sympy.Expr = KV_HEADS) -> sympy.Expr:
    """Elements in one ring message: one rank's K and V (or dK and dV) shards, 2·B·(N/P)·Hkv·D."""
    return KV_TENSORS * BATCH * SEQ_LEN / sympy.sympify(world) * kv_heads * HEAD_DIM


def _path_end(plan: RingPlan, source: int) -> int:
    """The last rank that holds `source`'s K/V: follow plan.sends hop by hop from the source."""
    holder, step = source, 0
    while step < plan.world - 1 and plan.sends[step][holder]:
        holder, step = (holder + 1) % plan.world, step + 1
    return holder


def ring_kv_messages(plan: RingPlan) -> tuple[int, ...]:
    """K/V messages each rank sends under `plan`: rank r sends at step t iff plan.sends[t][r].

    The backward sends the same K/V messages again (it re-circulates K/V).
    """
    return tuple(sum(row[rank] for row in plan.sends) for rank in range(plan.world))


def ring_grad_messages(plan: RingPlan) -> tuple[int, ...]:
    """dK/dV messages each rank sends in the backward (runtime/sequence_parallel.py).

    The dK/dV accumulator of a shard starts at its owner and travels with its K/V; the last
    holder returns it home in one more message. So: one per K/V message, plus one for every
    other rank's shard whose path ends here.
    """
    homes = [0] * plan.world
    for source in range(plan.world):
        end = _path_end(plan, source)
        homes[end] += end != source
    return tuple(kv + home for kv, home in zip(ring_kv_messages(plan), homes))


def _busiest(counts: list[tuple[int, int]], kv_bytes: sympy.Expr, grad_bytes: sympy.Expr) -> sympy.Expr:
    """max over ranks of kv·kv_bytes + grads·grad_bytes (ranks dominated in both counts dropped)."""
    front = {c for c in counts if not any(o != c and o[0] >= c[0] and o[1] >= c[1] for o in counts)}
    return sympy.Max(*(kv * kv_bytes + grads * grad_bytes for kv, grads in sorted(front)), 0)


def _ring_traffic(plan: RingPlan | None, world: sympy.Expr, elements: sympy.Expr, backward: bool,
                  total: bool) -> sympy.Expr:
    """Ring bytes sent by the busiest rank, or by all ranks when `total`; K/V in e, dK/dV in ACCUM_BYTES."""
    kv_bytes, grad_bytes = elements * ELEMENT_BYTES, elements * ACCUM_BYTES
    if plan is None:
        grads = world - 1 + sympy.Min(world - 1, 1) if backward else 0  # travelling + one return home
        per_rank = (world - 1) * kv_bytes + grads * grad_bytes
        return per_rank * world if total else per_rank
    kv = ring_kv_messages(plan)
    grads = ring_grad_messages(plan) if backward else (0,) * plan.world
    if total:
        return sum(kv) * kv_bytes + sum(grads) * grad_bytes
    return _busiest(list(zip(kv, grads)), kv_bytes, grad_bytes)


def plan_skips(plan: RingPlan) -> bool:
    """True when the plan forwards fewer shards than the dense ring's P·(P-1)."""
    return plan.sends_total() < plan.world * (plan.world - 1)


def ring_bytes(plan: RingPlan | None = None, *, backward: bool = False, total: bool = False) -> sympy.Expr:
    """Ring attention bytes sent per device (the busiest rank), or over all ranks when `total`.

    One message is M = 2·B·(N/P)·Hkv·D elements (a rank's K and V shards). Forward: K/V in e
    bytes, (P-1)·M·e dense; under a plan the busiest rank's count of plan.sends (total:
    plan.sends_total()), P = plan.world. Backward, as runtime/sequence_parallel.py runs it: K/V
    again, plus dK/dV (fp32 accumulators, fp64 for fp64: ACCUM_BYTES) beside every K/V hop and
    one message home from the end of each path: dense (P-1)·M·e + P·M·max(e, 4).
    """
    world = WORLD if plan is None else sympy.Integer(plan.world)
    return _ring_traffic(plan, world, ring_message_elements(world), backward, total)


def _all_to_all_bytes(group: sympy.Expr, ranks: sympy.Expr, backward: bool) -> sympy.Expr:
    """Per device: a rank keeps 1/group of every [B, N/ranks, heads, D] slab and sends the rest."""
    slabs = A2A_SLABS_BACKWARD if backward else A2A_SLABS_FORWARD
    per_token = (slabs * (Q_HEADS + kv_heads_effective(group)) * HEAD_DIM * ELEMENT_BYTES
                 + Q_HEADS * ACCUM_BYTES)  # + lse, one fp32 (fp64) per query head
    return (group - 1) / group * BATCH * SEQ_LEN / ranks * per_token


def ulysses_bytes(*, backward: bool = False, total: bool = False) -> sympy.Expr:
    """Ulysses bytes sent per device (or over all ranks when `total`), as runtime/sequence_parallel.py runs it.

    Forward: (P-1)/P·B·(N/P)·[(Hq + 2·Hkv_eff)·D·e] for q, k, v in, plus (P-1)/P·B·(N/P)·
    [Hq·D·e + Hq·max(e, 4)] for out and lse back, Hkv_eff = max(Hkv, P) (`kv_heads_effective`).
    Backward: dO, q, k, v, out, lse in and dQ, dK, dV back: (P-1)/P·B·(N/P)·[4·(Hq + Hkv_eff)·D·e
    + Hq·max(e, 4)]; the head-sharded forward operands are not kept, so q, k, v, out travel again.
    """
    per_device = _all_to_all_bytes(WORLD, WORLD, backward)
    return per_device * WORLD if total else per_device


def hybrid_bytes(ulysses_size: int, ring_size: int, plan: RingPlan | None = None, *,
                 backward: bool = False, total: bool = False) -> sympy.Expr:
    """USP: Ulysses inside groups of U = `ulysses_size` ranks, ring across R = `ring_size` groups.

    The composition of the two runtimes' traffic (no hybrid runtime yet): Ulysses' all-to-alls
    over U ranks holding N/(U·R) tokens each, then a ring over R ranks (dense, or as `plan`, a
    plan over R ranks, says) whose messages carry N/R tokens and Hkv_eff/U heads,
    Hkv_eff = max(Hkv, U). U = P gives ulysses_bytes, R = P gives ring_bytes.
    """
    if plan is not None and plan.world != ring_size:
        raise ValueError(f"hybrid ring across {ring_size} groups got a RingPlan for {plan.world} ranks; "
                         f"build it with plan_ring(mask, layout, {ring_size}, seq_len)")
    u, r = sympy.Integer(ulysses_size), sympy.Integer(ring_size)
    all_to_all = _all_to_all_bytes(u, u * r, backward) * (u * r if total else 1)
    elements = ring_message_elements(r, kv_heads_effective(u) / u)
    return all_to_all + _ring_traffic(plan, r, elements, backward, total) * (u if total else 1)


def attention_flops(mask: MaskSpec, seq_len: int | sympy.Expr = SEQ_LEN, *, backward: bool = False,
                    operands: Operands | None = None) -> sympy.Expr:
    """FLOPs of one attention layer over all devices: 4·B·Hq·D·pairs forward, 10·B·Hq·D·pairs backward.

    pairs = N² x the fraction of pairs the mask allows (skipped tiles cost nothing); the
    backward's five matmuls against the forward's two give the usual 2.5x.
    """
    matmuls = BACKWARD_MATMULS if backward else FORWARD_MATMULS
    return FLOPS_PER_MAC * matmuls * BATCH * Q_HEADS * HEAD_DIM * allowed_pairs(mask, seq_len, operands)


# ------------------------------------------------------------ choosing a strategy


# ------------------------------------------------------------------ linear attention (LASP-2)


def lasp2_bytes(*, batch: int | sympy.Expr = BATCH, heads: int | sympy.Expr = Q_HEADS,
                head_dim: int | sympy.Expr = HEAD_DIM, value_dim: int | sympy.Expr = HEAD_DIM,
                world: int | sympy.Expr = WORLD, runs: int = 1, state_bytes: int | sympy.Expr = 4,
                backward: bool = False, recurrence: str = "decay") -> sympy.Expr:
    """Bytes one rank sends for one LASP-2 pass: (P-1) copies of its `runs` end states of
    B·H·D·Dv elements (fp32, fp64 for fp64), with their state gradients in the backward, and
    each run's transition unless it is a constant decay (GLA: B·H·D, delta rule: B·H·D·D).
    N does not appear: that is the point of LASP-2. `runs` is 1 for a contiguous layout and 2
    for zigzag (`runtime.lasp2.RunTable.width`)."""
    state = sympy.sympify(batch) * heads * head_dim * value_dim
    transition = {"decay": 0, "gla": sympy.sympify(batch) * heads * head_dim,
                  "delta": sympy.sympify(batch) * heads * head_dim * head_dim}[recurrence]
    return (world - 1) * runs * (state * (2 if backward else 1) + transition) * state_bytes


def graph_lasp2_bytes(graph: Graph, runs: int) -> int:
    """Bytes one rank sends for every `attn.lasp2` and its backward in a sharded graph."""
    total = 0
    for node in graph.nodes:
        if node.op in ("attn.lasp2", "attn.lasp2_backward"):
            first = 1 if node.op.endswith("_backward") else 0
            q, v = node.args[first].type, node.args[first + 2].type
            batch, heads, _, head_dim = (int(d) for d in q.shape)
            total += int(lasp2_bytes(batch=batch, heads=heads, head_dim=head_dim, value_dim=int(v.shape[3]),
                                     world=node.kwargs["world"], runs=runs,
                                     state_bytes=8 if q.dtype == torch.float64 else 4,
                                     backward=first == 1, recurrence=node.kwargs.get("recurrence", "decay")))
    return total


# ------------------------------------------------------------------ gathers of whole values


def gather_bytes(local_bytes: int | sympy.Expr, world: int | sympy.Expr = WORLD) -> sympy.Expr:
    """Bytes one rank sends to gather a value it holds `local_bytes` of: its shard to every other rank."""
    return (world - 1) * sympy.sympify(local_bytes)


def graph_gather_bytes(graph: Graph) -> int:
    """Bytes one rank sends for every `sp.gather` in a sharded graph (outputs and values kept whole)."""
    total = 0
    for node in graph.nodes:
        if node.op == "sp.gather":
            local = node.args[0].type
            total += int(gather_bytes(math.prod(local.concrete_shape()) * local.dtype.itemsize, node.kwargs["world"]))
    return total
