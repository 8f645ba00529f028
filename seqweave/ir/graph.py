"""The SSA graph: values, nodes and the graph that orders them.

Operands live inside `args` / `kwargs` templates (nested tuples, lists and dicts of
literals and `Value`s), exactly like an FX node, so that a `core.*` op keeps every
ATen argument 1:1 and the printer can write it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from seqweave.ir.types import ValueType


@dataclass(eq=False)
class Value:
    """One SSA value: a graph input or one result of a node."""

    name: str
    type: ValueType
    producer: "Node | None" = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"%{self.name}"


def map_values(template: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild a nested args template with every `Value` replaced by `fn(value)`."""
    if isinstance(template, Value):
        return fn(template)
    if isinstance(template, tuple):
        return tuple(map_values(item, fn) for item in template)
    if isinstance(template, list):
        return [map_values(item, fn) for item in template]
    if isinstance(template, dict):
        return {key: map_values(item, fn) for key, item in template.items()}
    return template


def values_in(template: Any) -> list[Value]:
    """Every `Value` inside a nested template, in order (duplicates kept)."""
    found: list[Value] = []
    map_values(template, found.append)
    return found


@dataclass(eq=False)
class Node:
    """One operation: `results = op(*args, **kwargs)`; `loc` says where in the model it came from."""

    op: str
    args: tuple
    kwargs: dict
    results: list[Value]
    loc: str = ""

    @property
    def operands(self) -> list[Value]:
        return values_in((self.args, self.kwargs))

    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.op} has {len(self.results)} results, not one")
        return self.results[0]


@dataclass(eq=False)
class Graph:
    """A function in SSA form: inputs, nodes in execution order, and an outputs template."""

    name: str
    inputs: list[Value]
    nodes: list[Node]
    outputs: Any
    notes: list[str] = field(default_factory=list)  # provenance stamps, one per pass run

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for node in self.nodes:
            yield from node.results

    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (a node reading twice appears twice)."""
        table: dict[Value, list[Node]] = {value: [] for value in self.values()}
        for node in self.nodes:
            for operand in node.operands:
                table.setdefault(operand, []).append(node)
        return table

    def output_values(self) -> list[Value]:
        return values_in(self.outputs)

    def count(self, op: str) -> int:
        return sum(1 for node in self.nodes if node.op == op)

    def fresh_name(self, stem: str) -> str:
        taken = {value.name for value in self.values()}
        if stem not in taken:
            return stem
        index = 1
        while f"{stem}_{index}" in taken:
            index += 1
        return f"{stem}_{index}"

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every reader of `old` (nodes and outputs) at `new`."""
        swap = lambda value: new if value is old else value  # noqa: E731
        for node in self.nodes:
            node.args = map_values(node.args, swap)
            node.kwargs = map_values(node.kwargs, swap)
        self.outputs = map_values(self.outputs, swap)

    def erase(self, node: Node) -> None:
        """Remove a node whose results nobody reads any more."""
        readers = self.users()
        for value in node.results:
            if readers.get(value) or value in self.output_values():
                raise ValueError(f"cannot erase {node.op}: %{value.name} is still read")
        self.nodes.remove(node)
