"""Import an ATen-level FX graph (what aot_autograd hands a compiler) into the IR.

ATen ops become `core.*` nodes 1:1; `seqweave::attention[_backward]` become
`attn.sdpa[_backward]`, `seqweave::linear_attention[_backward]` `attn.linear[_backward]`;
`operator.getitem` on a multi-result op selects a result.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from seqweave.errors import CaptureError
from seqweave.frontend.custom_ops import ATTENTION_BACKWARD_OP, ATTENTION_OP
from seqweave.frontend.linear_ops import LINEAR_ATTENTION_BACKWARD_OP, LINEAR_ATTENTION_OP
from seqweave.frontend.patterns import layer_name
from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.ops.core import core_name
from seqweave.ir.ops.scalar import scalar_op_name
from seqweave.ir.positions import parse_positions
from seqweave.ir.types import ScalarType, TensorType, ValueType


def _value_type(value: Any) -> ValueType:
    if isinstance(value, torch.Tensor):
        return TensorType.of(value.shape, value.dtype)
    if isinstance(value, (torch.SymInt, int)):
        return ScalarType("int")
    if isinstance(value, (torch.SymFloat, float)):
        return ScalarType("float")
    if isinstance(value, (torch.SymBool, bool)):
        return ScalarType("bool")
    if value is None:  # e.g. convolution_backward's grad_input when the input needs none
        return ScalarType("none")
    raise CaptureError(f"cannot type a value of kind {type(value).__name__}", hint="report this graph")


def _clean(name: str) -> str:
    return re.sub(r"[^\w.]", "_", name)


def _layer_of(node: fx.Node) -> str:
    return layer_name(node) if node.meta.get("nn_module_stack") else ""


class _Importer:
    def __init__(self, name: str) -> None:
        self.graph = Graph(name, [], [], ())
        self.env: dict[fx.Node, Any] = {}
        self.constants: list[tuple[Value, torch.Tensor]] = []

    def convert(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            converted = [self.convert(item) for item in arg]
            return tuple(converted) if isinstance(arg, tuple) else converted
        if isinstance(arg, dict):
            return {key: self.convert(item) for key, item in arg.items()}
        return arg

    def constant(self, node: fx.Node, gm: fx.GraphModule) -> None:
        """A tensor the graph holds (a lifted constant) becomes a trailing graph input; its value
        is bound when the graph runs (`ImportedGraph.constants`)."""
        value = _attribute(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"graph attribute {node.target!r} is a {type(value).__name__}, not a tensor "
                               "(control flow or a nested graph reached the backend)",
                               hint="compile with fullgraph=True on code without torch.cond / nested modules, "
                                    "or report this graph")
        self.env[node] = Value(_clean(node.name), _value_type(value))
        self.constants.append((self.env[node], value))

    def placeholder(self, node: fx.Node) -> None:
        value = Value(_clean(node.name), _value_type(node.meta["val"]))
        self.graph.inputs.append(value)
        self.env[node] = value

    def call(self, node: fx.Node) -> None:
        if node.target is operator.getitem and isinstance(self.env.get(node.args[0]), list):
            self.env[node] = self.env[node.args[0]][node.args[1]]
            return
        op, args, kwargs = self._op_and_args(node)
        val = node.meta.get("val")
        multi = isinstance(val, (tuple, list))
        vals = list(val) if multi else [val]
        if op == "attn.linear_backward" and len(args) == 4:
            vals = vals[:3]  # no gate, no gate gradient (the custom op returns an empty placeholder)
        names = [_clean(node.name) + (f"_{i}" if multi else "") for i in range(len(vals))]
        results = [Value(n, _value_type(v)) for n, v in zip(names, vals)]
        ir_node = Node(op, args, kwargs, results, loc=_layer_of(node))
        for result in results:
            result.producer = ir_node
        self.graph.nodes.append(ir_node)
        self.env[node] = results if multi else results[0]

    def _op_and_args(self, node: fx.Node) -> tuple[str, tuple, dict]:
        args, kwargs = self.convert(tuple(node.args)), self.convert(dict(node.kwargs))
        if node.target is ATTENTION_OP:
            q, k, v, operands, *attributes = _with_defaults(args, kwargs, 4)
            return "attn.sdpa", (q, k, v, list(operands)), _attn_kwargs(k, *attributes)
        if node.target is ATTENTION_BACKWARD_OP:
            dout, q, k, v, out, lse, operands, *attributes = _with_defaults(args, kwargs, 7)
            return "attn.sdpa_backward", (dout, q, k, v, out, lse, list(operands)), _attn_kwargs(k, *attributes)
        if node.target is LINEAR_ATTENTION_OP:
            q, k, v, decay, scale, layer, gate, recurrence = _linear_arguments(args, kwargs, 3)
            tensors = (q, k, v) + ((gate,) if gate is not None else ())
            return "attn.linear", tensors, _linear_kwargs(decay, scale, layer, recurrence)
        if node.target is LINEAR_ATTENTION_BACKWARD_OP:
            dout, q, k, v, decay, scale, layer, gate, recurrence = _linear_arguments(args, kwargs, 4)
            tensors = (dout, q, k, v) + ((gate,) if gate is not None else ())
            return "attn.linear_backward", tensors, _linear_kwargs(decay, scale, layer, recurrence)
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten":
            return core_name(node.target), args, kwargs
        if node.target is torch.ops.prims.convert_element_type.default:  # decompositions under dynamic shapes
            return "core._to_copy", args[:1], {"dtype": args[1]}
        if (scalar := scalar_op_name(node.target)) and not kwargs:  # size arithmetic under dynamic shapes
            return scalar, args, kwargs
        raise CaptureError(f"unsupported FX node {node.format_node()}",
                           hint="seqweave imports ATen ops only; dynamic shapes are not supported yet "
                                "(use dynamic=False)")


#: the attention ops' trailing attributes and their defaults (see `frontend.custom_ops`)
_ATTRIBUTES = (("mask", None), ("score_mod", None), ("scale", None), ("positions", "none"), ("layer", -1))


def _with_defaults(args: tuple, kwargs: dict, tensors: int) -> list:
    """The op's arguments in schema order, attributes the call left out at their defaults."""
    given = list(args)
    for name, default in _ATTRIBUTES[len(given) - tensors:]:
        given.append(kwargs.get(name, default))
    return given


def _attn_kwargs(k: Value, mask: str, score_mod: str, scale: float, positions: str, layer: int) -> dict:
    """The IR attributes, typed: the custom op's text arguments parsed once, here."""
    attributes = {"mask": parse_mask(mask), "score_mod": parse_score_mod(score_mod), "scale": float(scale),
                  "kv_heads": int(k.type.shape[1])}
    if positions != "none":
        attributes["positions"] = parse_positions(positions)
    if layer >= 0:
        attributes["layer"] = int(layer)
    return attributes


def _linear_arguments(args: tuple, kwargs: dict, tensors: int) -> list:
    """`seqweave::linear_attention[_backward]`'s arguments in schema order, defaults filled in."""
    given = list(args)
    defaults = (("decay", None), ("scale", None), ("layer", -1), ("gate", None), ("recurrence", "decay"))
    for name, default in defaults[len(given) - tensors:]:
        given.append(kwargs.get(name, default))
    return given


def _linear_kwargs(decay: list, scale: float, layer: int, recurrence: str) -> dict:
    attributes = {"decay": [float(s) for s in decay], "scale": float(scale)}
    if layer >= 0:
        attributes["layer"] = int(layer)
    if recurrence != "decay":
        attributes["recurrence"] = recurrence
    return attributes


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner: Any = gm
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


@dataclass
class ImportedGraph:
    """An imported graph and the constant tensors bound to its trailing inputs, in order."""

    graph: Graph
    constants: list[torch.Tensor]


def import_fx(gm: fx.GraphModule, name: str) -> ImportedGraph:
    """The IR graph of an ATen FX GraphModule; constants it holds become its last inputs."""
    importer = _Importer(name)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            importer.placeholder(node)
        elif node.op == "get_attr":
            importer.constant(node, gm)
        elif node.op == "call_function":
            importer.call(node)
        elif node.op == "output":
            importer.graph.outputs = importer.convert(node.args[0])
        else:
            raise CaptureError(f"unsupported FX node kind {node.op} ({node.format_node()})", hint="report this graph")
    importer.graph.inputs += [value for value, _ in importer.constants]
    return ImportedGraph(importer.graph, [tensor for _, tensor in importer.constants])
