"""`saved-views`: a training forward that saves a tensor and a permuted copy of it saves the copy once.

Attention modules write `out.transpose(1, 2).contiguous()` (or `.reshape`) before the output
projection. Autograd then keeps both the attention output (its backward reads it) and the
contiguous copy (the projection's backward reads that): the same numbers twice. Eager
PyTorch's CPU and flash kernels happen to return `out` already laid out as the copy, so
`.contiguous()` is free there; seqweave's kernels return it dense, and the copy is real.
This pass saves `permute(copy, inverse)` in place of `out`: the same values, a view of
memory that is saved anyway, so `out` dies as soon as the copy is made.

Invariants: only pure permutations (transpose / permute, through detach and alias) are
undone, so the replacement is the saved value element for element; it fires only when the
copy's memory is itself saved (otherwise it would keep the copy alive for nothing); user
outputs are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.types import TensorType
from seqweave.ir.aliasing import storage_root
from seqweave.passes.base import Pass, PassResult

#: views that return their operand unchanged
SAME = frozenset({"core.detach", "core.alias"})


def _permutation(node: Node) -> list[int] | None:
    """The dim order a transpose / permute node's result reads its operand in; None otherwise."""
    rank = len(node.args[0].type.shape)
    if node.op == "core.transpose.int":
        order = list(range(rank))
        a, b = (d % rank for d in node.args[1:3])
        order[a], order[b] = order[b], order[a]
        return order
    if node.op == "core.permute":
        return [d % rank for d in node.args[1]]
    if node.op in SAME:
        return list(range(rank))
    return None


def _permuted_from(value: Value, root: Value) -> list[int] | None:
    """If `value` is `root` read through permutations only, the combined dim order; else None."""
    order: list[int] | None = list(range(len(value.type.shape)))
    while value is not root:
        producer = value.producer
        step = _permutation(producer) if producer is not None else None
        if step is None:
            return None
        order = [step[d] for d in order]
        value = producer.args[0]
    return order


def _copies_of(graph: Graph, root: Value, saved_roots: set[Value]) -> list[tuple[Node, list[int]]]:
    """`clone` nodes whose operand is `root` permuted, and whose result's memory is saved."""
    found = []
    for node in graph.nodes:
        if node.op != "core.clone" or node.results[0] not in saved_roots:
            continue
        order = _permuted_from(node.args[0], root)
        if order is not None and order != list(range(len(order))):
            found.append((node, order))
    return found


@dataclass(frozen=True)
class SavedViews(Pass):
    """Outputs from `saved_from` on are the activations a training forward saves for its backward."""

    name = "saved-views"
    saved_from: int = 0

    def run(self, graph: Graph) -> PassResult:
        if not isinstance(graph.outputs, (tuple, list)) or len(graph.output_values()) != len(graph.outputs):
            return PassResult(0, "outputs are not a flat list of saved values")
        outputs = graph.output_values()
        saved = outputs[self.saved_from:]
        user = set(outputs[:self.saved_from])
        saved_roots = {storage_root(value) for value in saved}
        rewrites = 0
        for position, value in enumerate(saved):
            root = storage_root(value)
            if root in user or root.producer is None or _permuted_from(value, root) != list(range(len(value.type.shape))):
                continue
            copies = _copies_of(graph, root, saved_roots)
            if copies:
                self._save_through(graph, self.saved_from + position, *copies[0])
                rewrites += 1
        return PassResult(rewrites, f"{rewrites} saved activations read from a saved permuted copy")

    @staticmethod
    def _save_through(graph: Graph, output_index: int, copy: Node, order: list[int]) -> None:
        """Output `output_index` becomes `permute(copy, inverse(order))`, built right after the copy."""
        inverse = [order.index(d) for d in range(len(order))]
        node = Node("core.permute", (copy.results[0], inverse), {}, [], copy.loc)
        copied = copy.results[0].type  # permuted by hand: symbolic sizes have no meta kernel to infer from
        result_type = TensorType(tuple(copied.shape[d] for d in inverse), copied.dtype, copied.placements)
        result = Value(graph.fresh_name("saved_view"), result_type, node)
        node.results = [result]
        graph.nodes.insert(graph.nodes.index(copy) + 1, node)
        flat = list(graph.outputs)  # a training forward's outputs are a flat tuple
        flat[output_index] = result
        graph.outputs = type(graph.outputs)(flat)
