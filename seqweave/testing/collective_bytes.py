"""What `passes.cost` says a sharded graph sends, to hold simulated byte counters to it.

The cost model prices each attention strategy (ring under its mask-aware plan, Ulysses,
hybrid) and each gather; here those formulas are evaluated at one sharded graph's shapes, for
a run at `element_bytes` per floating element (8 under `simulate` in float64), over all ranks
together (the busiest rank's share is a sympy Max, slow to build per program). An attention
carrying a far rotation runs twice, once per set of pairs (`ir.ops.attn_positions`), so it
is priced once per branch. Where the model does not apply (value head dim unlike the key's,
linear attention) `expected_bytes` says so by leaving the entry out.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy
import torch

from seqweave.ir.graph import Graph, Node
from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.ops.attn import positions_of
from seqweave.ir.positions import Rope
from seqweave.ir.sharding import Layout, hybrid_plan, plan_ring, shard_positions
from seqweave.ir.types import TensorType
from seqweave.passes.cost import (BATCH, ELEMENT_BYTES, HEAD_DIM, KV_HEADS, Q_HEADS, SEQ_LEN, WORLD, gather_bytes,
                                  hybrid_bytes, ring_bytes, ulysses_bytes)

ATTENTION_STRATEGIES = {"attn.ring": "ring", "attn.ring_backward": "ring", "attn.ulysses": "ulysses",
                        "attn.ulysses_backward": "ulysses", "attn.hybrid": "hybrid", "attn.hybrid_backward": "hybrid"}


@dataclass(frozen=True)
class ExpectedBytes:
    """Bytes the model predicts: `attention` over all ranks together (None where the model does not
    apply); `gather` and `all_reduce` per rank (every rank sends the same)."""

    attention: int | None
    gather: int
    all_reduce: int


def expected_bytes(graph: Graph, element_bytes: int = 8) -> ExpectedBytes:
    """The model's bytes for the sharded `graph`, run with `element_bytes` per floating element."""
    priced = [_attention_bytes(node, element_bytes) for node in graph.nodes if node.op in ATTENTION_STRATEGIES]
    attention = None if None in priced else sum(priced)
    gather = sum(_gather_bytes(node, element_bytes) for node in graph.nodes if node.op == "sp.gather")
    reduce = sum(_local_bytes(node.args[0].type, element_bytes) for node in graph.nodes if node.op == "sp.all_reduce")
    return ExpectedBytes(attention, gather, reduce)


def _local_bytes(value_type: TensorType, element_bytes: int) -> int:
    size = element_bytes if value_type.dtype.is_floating_point else value_type.dtype.itemsize
    return math.prod(value_type.concrete_shape()) * size


def _gather_bytes(node: Node, element_bytes: int) -> int:
    return int(gather_bytes(_local_bytes(node.args[0].type, element_bytes), node.kwargs["world"]))


def _branch_masks(node: Node) -> list[MaskSpec]:
    spec = positions_of(node)
    far = [_mask(spec.far)] if isinstance(spec, Rope) and spec.far else []
    return [_mask(node.kwargs["mask"]), *far]


def _mask(value: MaskSpec | str) -> MaskSpec:
    """A mask attribute, whether the IR holds it as a MaskSpec value or as its text."""
    return value if isinstance(value, MaskSpec) else parse_mask(value)


def _attention_bytes(node: Node, element_bytes: int) -> int | None:
    """Bytes all ranks send for one distributed attention (the model's `total`)."""
    backward = node.op.endswith("_backward")
    first = 1 if backward else 0
    q, k, v = (node.args[first + i].type for i in range(3))
    if int(v.shape[3]) != int(k.shape[3]) or int(q.shape[3]) != int(k.shape[3]):
        return None  # the model prices one head dim for q, k and v
    kw = node.kwargs
    values = {BATCH: int(q.shape[0]), SEQ_LEN: kw["length"], Q_HEADS: int(q.shape[1]), KV_HEADS: int(k.shape[1]),
              HEAD_DIM: int(k.shape[3]), WORLD: kw["world"], ELEMENT_BYTES: element_bytes}
    layout = Layout(kw["layout"])
    formulas = [_formula(ATTENTION_STRATEGIES[node.op], mask, layout, kw["world"], kw["length"], kw.get("ulysses", 1),
                         backward) for mask in _branch_masks(node)]
    return sum(_evaluated(formula, values) for formula in formulas)


def _evaluated(formula: sympy.Expr, values: dict) -> int:
    """`formula` at `values`, exactly (`xreplace`: a few times faster than `evaluate_expr`'s subs)."""
    result = sympy.sympify(formula).xreplace({symbol: sympy.Integer(v) for symbol, v in values.items()})
    if not result.is_Integer:
        raise ValueError(f"cost {formula} = {result} at {values} is not a whole number of bytes")
    return int(result)


@functools.lru_cache(maxsize=4096)
def _formula(strategy: str, mask: MaskSpec, layout: Layout, world: int, length: int, ulysses: int,
             backward: bool) -> sympy.Expr:
    """The model's bytes over all ranks (built once per configuration: sympy is slow to build)."""
    if strategy == "ulysses":
        return ulysses_bytes(backward=backward, total=True)
    if strategy == "ring":
        return ring_bytes(plan_ring(mask, layout, world, length), backward=backward, total=True)
    plan = hybrid_plan(mask, lambda rank: shard_positions(layout, rank, world, length), ulysses, world // ulysses)
    return hybrid_bytes(ulysses, world // ulysses, plan, backward=backward, total=True)


def float64_only(graph: Graph) -> bool:
    """Every floating tensor in the graph is float64, so a float64 run moves what its types say."""
    return all(value.type.dtype == torch.float64 for value in graph.values()
               if isinstance(value.type, TensorType) and value.type.dtype.is_floating_point)
