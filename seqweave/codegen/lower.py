"""Lower an IR graph to the runtime's step list.

On CPU every op runs its plain-torch reference (attention blockwise); later issues swap
in generated Triton kernels here, keyed by the node's KernelSpec.
"""
from __future__ import annotations

import functools

from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.ops import op_def
from seqweave.runtime.comm import Communicator
from seqweave.runtime.distributed_ops import DISTRIBUTED_OPS, bind
from seqweave.runtime.program import Program, Slot, Step


def _last_readers(graph: Graph) -> dict[Value, int]:
    last: dict[Value, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.operands:
            last[value] = index
    return last


def _frees(graph: Graph, index: int, node: Node, last: dict[Value, int], slot_of: dict[Value, int]) -> tuple[int, ...]:
    outputs = set(graph.output_values())
    dead = {v for v in node.operands if last.get(v) == index and v not in outputs}
    dead |= {v for v in node.results if v not in last and v not in outputs}  # results nobody reads
    return tuple(sorted(slot_of[v] for v in dead))


def _implementation(node: Node, index: int, comm: Communicator | None):
    """The op's plain-torch reference, or for ops that talk to other ranks, the runtime's, bound to `comm`."""
    if node.op not in DISTRIBUTED_OPS:
        return functools.partial(op_def(node.op).reference, node)
    if comm is None:
        raise ValueError(f"{node.op} needs a communicator: lower sharded graphs with lower(graph, comm)")
    return bind(comm, index, node)


def lower(graph: Graph, comm: Communicator | None = None) -> Program:
    """One step per node, slots numbered in definition order."""
    slot_of = {value: index for index, value in enumerate(graph.values())}
    to_slot = lambda value: Slot(slot_of[value])  # noqa: E731
    last = _last_readers(graph)
    steps = []
    for index, node in enumerate(graph.nodes):
        steps.append(Step(node.op, _implementation(node, index, comm),
                          map_values(node.args, to_slot), map_values(node.kwargs, to_slot),
                          tuple(slot_of[r] for r in node.results), _frees(graph, index, node, last, slot_of)))
    stats = {"steps": len(steps), "attention": graph.count("attn.sdpa"),
             "attention_backward": graph.count("attn.sdpa_backward")}
    return Program(graph.name, len(slot_of), tuple(slot_of[v] for v in graph.inputs), steps,
                   map_values(graph.outputs, to_slot), stats)
