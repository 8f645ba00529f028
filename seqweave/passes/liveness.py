"""Which bytes a lowered graph holds at each node, read from the graph alone.

The runtime (`runtime.program`) frees a value's slot after its last reader, and memory goes
back when no live slot views it any more. So a storage (a value that owns its memory, with
every view of it) is live from the node that makes it to the last node that reads any of
its views, or to the end when a view of it is an output. `profile` gives, per node, the
bytes live while that node runs (its operands and its fresh results together): the figure
the dispatch-level accounting (`runtime.live_bytes`) measures, up to what an op allocates
inside itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from seqweave.graph_bytes import tensor_bytes
from seqweave.ir.aliasing import storage_root
from seqweave.ir.graph import Graph, Value
from seqweave.ir.ops import op_def


@dataclass(frozen=True)
class Lifetime:
    """A storage's bytes and the node indices it is live over (-1: from before the first node;
    `len(nodes)`: to the end, as or behind an output)."""

    nbytes: int
    start: int
    end: int


def storage_lifetimes(graph: Graph, inputs: bool = True) -> dict[Value, Lifetime]:
    """Every storage of `graph` keyed by its root value (graph inputs too when `inputs`)."""
    roots: dict[Value, Value] = {}
    for value in graph.values():
        roots[value] = storage_root(value)
    start = {value: -1 for value in graph.inputs} if inputs else {}
    end: dict[Value, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.results:
            root = roots[value]
            start.setdefault(root, index)
            end[root] = max(end.get(root, index), index)
        for operand in node.operands:
            end[roots[operand]] = max(end.get(roots[operand], index), index)
    for value in graph.output_values():
        end[roots[value]] = len(graph.nodes)
    return {root: Lifetime(tensor_bytes(root), first, end.get(root, first))
            for root, first in start.items() if tensor_bytes(root)}


def readers_by_storage(graph: Graph) -> dict[Value, list[int]]:
    """For each storage root, the indices of the nodes that read it or a view of it, in order."""
    found: dict[Value, list[int]] = {}
    for index, node in enumerate(graph.nodes):
        for root in {id(r): r for r in map(storage_root, node.operands)}.values():
            found.setdefault(root, []).append(index)
    return found


def profile(graph: Graph, lifetimes: dict[Value, Lifetime], exclude: set[Value] = frozenset()) -> list[int]:
    """Bytes live while each node runs, over the storages in `lifetimes` not in `exclude`, plus
    what the node allocates inside itself (`OpDef.workspace`)."""
    delta = [0] * (len(graph.nodes) + 2)
    for root, life in lifetimes.items():
        if root in exclude:
            continue
        delta[max(life.start, 0)] += life.nbytes
        delta[min(life.end, len(graph.nodes)) + 1] -= life.nbytes
    live, running = [], 0
    for index, node in enumerate(graph.nodes):
        running += delta[index]
        live.append(running + op_def(node.op).workspace(node))
    return live
