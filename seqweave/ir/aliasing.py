"""Which values share memory: the ATen schema's alias annotations, read once for every user."""
from __future__ import annotations

from seqweave.ir.graph import Node, Value, values_in
from seqweave.ir.ops import op_def


def view_sources(node: Node) -> list[Value]:
    """Operands a result of `node` may be a view of, from the ATen schema's alias annotations
    (`view(Tensor(a) self, ...) -> Tensor(a)`); dialect ops return fresh tensors."""
    schema = getattr(getattr(op_def(node.op), "overload", None), "_schema", None)
    if schema is None or not any(ret.alias_info is not None for ret in schema.returns):
        return []
    sources: list[Value] = []
    for position, argument in enumerate(schema.arguments):
        if argument.alias_info is not None:
            bound = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
            sources.extend(values_in(bound))
    return sources


def storage_root(value: Value) -> Value:
    """The value whose memory `value` views (itself when it owns its memory), following views back."""
    seen = set()
    while value.producer is not None and id(value) not in seen:
        seen.add(id(value))
        sources = view_sources(value.producer)
        if len(sources) != 1:
            break
        value = sources[0]
    return value
