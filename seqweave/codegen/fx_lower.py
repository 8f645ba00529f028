"""Lower an IR graph back to an FX graph for Inductor.

`core.*` nodes become calls of their ATen overload and `scalar.*` nodes of their Python
function, so Inductor sees the regions between attentions as the ops they are and fuses them.
Every other node (attention on one device or over ranks, collectives) becomes a
`seqweave::extern` call running exactly what the eager step list runs for it
(`codegen.lower.implementation`), ordered by a token (`codegen.extern_op`).

The FX graph takes the IR graph's inputs and then the first token, and returns the final
token then every value of the IR outputs in order (`values_in`), which `LoweredFx.outputs`
puts back into the IR's output template.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from seqweave.codegen.extern_op import ExternCall, ExternTable, running
from seqweave.codegen.lower import implementation
from seqweave.errors import SeqweaveError
from seqweave.ir.graph import Graph, Node, Value, map_values, values_in
from seqweave.ir.ops.core import CORE_PREFIX, aten_overload
from seqweave.ir.ops.scalar import SCALAR_PREFIX, scalar_op
from seqweave.ir.types import TensorType
from seqweave.runtime.comm import Communicator


class NotLowerable(SeqweaveError):
    """This graph cannot go to Inductor (it runs on the eager step list instead)."""


@dataclass
class LoweredFx:
    """An IR graph as an FX module, the extern calls it makes, and how to read its outputs."""

    module: fx.GraphModule
    table: ExternTable
    graph: Graph

    def __call__(self, inputs: list[Any]) -> Any:
        """Run the FX module as it is, uncompiled: what Inductor is handed, for tests and debugging."""
        with running(self.table):
            flat = self.module(*inputs, torch.empty(0))
        return self.outputs(list(flat))

    def outputs(self, flat: list[Any]) -> Any:
        """The IR output template filled from the module's flat results (the token dropped)."""
        found = dict(zip(_unique(values_in(self.graph.outputs)), flat[1:]))
        return map_values(self.graph.outputs, found.__getitem__)


def to_fx(graph: Graph, comm: Communicator | None = None) -> LoweredFx:
    """The FX form of `graph`; raises NotLowerable for what Inductor cannot take."""
    _refuse_size_inputs(graph)
    _refuse_memory_plans(graph)
    fx_graph, table = fx.Graph(), ExternTable()
    env: dict[Value, fx.Node] = {value: fx_graph.placeholder(f"in_{i}") for i, value in enumerate(graph.inputs)}
    token = fx_graph.placeholder("token")
    for index, node in enumerate(graph.nodes):
        if node.op.startswith(CORE_PREFIX):
            _bind_results(fx_graph, env, node, _call_aten(fx_graph, env, node), _returns_sequence(node))
        elif node.op.startswith(SCALAR_PREFIX):
            env[node.result()] = fx_graph.call_function(scalar_op(node.op).function, _operands(node.args, env))
        else:
            token = _call_extern(fx_graph, env, node, table.add(_extern_call(node, index, comm)), token)
    flat = [env[value] for value in _unique(values_in(graph.outputs))]
    fx_graph.output([token, *flat])
    return LoweredFx(fx.GraphModule(torch.nn.Module(), fx_graph, class_name=f"seqweave_{graph.name}"), table, graph)


def _refuse_size_inputs(graph: Graph) -> None:
    """A graph taking sizes as inputs (dynamo made them symbolic) is called with new values each
    time: compiled at one value it would be wrong at the next."""
    sizes = [value for value in graph.inputs if not isinstance(value.type, TensorType) or not value.type.is_static()]
    if sizes:
        raise NotLowerable(f"it takes symbolic sizes (%{sizes[0].name}: {sizes[0].type}"
                           f"{f' and {len(sizes) - 1} more' if len(sizes) > 1 else ''})")


def _refuse_memory_plans(graph: Graph) -> None:
    """A memory plan (`mem.*` ops) is exact against the eager runtime's allocations: its host
    arenas are written through views, and its peak was planned op by op. Inductor plans its
    own buffers, so a planned graph keeps the runtime that the plan was made for."""
    planned = sorted({node.op for node in graph.nodes if node.op.startswith("mem.")})
    if planned:
        raise NotLowerable(f"it carries an activation-memory plan ({', '.join(planned)}), made for the eager runtime")


def _unique(values: list[Value]) -> list[Value]:
    return list(dict.fromkeys(values))


def _operands(template: Any, env: dict[Value, fx.Node]) -> Any:
    return map_values(template, env.__getitem__)


def _call_aten(fx_graph: fx.Graph, env: dict[Value, fx.Node], node: Node) -> fx.Node:
    return fx_graph.call_function(aten_overload(node.op), _operands(node.args, env), _operands(node.kwargs, env))


def _returns_sequence(node: Node) -> bool:
    """Whether the ATen op returns several values (a tuple, or one list) rather than one tensor."""
    returns = aten_overload(node.op)._schema.returns
    return len(returns) != 1 or isinstance(returns[0].type, torch.ListType)


def _bind_results(fx_graph: fx.Graph, env: dict[Value, fx.Node], node: Node, call: fx.Node, sequence: bool) -> None:
    if not sequence:
        env[node.result()] = call
        return
    for position, value in enumerate(node.results):
        env[value] = fx_graph.call_function(operator.getitem, (call, position))


def _extern_call(node: Node, index: int, comm: Communicator | None) -> ExternCall:
    """The node's eager implementation, called with its tensor operands in first-use order."""
    operands = _unique(node.operands)
    for value in [*operands, *node.results]:
        if not (isinstance(value.type, TensorType) and value.type.is_static()):
            raise NotLowerable(f"{node.op} {'reads' if value in operands else 'makes'} %{value.name} of type "
                               f"{value.type}: extern calls take and return static tensors")
    run_node = implementation(node, index, comm)
    count = len(node.results)

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        by_value = dict(zip(operands, tensors))
        result = run_node(*map_values(node.args, by_value.__getitem__), **map_values(node.kwargs, by_value.__getitem__))
        return [result] if count == 1 and not isinstance(result, (tuple, list)) else list(result)[:count]

    types = tuple((value.type.concrete_shape(), value.type.dtype) for value in node.results)
    label = f"{node.op} -> %{node.results[0].name}" if node.results else node.op
    return ExternCall(label, run, types)


def _call_extern(fx_graph: fx.Graph, env: dict[Value, fx.Node], node: Node, index: int, token: fx.Node) -> fx.Node:
    """`[*results, token] = seqweave::extern(index, [token, *operands])`; returns the new token."""
    operands = [env[value] for value in _unique(node.operands)]
    call = fx_graph.call_function(torch.ops.seqweave.extern.default, (index, [token, *operands]))
    for position, value in enumerate(node.results):
        env[value] = fx_graph.call_function(operator.getitem, (call, position))
    return fx_graph.call_function(operator.getitem, (call, len(node.results)))
