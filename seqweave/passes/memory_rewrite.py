"""Writing an activation-memory plan into a training step's two graphs.

The plan moves storages: a value the forward makes, with every saved value that views it.
Forward: the storage gets its `mem.*` op right after its last forward reader (so it dies
there), and every saved view of it is replaced by that op's result: the host copy
(`mem.offload`, all into one `mem.host_arena` per step), the packed 8-bit buffer
(`mem.quantize`), or an empty stand-in (`mem.drop`) for a storage the backward recomputes.

Backward: before the first reader of any of those inputs the storage is brought back,
`mem.prefetch` at the last attention op before that reader (or at the reader itself, for
offload-at-use) and `mem.wait` at it,
`mem.dequantize`, or a clone of the forward op that made it (reading only inputs the plan
keeps), and each saved view is rebuilt on it by the same view ops. Readers then read those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from seqweave.errors import PassError
from seqweave.ir.aliasing import view_sources
from seqweave.ir.graph import Graph, Node, Value, map_values, values_in
from seqweave.ir.ops import op_def
from seqweave.ir.ops.mem import placement_texts
from seqweave.ir.ops.quantize8 import DEFAULT_GROUP
from seqweave.ir.types import DTYPE_NAMES, TensorType
from seqweave.passes.liveness import readers_by_storage
from seqweave.passes.memory_plan import OFFLOAD, OFFLOAD_AT_USE, OFFLOADS, QUANTIZE, RECOMPUTE
from seqweave.passes.node_flops import is_attention

#: alignment of each storage inside the host arena (bytes)
ARENA_ALIGN = 64


@dataclass(frozen=True)
class ViewStep:
    """One view op of a chain: `op(previous, *args, **kwargs) -> type`."""

    op: str
    args: tuple
    kwargs: dict
    type: TensorType


def view_chain(value: Value, root: Value) -> tuple[ViewStep, ...] | None:
    """The view ops that make `value` from `root`, each reading only the one before; None when
    `value` is not `root` seen through such a chain."""
    steps: list[ViewStep] = []
    while value is not root:
        node = value.producer
        if node is None or len(node.results) != 1 or view_sources(node) != [node.args[0]] or \
                values_in((node.args[1:], node.kwargs)):
            return None
        steps.append(ViewStep(node.op, tuple(node.args[1:]), dict(node.kwargs), value.type))
        value = node.args[0]
    return tuple(reversed(steps))


@dataclass(frozen=True)
class Choice:
    """What one storage becomes: option, the storage's type, the saved values viewing it, and for
    recompute the forward op that made it."""

    option: str
    type: TensorType
    #: (saved index, view chain from the storage to that saved value)
    members: tuple[tuple[int, tuple[ViewStep, ...]], ...]
    root: Value | None = None  # the forward value (the forward half runs on the graph it was planned on)
    op: str = ""
    args: Any = ()  # the forward op's own operands: each is a saved value, found in `saved_index`
    kwargs: Any = None
    result: int = 0
    loc: str = ""
    types: tuple = ()
    #: recompute: forward operand -> the saved index (backward input) that carries it
    saved_index: Any = None

    @staticmethod
    def build(option: str, root: Value, members: tuple, saved: list[Value]) -> "Choice":
        if option != RECOMPUTE:
            return Choice(option, root.type, members, root)
        producer = root.producer
        return Choice(option, root.type, members, root, producer.op, producer.args, producer.kwargs,
                      producer.results.index(root), producer.loc, tuple(result.type for result in producer.results),
                      {operand: saved.index(operand) for operand in producer.operands})

    @property
    def indices(self) -> list[int]:
        return [index for index, _ in self.members]

    def needs(self) -> list[int]:
        """The saved indices a recomputation reads."""
        return [self.saved_index[operand] for operand in values_in((self.args, self.kwargs))]


def _new_node(graph: Graph, op: str, args: tuple, kwargs: dict, stem: str, loc: str = "",
              types: list | None = None) -> Node:
    node = Node(op, args, kwargs, [], loc)
    inferred = types or op_def(op).infer(node)
    node.results = [Value(graph.fresh_name(stem if len(inferred) == 1 else f"{stem}_{i}"), t, node)
                    for i, t in enumerate(inferred)]
    return node


def _nbytes(kind: TensorType) -> int:
    return math.prod(kind.concrete_shape()) * kind.dtype.itemsize


def _arena_layout(choices: list[Choice]) -> tuple[dict[int, int], int]:
    """Byte offset in the step's arena of each offloaded storage (by position in `choices`), and the size."""
    offsets, end = {}, 0
    for position, choice in enumerate(choices):
        if choice.option in OFFLOADS:
            offsets[position] = end
            end += (_nbytes(choice.type) + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
    return offsets, end


def rewrite_forward(forward: Graph, saved_from: int, choices: list[Choice]) -> int:
    """Write the forward half of a plan; returns how many storages moved."""
    nodes = list(forward.nodes)  # reader indices are into the graph as it was before any insertion
    readers = readers_by_storage(forward)
    offsets, arena_bytes = _arena_layout(choices)
    arena_stand_in = Value("arena", TensorType.of([max(arena_bytes, 1)], torch.uint8))
    outputs = list(forward.outputs)
    offloads = []
    for position, choice in enumerate(choices):
        root = choice.root
        uses = readers.get(root, [])
        last = nodes[uses[-1]] if uses else root.producer
        if choice.option in OFFLOADS:
            node = _new_node(forward, "mem.offload", (root, arena_stand_in), {"offset": offsets[position]}, "offloaded")
            offloads.append(node)
        elif choice.option == QUANTIZE:
            node = _new_node(forward, "mem.quantize", (root,), {"group": DEFAULT_GROUP}, "quantized")
        else:
            node = _new_node(forward, "mem.drop", (root,), {}, "dropped")
        forward.nodes.insert(forward.nodes.index(last) + 1, node)
        for index in choice.indices:
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


def stored_type(choice: Choice) -> TensorType:
    """The type of what the forward saves for a moved storage."""
    if choice.option in OFFLOADS:
        return choice.type
    op, kwargs = ("mem.quantize", {"group": DEFAULT_GROUP}) if choice.option == QUANTIZE else ("mem.drop", {})
    return op_def(op).infer(Node(op, (Value("x", choice.type),), kwargs, []))[0]


class BackwardRewrite:
    """Write the backward half of a plan into one backward graph (a variant may read fewer inputs)."""

    def __init__(self, backward: Graph, choices: list[Choice]) -> None:
        self.graph, self.choices = backward, choices
        self.readers = readers_by_storage(backward)
        self.nodes = list(backward.nodes)  # reader indices are into the graph before any insertion

    def run(self) -> int:
        self._check_recompute_reads_kept()
        for choice in self.choices:
            inputs = [self.graph.inputs[index] for index in choice.indices]
            for value in inputs:
                value.type = stored_type(choice)
            uses = sorted({i for value in inputs for i in self.readers.get(value, [])})
            if uses:
                self._restore(choice, inputs, self.nodes[uses[0]])
        return len(self.choices)

    def _check_recompute_reads_kept(self) -> None:
        moved = {index for choice in self.choices for index in choice.indices}
        for choice in self.choices:
            reads_moved = sorted(set(choice.needs()) & moved)
            if choice.option == RECOMPUTE and reads_moved:
                raise PassError(f"activation-memory: a storage is recomputed from saved values {reads_moved}, "
                                "which the plan does not keep on the device")

    def _restore(self, choice: Choice, inputs: list[Value], first: Node) -> None:
        """Bring the storage back before `first`, rebuild every saved view on it, and point readers there."""
        stored = inputs[0]
        restore = {OFFLOAD: self._offload, OFFLOAD_AT_USE: self._offload_at_use, QUANTIZE: self._quantize,
                   RECOMPUTE: self._recompute}[choice.option]
        restored = restore(choice, stored, first)
        for value, (_, chain) in zip(inputs, choice.members):
            view = restored
            for step in chain:
                node = _new_node(self.graph, step.op, (view, *step.args), step.kwargs, f"{value.name}_view",
                                 types=[step.type])
                self._before(first, node)
                view = node.results[0]
            self._redirect(value, view)

    def _redirect(self, old: Value, new: Value) -> None:
        swap = lambda value: new if value is old else value  # noqa: E731
        for node in self.graph.nodes:
            if node.results and node.results[0] is new or node.op in ("mem.prefetch", "mem.dequantize") \
                    and node.args[0] is old:
                continue
            node.args, node.kwargs = map_values(node.args, swap), map_values(node.kwargs, swap)
        self.graph.outputs = map_values(self.graph.outputs, swap)

    def _before(self, node: Node, new: Node) -> None:
        self.graph.nodes.insert(self.graph.nodes.index(node), new)

    def _offload(self, choice: Choice, stored: Value, first: Node, ahead: bool = True) -> Value:
        fetch = _new_node(self.graph, "mem.prefetch", (stored,), {}, f"{stored.name}_fetched")
        wait = _new_node(self.graph, "mem.wait", (fetch.results[0],), {}, f"{stored.name}_ready")
        anchor = prefetch_anchor(self.graph, self.graph.nodes.index(first)) if ahead else self.graph.nodes.index(first)
        self._before(self.graph.nodes[anchor], fetch)
        self._before(first, wait)
        return wait.results[0]

    def _offload_at_use(self, choice: Choice, stored: Value, first: Node) -> Value:
        return self._offload(choice, stored, first, ahead=False)

    def _quantize(self, choice: Choice, stored: Value, first: Node) -> Value:
        kwargs = {"shape": list(choice.type.concrete_shape()), "dtype": DTYPE_NAMES[choice.type.dtype],
                  "group": DEFAULT_GROUP, "placements": placement_texts(choice.type)}
        restored = _new_node(self.graph, "mem.dequantize", (stored,), kwargs, f"{stored.name}_restored",
                             types=[choice.type])
        self._before(first, restored)
        return restored.results[0]

    def _recompute(self, choice: Choice, stored: Value, first: Node) -> Value:
        to_input = lambda operand: self.graph.inputs[choice.saved_index[operand]]  # noqa: E731
        clone = _new_node(self.graph, choice.op, map_values(choice.args, to_input), map_values(choice.kwargs, to_input),
                          f"{stored.name}_recomputed", choice.loc, list(choice.types))
        self._before(first, clone)
        return clone.results[choice.result]


def prefetch_anchor(graph: Graph, first_use: int) -> int:
    """Where to prefetch a value first read at node `first_use`: at the last attention op before
    it, so the copy runs behind that attention's compute (at the use itself when none comes before)."""
    for index in range(first_use - 1, -1, -1):
        if is_attention(graph.nodes[index]):
            return index
    return first_use
