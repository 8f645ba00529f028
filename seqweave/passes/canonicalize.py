"""`canonicalize`: fold ops that return their input unchanged, then drop dead pure nodes.

Invariants: the graph's outputs are never replaced by an alias of another value (the
caller may rely on them being fresh), nor is a copy folded when an output is a view of
it; collectives and mutating ops are never removed, and every fold is decided from
types alone (no data is looked at).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from seqweave.ir.aliasing import view_sources
from seqweave.ir.graph import Graph, Node, Value, map_values, values_in
from seqweave.ir.ops import op_def
from seqweave.ir.types import TensorType
from seqweave.passes.base import Pass, PassResult


def _same_type_as_input(node: Node) -> bool:
    source = node.args[0]
    return isinstance(source, Value) and isinstance(source.type, TensorType) and \
        source.type.shape == node.results[0].type.shape and source.type.dtype == node.results[0].type.dtype


def _plain_copy(node: Node) -> bool:
    """`clone` / `_to_copy` that change nothing: no layout, device or memory-format request."""
    allowed = {"dtype", "layout", "device"} if node.op == "core._to_copy" else set()
    if set(node.kwargs) - allowed or len(node.args) != 1:
        return False
    return node.kwargs.get("layout") is None and node.kwargs.get("device") is None and _same_type_as_input(node)


#: ops whose result is fresh memory, unlike their operand's
COPY_OPS = frozenset({"core.clone", "core._to_copy"})

#: op name -> predicate: "this node returns its first operand unchanged".
IDENTITY_RULES: dict[str, Callable[[Node], bool]] = {
    "core.alias": _same_type_as_input,
    "core.clone": _plain_copy,
    "core._to_copy": _plain_copy,
    "core.view": _same_type_as_input,
    "core.reshape": _same_type_as_input,
    "core._unsafe_view": _same_type_as_input,
    "core.expand": _same_type_as_input,
}


def _viewed(graph: Graph) -> set[Value]:
    """Values some node may return a view of. A copy among these stays a copy: the view may
    need the copy's fresh dense layout (`x[:, ::2].clone().view(-1)`), and an output that
    views it must not share memory with the copy's source."""
    return {source for node in graph.nodes for source in view_sources(node)}


def _foldable(node: Node, outputs: set[Value], viewed: set[Value]) -> bool:
    rule = IDENTITY_RULES.get(node.op)
    if rule is None or node.results[0] in outputs or not rule(node):
        return False
    return not (node.op in COPY_OPS and node.results[0] in viewed)


def _fold_once(graph: Graph) -> int:
    """One sweep in program order: readers are pointed past folded nodes as they are reached,
    so the sweep is linear in the graph size."""
    outputs, viewed = set(graph.output_values()), _viewed(graph)
    replacement: dict[Value, Value] = {}

    def resolve(value: Value) -> Value:
        while value in replacement:
            value = replacement[value]
        return value

    kept: list[Node] = []
    for node in graph.nodes:
        node.args, node.kwargs = map_values(node.args, resolve), map_values(node.kwargs, resolve)
        if _foldable(node, outputs, viewed):
            replacement[node.results[0]] = node.args[0]
        else:
            kept.append(node)
    graph.nodes = kept
    graph.outputs = map_values(graph.outputs, resolve)
    return len(replacement)


def _fold_identities(graph: Graph) -> int:
    """Fold until nothing folds: folding a same-shape view can free the copy it was viewing."""
    total = 0
    while folded := _fold_once(graph):
        total += folded
    return total


def _remove_dead(graph: Graph) -> int:
    live = set(graph.output_values())
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(result in live for result in node.results) or not op_def(node.op).pure:
            kept.append(node)
            live.update(node.operands)
    removed = len(graph.nodes) - len(kept)
    graph.nodes = kept[::-1]
    return removed


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Fold identity ops and remove dead pure nodes."""

    name = "canonicalize"

    def run(self, graph: Graph) -> PassResult:
        removed = _remove_dead(graph)  # first, so dead readers cannot keep a copy; folding kills nothing
        folded = _fold_identities(graph)
        return PassResult(folded + removed, f"{folded} folded, {removed} dead")
