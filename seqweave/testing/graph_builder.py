"""`GraphBuilder`: appends typed nodes to a graph, each result typed by its op's own `infer()`.

Shared by the hypothesis strategies (`strategies.py`) and the program generator (`programs.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.ops import op_def
from seqweave.ir.types import ScalarType, TensorType


@dataclass
class GraphBuilder:
    """Appends typed nodes to a graph; result types are inferred by each op's definition.

    `meta` holds a meta tensor per core value with the strides eager torch would give it,
    so that `view` is only drawn where it is valid in the graph as built (a view of a
    copy may be valid only because the copy made the tensor dense).
    """

    graph: Graph
    meta: dict[Value, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def new(name: str) -> "GraphBuilder":
        return GraphBuilder(Graph(name, [], [], ()))

    def input(self, shape: tuple[int, ...], dtype: torch.dtype) -> Value:
        value = Value(self.graph.fresh_name(f"x{len(self.graph.inputs)}"), TensorType.of(shape, dtype))
        self.graph.inputs.append(value)
        self.meta[value] = torch.empty(shape, dtype=dtype, device="meta")
        return value

    def node(self, op: str, args: tuple, kwargs: dict | None = None) -> list[Value]:
        """Append `op(*args, **kwargs)` and return its results, typed by `op_def(op).infer`."""
        node = Node(op, args, dict(kwargs or {}), [])
        overload = getattr(op_def(op), "overload", None)
        if overload is None:
            types, metas = op_def(op).infer(node), None
        else:  # a core op's infer() runs it on meta tensors: run it once, on the strides the values have
            metas = self._run_on_meta(node, overload)
            types = [TensorType.from_tensor(t) if isinstance(t, torch.Tensor) else ScalarType("none") for t in metas]
        if types is None:
            raise ValueError(f"strategy bug: {op} could not infer types for {args} {kwargs}")
        stem = f"{op.split('.')[1]}{len(self.graph.nodes)}"
        self.graph.nodes.append(node)  # first, so that fresh_name sees each result as it is added
        for value_type in types:
            node.results.append(Value(self.graph.fresh_name(stem), value_type, node))
        for value, meta in zip(node.results, metas or [self._dense(v) for v in node.results]):
            if isinstance(meta, torch.Tensor):
                self.meta[value] = meta
        return node.results

    def one(self, op: str, args: tuple, kwargs: dict | None = None) -> Value:
        return self.node(op, args, kwargs)[0]

    def tensors(self) -> list[Value]:
        return [value for value in self.graph.values() if isinstance(value.type, TensorType)]

    def viewable(self, value: Value, shape: tuple[int, ...]) -> bool:
        """Whether `aten.view(value, shape)` works on the strides `value` really has."""
        try:
            self.meta[value].view(shape)
        except RuntimeError:
            return False
        return True

    def _run_on_meta(self, node: Node, overload: Any) -> list:
        result = overload(*map_values(node.args, self.meta.__getitem__),
                          **map_values(node.kwargs, self.meta.__getitem__))
        return list(result) if isinstance(result, (tuple, list)) else [result]

    @staticmethod
    def _dense(value: Value) -> torch.Tensor | None:
        """Dialect ops return dense tensors of their inferred types."""
        if not isinstance(value.type, TensorType):
            return None
        return torch.empty(value.type.concrete_shape(), dtype=value.type.dtype, device="meta")
