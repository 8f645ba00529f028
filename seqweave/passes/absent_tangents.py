"""`absent-tangents`: a backward whose caller did not differentiate some outputs.

When a model returns logits next to its loss and the caller backpropagates the loss only,
autograd would hand the backward a full-size zero gradient for the logits ([B, N, vocab]:
1 GiB at 8k tokens). seqweave asks autograd not to materialise it (the tangent arrives as
None) and compiles a backward variant in which those tangent inputs are zero: the zeros are
propagated through the ops they make zero (`mm`, `mul`, views, sums, ...) and dropped where
they are added (`x + 0 -> x`), so nothing of their size is computed.

Invariants: a rewrite is decided from op names and types alone; a zero that reaches an
output (the gradient of a parameter only the absent output depended on) becomes None there,
which autograd reads as zero, and which leaves that `.grad` as eager leaves it (None); a zero
that reaches an op with no rule cannot be eliminated, and the pass leaves that input untouched
(the caller then feeds a real zero tensor), so the result is exact either way.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.passes.base import Pass, PassResult

#: ops whose result is zero when any tensor operand is zero (products and contractions)
ZERO_IF_ANY = frozenset({"core.mm", "core.bmm", "core.mul.Tensor", "core.matmul"})
#: ops whose result is zero when their first operand is (views, copies, reductions, scaling)
ZERO_IF_FIRST = frozenset({
    "core.view", "core.reshape", "core._unsafe_view", "core.permute", "core.transpose.int", "core.t",
    "core.expand", "core.slice.Tensor", "core.select.int", "core.unsqueeze", "core.squeeze.dim",
    "core.squeeze.dims", "core.clone", "core._to_copy", "core.neg", "core.sum.dim_IntList", "core.sum",
    "core.mean.dim", "core.div.Tensor", "core.div.Scalar", "core.mul.Scalar", "core.alias",
    "core.contiguous", "core.detach"})
#: `a + b` (alpha 1) and `a - b`: a zero `b` (or zero `a` for add) leaves the other operand
ADDITIONS = frozenset({"core.add.Tensor", "core.sub.Tensor"})


class _Blocked(Exception):
    """A zero reached an op that must read real data."""


@dataclass(frozen=True)
class AbsentTangents(Pass):
    """Treat the backward inputs at `inputs` (indices) as zero and remove what they make trivial."""

    name = "absent-tangents"
    inputs: tuple[int, ...] = ()

    def run(self, graph: Graph) -> PassResult:
        removable = [index for index in self.inputs if _eliminable(graph, {graph.inputs[index]})]
        if not removable:
            return PassResult(0, "no absent tangent can be removed without materialising it")
        rewrites = _eliminate(graph, {graph.inputs[index] for index in removable})
        return PassResult(rewrites, f"inputs {removable} are zero: {rewrites} ops removed")

    def eliminable(self, graph: Graph) -> tuple[int, ...]:
        """Which of `inputs` this pass can remove from `graph` (the rest must be fed zeros)."""
        return tuple(index for index in self.inputs if _eliminable(graph, {graph.inputs[index]}))


def _zero_result(node: Node, zero: set[Value]) -> bool:
    tensors = [operand for operand in node.operands]
    if node.op in ZERO_IF_ANY:
        return any(operand in zero for operand in tensors)
    return node.op in ZERO_IF_FIRST and isinstance(node.args[0], Value) and node.args[0] in zero


def _passes_through(node: Node, zero: set[Value]) -> Value | None:
    """For `x + 0`, `0 + x`, `x - 0` of x's own type: x; else None."""
    if node.op not in ADDITIONS or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    first, second = node.args
    if not (isinstance(first, Value) and isinstance(second, Value)):
        return None
    other = first if second in zero else second if (first in zero and node.op == "core.add.Tensor") else None
    if other is None or other in zero or other.type != node.results[0].type:
        return None
    return other


def _plan(graph: Graph, zero: set[Value]) -> tuple[set[Node], dict[Value, Value]]:
    """Nodes to drop and values to replace; raises _Blocked when a zero must be materialised."""
    zero = set(zero)
    dropped: set[Node] = set()
    replaced: dict[Value, Value] = {}
    for node in graph.nodes:
        operands = [replaced.get(v, v) for v in node.operands]
        if not any(operand in zero for operand in operands):
            continue
        remapped = Node(node.op, map_values(node.args, lambda v: replaced.get(v, v)), node.kwargs, node.results)
        through = _passes_through(remapped, zero)
        if through is not None:
            replaced[node.results[0]] = through
        elif _zero_result(remapped, zero) and len(node.results) == 1:
            zero.add(node.results[0])
        else:
            raise _Blocked(node.op)
        dropped.add(node)
    return dropped, replaced, zero


def _eliminable(graph: Graph, zero: set[Value]) -> bool:
    try:
        _plan(graph, zero)
    except _Blocked:
        return False
    return True


def _eliminate(graph: Graph, zero: set[Value]) -> int:
    dropped, replaced, zero = _plan(graph, zero)
    resolve = lambda value: replaced.get(value, value)  # noqa: E731 (chains resolve in graph order)
    for node in graph.nodes:
        node.args = map_values(node.args, resolve)
        node.kwargs = map_values(node.kwargs, resolve)
    graph.outputs = map_values(graph.outputs, lambda value: None if resolve(value) in zero else resolve(value))
    graph.nodes = [node for node in graph.nodes if node not in dropped]
    return len(dropped)
