"""FLOPs of one IR node, roughly: what recomputing it costs and how much compute a copy can hide behind.

Matrix products count 2·M·N·K; attention 4·B·H·Sq·Skv·D forward and 2.5x that backward
(halved under a causal mask); everything else one FLOP per result element. Good enough to
rank choices; the exact figures of attention live in `passes.cost`.
"""
from __future__ import annotations

import math

from seqweave.ir.graph import Node
from seqweave.ir.types import TensorType

MATMULS = frozenset({"core.mm", "core.bmm", "core.addmm", "core.matmul", "core.baddbmm"})


def _shape(value) -> tuple[int, ...] | None:
    kind = getattr(value, "type", None)
    if not isinstance(kind, TensorType) or not kind.is_static():
        return None
    return tuple(kind.concrete_shape())


def _attention_flops(node: Node) -> float:
    first = 1 if node.op.endswith("_backward") else 0
    q, k = _shape(node.args[first]), _shape(node.args[first + 1])
    if q is None or k is None or len(q) != 4:
        return 0.0
    batch, heads, queries, dim = q
    flops = 4.0 * batch * heads * queries * k[2] * dim
    if "causal" in str(node.kwargs.get("mask", "")):
        flops /= 2
    return flops * (2.5 if first else 1.0)


def is_attention(node: Node) -> bool:
    """Single-device, sharded and linear attention ops, forward or backward."""
    return node.op.startswith("attn.")


def node_flops(node: Node) -> float:
    if is_attention(node):
        return _attention_flops(node)
    outputs = [shape for shape in map(_shape, node.results) if shape is not None]
    elements = float(sum(math.prod(shape) for shape in outputs))
    if node.op in MATMULS:
        operand = _shape(node.args[-1] if node.op != "core.addmm" else node.args[2])
        inner = operand[-2] if operand and len(operand) >= 2 else 1
        return 2.0 * elements * inner
    return elements
