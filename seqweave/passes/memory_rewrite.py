"""Writing an activation-memory plan into a training step's two graphs.

Forward: each chosen saved value gets its `mem.*` op right after its last forward reader
(so it dies there), and the forward saves that op's result instead: the host copy
(`mem.offload`, all into one `mem.host_arena` per step), the packed 8-bit buffer
(`mem.quantize`), or an empty stand-in (`mem.drop`) for a value the backward recomputes.

Backward: the matching input is brought back before its first reader: `mem.prefetch` at the
last attention op before that reader and `mem.wait` at it, `mem.dequantize`, or a clone of
the forward op that made it, reading only inputs the plan keeps. Readers then read that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqweave.errors import PassError
from seqweave.ir.aliasing import storage_root
from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.ops import op_def
from seqweave.ir.ops.quantize8 import DEFAULT_GROUP
from seqweave.ir.types import DTYPE_NAMES, TensorType
from seqweave.passes.liveness import readers_by_storage
from seqweave.passes.node_flops import is_attention

#: alignment of each value inside the host arena (bytes)
ARENA_ALIGN = 64


@dataclass(frozen=True)
class SavedInput:
    """Stands for the backward input that receives saved value `index` (in a recompute recipe)."""

    index: int


@dataclass(frozen=True)
class Choice:
    """What one saved activation becomes: option, its type, and for recompute the op to clone."""

    option: str
    type: TensorType
    #: recompute: the forward op to clone, its operands (saved values as `SavedInput`), its result types
    op: str = ""
    args: Any = ()
    kwargs: Any = None
    result: int = 0
    loc: str = ""
    types: tuple = ()

    @staticmethod
    def build(option: str, value: Value, saved: list[Value]) -> "Choice":
        if option != "recompute":
            return Choice(option, value.type)
        producer = value.producer
        to_input = lambda operand: SavedInput(saved.index(operand))  # noqa: E731
        return Choice(option, value.type, producer.op, map_values(producer.args, to_input),
                      map_values(producer.kwargs, to_input), producer.results.index(value), producer.loc,
                      tuple(result.type for result in producer.results))

    def needs(self) -> list[int]:
        found: list[int] = []
        _collect(self.args, found)
        _collect(self.kwargs, found)
        return found


def _collect(template: Any, found: list[int]) -> None:
    if isinstance(template, SavedInput):
        found.append(template.index)
    elif isinstance(template, (tuple, list)):
        for item in template:
            _collect(item, found)
    elif isinstance(template, dict):
        for item in template.values():
            _collect(item, found)


def _resolve(template: Any, inputs: list[Value]) -> Any:
    if isinstance(template, SavedInput):
        return inputs[template.index]
    if isinstance(template, tuple):
        return tuple(_resolve(item, inputs) for item in template)
    if isinstance(template, list):
        return [_resolve(item, inputs) for item in template]
    if isinstance(template, dict):
        return {key: _resolve(item, inputs) for key, item in template.items()}
    return template


def _new_node(graph: Graph, op: str, args: tuple, kwargs: dict, stem: str, loc: str = "",
              types: list | None = None) -> Node:
    node = Node(op, args, kwargs, [], loc)
    inferred = types or op_def(op).infer(node)
    node.results = [Value(graph.fresh_name(stem if len(inferred) == 1 else f"{stem}_{i}"), t, node)
                    for i, t in enumerate(inferred)]
    return node


def _insert_after(graph: Graph, anchor: Node | None, node: Node) -> None:
    graph.nodes.insert(graph.nodes.index(anchor) + 1 if anchor is not None else 0, node)


def _arena_layout(graph: Graph, saved_from: int, choices: dict) -> dict[int, int]:
    """Byte offset in the step's arena of each offloaded saved value."""
    offsets, end = {}, 0
    saved = graph.output_values()[saved_from:]
    for index in sorted(choices):
        if choices[index].option == "offload":
            offsets[index] = end
            nbytes = saved[index].type.dtype.itemsize * _numel(saved[index].type)
            end += (nbytes + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    return offsets


def _numel(kind: TensorType) -> int:
    count = 1
    for dim in kind.concrete_shape():
        count *= dim
    return count


def rewrite_forward(forward: Graph, saved_from: int, choices: dict) -> int:
    """Write the forward half of a plan; returns how many saved values changed."""
    saved = forward.output_values()[saved_from:]
    nodes = list(forward.nodes)  # reader indices are into the graph as it was before any insertion
    readers = readers_by_storage(forward)
    offsets = _arena_layout(forward, saved_from, choices)
    arena_bytes = max((offsets[i] + saved[i].type.dtype.itemsize * _numel(saved[i].type) for i in offsets), default=0)
    arena_stand_in = Value("arena", TensorType.of([max(arena_bytes, 1)], torch.uint8))
    outputs = list(forward.outputs)
    offloads = []
    for index, choice in sorted(choices.items()):
        value = saved[index]
        uses = readers.get(storage_root(value), [])
        last = nodes[uses[-1]] if uses else value.producer
        if choice.option == "offload":
            node = _new_node(forward, "mem.offload", (value, arena_stand_in), {"offset": offsets[index]}, "offloaded")
            offloads.append(node)
        elif choice.option == "quantize":
            node = _new_node(forward, "mem.quantize", (value,), {"group": DEFAULT_GROUP}, "quantized")
        else:
            node = _new_node(forward, "mem.drop", (value,), {}, "dropped")
        _insert_after(forward, last, node)
        outputs[saved_from + index] = node.results[0]
    forward.outputs = type(forward.outputs)(outputs)
    if offloads:
        _place_arena(forward, offloads, arena_stand_in, arena_bytes)
    return len(choices)


def _place_arena(forward: Graph, offloads: list[Node], stand_in: Value, nbytes: int) -> None:
    """One `mem.host_arena` before the step's first offload; every offload reads it."""
    first = min(offloads, key=forward.nodes.index)
    arena = _new_node(forward, "mem.host_arena", (first.args[0],), {"nbytes": nbytes}, "host_arena")
    forward.nodes.insert(forward.nodes.index(first), arena)
    for node in offloads:
        node.args = (node.args[0], arena.results[0])


class BackwardRewrite:
    """Write the backward half of a plan into one backward graph (a variant may read fewer inputs)."""

    def __init__(self, backward: Graph, choices: dict) -> None:
        self.graph, self.choices = backward, choices
        self.readers = readers_by_storage(backward)
        self.nodes = list(backward.nodes)  # reader indices are into the graph before any insertion

    def run(self) -> int:
        self._check_recompute_reads_kept()
        for index, choice in sorted(self.choices.items()):
            stored = self.graph.inputs[index]
            uses = [self.nodes[i] for i in self.readers.get(stored, [])]
            restore = getattr(self, f"_{choice.option}")
            stored.type = self._stored_type(choice)
            if uses:
                restore(stored, choice, uses)
        return len(self.choices)

    def _check_recompute_reads_kept(self) -> None:
        for index, choice in self.choices.items():
            moved = [need for need in choice.needs() if need in self.choices]
            if choice.option == "recompute" and moved:
                raise PassError(f"activation-memory: saved value {index} is recomputed from saved values {moved}, "
                                "which the plan does not keep on the device")

    @staticmethod
    def _stored_type(choice: Choice) -> TensorType:
        if choice.option == "offload":
            return choice.type
        probe = Node("mem.quantize" if choice.option == "quantize" else "mem.drop",
                     (Value("x", choice.type),), {"group": DEFAULT_GROUP} if choice.option == "quantize" else {}, [])
        return op_def(probe.op).infer(probe)[0]

    def _redirect(self, old: Value, new: Value, uses: list[Node]) -> None:
        swap = lambda value: new if value is old else value  # noqa: E731
        for node in uses:
            node.args, node.kwargs = map_values(node.args, swap), map_values(node.kwargs, swap)
        self.graph.outputs = map_values(self.graph.outputs, swap)

    def _before(self, node: Node, new: Node) -> None:
        self.graph.nodes.insert(self.graph.nodes.index(node), new)

    def _offload(self, stored: Value, choice: Choice, uses: list[Node]) -> None:
        first = uses[0]
        fetch = _new_node(self.graph, "mem.prefetch", (stored,), {}, f"{stored.name}_fetched")
        wait = _new_node(self.graph, "mem.wait", (fetch.results[0],), {}, f"{stored.name}_ready")
        self._before(self.graph.nodes[prefetch_anchor(self.graph, self.graph.nodes.index(first))], fetch)
        self._before(first, wait)
        self._redirect(stored, wait.results[0], uses)

    def _quantize(self, stored: Value, choice: Choice, uses: list[Node]) -> None:
        kwargs = {"shape": list(choice.type.concrete_shape()), "dtype": DTYPE_NAMES[choice.type.dtype],
                  "group": DEFAULT_GROUP}
        restored = _new_node(self.graph, "mem.dequantize", (stored,), kwargs, f"{stored.name}_restored")
        self._before(uses[0], restored)
        self._redirect(stored, restored.results[0], uses)

    def _recompute(self, stored: Value, choice: Choice, uses: list[Node]) -> None:
        inputs = self.graph.inputs
        clone = _new_node(self.graph, choice.op, _resolve(choice.args, inputs), _resolve(choice.kwargs, inputs),
                          f"{stored.name}_recomputed", choice.loc, list(choice.types))
        self._before(uses[0], clone)
        self._redirect(stored, clone.results[choice.result], uses)


def prefetch_anchor(graph: Graph, first_use: int) -> int:
    """Where to prefetch a value first read at node `first_use`: at the last attention op before
    it, so the copy runs behind that attention's compute (at the use itself when none comes before)."""
    for index in range(first_use - 1, -1, -1):
        if is_attention(graph.nodes[index]):
            return index
    return first_use
