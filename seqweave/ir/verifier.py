"""Graph invariants checked between passes: SSA, known and well-formed ops, re-inferred
types and consistent mesh placements. `verify(graph)` raises on the first violation."""
from __future__ import annotations

from typing import Any, Hashable, Iterable

import sympy

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.ops import OpDef, VerificationError, op_def
from seqweave.ir.ops.base import fail
from seqweave.ir.types import Shard, TensorType, ValueType

__all__ = ["VerificationError", "verify"]


def _graph_error(graph: Graph, message: str) -> VerificationError:
    return VerificationError(f"graph {graph.name}: {message}")


def _define(graph: Graph, defined: dict[str, Value], value: Value, where: str) -> None:
    """Record a definition; a second value with the same name (or the same value twice) breaks SSA."""
    if value.name in defined:
        raise _graph_error(graph, f"%{value.name} is defined twice (again {where}); "
                                  "rename one of them, e.g. with graph.fresh_name")
    defined[value.name] = value


def _check_defined(graph: Graph, defined: dict[str, Value], value: Value, reader: str) -> None:
    """`value` must be the very Value object defined earlier under its name."""
    if defined.get(value.name) is value:
        return
    what = "is not defined before this use" if value.name not in defined else \
        "is a different Value than the one defined under that name"
    raise _graph_error(graph, f"{reader} reads %{value.name}, which {what}; "
                              "define it (graph input or earlier node) before reading it, in program order")


def _check_operands(graph: Graph, defined: dict[str, Value], node: Node) -> None:
    for operand in node.operands:
        try:
            _check_defined(graph, defined, operand, "this node")
        except VerificationError as error:
            raise fail(node, str(error)) from None


def _check_op(node: Node) -> None:
    """The op name is known and its own structural checks pass."""
    try:
        definition = op_def(node.op)
    except VerificationError as error:
        raise fail(node, f"{error}; register the op or use a core.<aten op> / attn.* name") from None
    try:
        definition.verify(node)
    except VerificationError as error:
        raise VerificationError(f"{error}; {_usage(definition)}: fix this node's operands or attributes") from None


def _usage(definition: OpDef) -> str:
    """What the op expects: the ATen schema of core ops, the first docstring line of dialect ops."""
    overload = getattr(definition, "overload", None)
    if overload is not None:
        return f"the schema is {overload._schema}"
    lines = (type(definition).__doc__ or "").strip().splitlines()
    return f"the op expects {lines[0].rstrip('.')}" if lines else f"see {type(definition).__name__}"


def _dims_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    return a == b or sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _type_mismatch(expected: ValueType, found: ValueType) -> str | None:
    """Why `found` (recorded) disagrees with `expected` (inferred) in shape, dtype or kind; None if it agrees."""
    if isinstance(expected, TensorType) and isinstance(found, TensorType):
        if len(expected.shape) != len(found.shape) or \
                not all(_dims_equal(a, b) for a, b in zip(expected.shape, found.shape)):
            return f"shape {found.shape_text()}, but the op computes {expected.shape_text()}"
        if expected.dtype != found.dtype:
            return f"dtype {found.dtype}, but the op computes {expected.dtype}"
        return None
    return None if expected == found else f"type {found}, but the op computes {expected}"


def _signature(template: Any) -> Hashable:
    """What type inference of a node depends on: its op's arguments with values replaced by their types."""
    if isinstance(template, Value):
        return ("value", template.type)
    if isinstance(template, (list, tuple)):
        return (type(template).__name__, *(_signature(item) for item in template))
    if isinstance(template, dict):
        return ("dict", *sorted((key, _signature(item)) for key, item in template.items()))
    return template


def _inferred_types(node: Node, memo: dict[Hashable, list[ValueType] | None]) -> list[ValueType] | None:
    """`infer(node)`, memoised by signature: a deep model repeats the same few layers' ops many times."""
    try:
        key = (node.op, _signature(node.args), _signature(node.kwargs))
        hash(key)
    except TypeError:
        return op_def(node.op).infer(node)
    if key not in memo:
        memo[key] = op_def(node.op).infer(node)
    return memo[key]


def _check_types(node: Node, memo: dict[Hashable, list[ValueType] | None]) -> None:
    """Re-infer the result types and compare them with the recorded ones."""
    inferred = _inferred_types(node, memo)
    if inferred is None:
        return
    if len(inferred) != len(node.results):
        raise fail(node, f"records {len(node.results)} results but the op produces {len(inferred)} "
                         f"({', '.join(map(str, inferred))}); record one result per op output")
    for value, expected in zip(node.results, inferred):
        problem = _type_mismatch(expected, value.type)
        if problem:
            raise fail(node, f"result %{value.name} is recorded with {problem}; "
                             f"expected {expected}, found {value.type}: fix the recorded type "
                             "(or the pass that built this node)")


def _axes(value: Value) -> frozenset[str] | None:
    """The mesh axis names of a tensor value; None for scalars."""
    if not isinstance(value.type, TensorType):
        return None
    return frozenset(axis for axis, _ in value.type.placements)


def _type_problem(value: Value) -> str | None:
    """A tensor type has sympy dims, lists each mesh axis once and shards only dims it has."""
    if not isinstance(value.type, TensorType):
        return None
    if not all(isinstance(dim, sympy.Expr) for dim in value.type.shape):
        return f"%{value.name} has non-sympy dims {value.type.shape}; build types with TensorType.of(...)"
    names = [axis for axis, _ in value.type.placements]
    if len(names) != len(set(names)):
        return f"%{value.name} lists a mesh axis twice ({value.type}); give each axis one placement"
    for axis, placement in value.type.placements:
        if isinstance(placement, Shard) and not 0 <= placement.dim < value.type.rank:
            return f"%{value.name} is sharded on dim {placement.dim} over '{axis}' but has rank {value.type.rank}"
    return None


def _describe_axes(values: Iterable[Value]) -> str:
    return ", ".join(f"%{v.name}: {{{', '.join(sorted(_axes(v) or ()))}}}" for v in values)


def _mixed_axes(values: list[Value]) -> str | None:
    """Why these tensor values do not share one set of mesh axes; None when they do."""
    for value in values:
        problem = _type_problem(value)
        if problem:
            return problem
    tensors = [value for value in values if _axes(value) is not None]
    if len({_axes(value) for value in tensors}) <= 1:
        return None
    return f"mixes mesh axis sets ({_describe_axes(tensors)}); give every tensor the same mesh axes " \
           "(single-device values have none) or insert a redistribution"


def _check_placements(node: Node) -> None:
    problem = _mixed_axes(node.operands + node.results)
    if problem:
        raise fail(node, problem)


def _check_inputs(graph: Graph, defined: dict[str, Value]) -> None:
    for value in graph.inputs:
        _define(graph, defined, value, "as a graph input")
    problem = _mixed_axes(graph.inputs)
    if problem:
        raise _graph_error(graph, f"the inputs: {problem}")


def _check_outputs(graph: Graph, defined: dict[str, Value]) -> None:
    for value in graph.output_values():
        _check_defined(graph, defined, value, "the return")


def verify(graph: Graph) -> None:
    """Raise VerificationError naming the node, what is wrong and how to fix it; return None if the graph is valid."""
    defined: dict[str, Value] = {}
    memo: dict[Hashable, list[ValueType] | None] = {}
    _check_inputs(graph, defined)
    for node in graph.nodes:
        _check_operands(graph, defined, node)
        _check_placements(node)
        _check_op(node)
        _check_types(node, memo)
        for value in node.results:
            try:
                _define(graph, defined, value, f"as a result of {node.op}")
            except VerificationError as error:
                raise fail(node, str(error)) from None
    _check_outputs(graph, defined)
    _check_memory_moves(graph)


#: a `mem.*` result -> the ops that may read it: a host copy is only brought back, a prefetch is
#: only waited for, a packed 8-bit buffer only unpacked (else something would read bytes that
#: are not on the device yet, or not in the value's format)
MEMORY_READERS = {"mem.offload": ("mem.prefetch",), "mem.prefetch": ("mem.wait",), "mem.quantize": ("mem.dequantize",),
                  "mem.drop": ()}


def _check_memory_moves(graph: Graph) -> None:
    for node in graph.nodes:
        for operand in node.operands:
            producer = operand.producer
            if producer is not None and producer.op in MEMORY_READERS and node.op not in MEMORY_READERS[producer.op]:
                readers = " or ".join(MEMORY_READERS[producer.op])
                allowed = f"only {readers}" if readers else "nothing (it is an empty stand-in)"
                raise fail(node, f"reads %{operand.name}, the result of {producer.op}, which {allowed} may read; "
                                 "read the value the plan brings back instead")
