"""Reference executor: runs any graph with each op's plain-torch `reference()`."""
from __future__ import annotations

from typing import Any, Sequence

from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.ops import op_def


def bind_results(node: Node, result: Any, env: dict[Value, Any]) -> None:
    """Store an op's return value: one result, or a tuple/list with one item per result."""
    if not isinstance(result, (tuple, list)):
        env[node.results[0]] = result
        return
    if len(result) != len(node.results) or not node.results:
        raise RuntimeError(f"{node.op} returned {len(result)} values for {len(node.results)} results")
    for value, item in zip(node.results, result):
        env[value] = item


def run_node(node: Node, env: dict[Value, Any]) -> None:
    args = map_values(node.args, env.__getitem__)
    kwargs = map_values(node.kwargs, env.__getitem__)
    bind_results(node, op_def(node.op).reference(node, *args, **kwargs), env)


def interpret(graph: Graph, inputs: Sequence[Any]) -> Any:
    """Run `graph` on `inputs`; returns the outputs template filled with values."""
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[Value, Any] = dict(zip(graph.inputs, inputs))
    for node in graph.nodes:
        run_node(node, env)
    return map_values(graph.outputs, env.__getitem__)
