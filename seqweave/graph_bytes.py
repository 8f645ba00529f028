"""Bytes a compiled graph holds: the activations a training forward saves, the outputs the
caller receives, and the size of any one tensor value."""
from __future__ import annotations

import math
from typing import Any

from seqweave.ir.aliasing import storage_root
from seqweave.ir.graph import Graph
from seqweave.ir.types import TensorType


def saved_bytes(graph: Graph, user_outputs: int | None) -> int:
    """A training forward's saved activations (outputs after the user's), each storage counted
    once: views of one tensor (a dense mask reshaped for every layer) share its bytes."""
    if graph.name != "forward" or user_outputs is None:
        return 0
    roots = {id(root): root for root in map(storage_root, graph.output_values()[user_outputs:])}
    return sum(map(tensor_bytes, roots.values()))


def caller_output_bytes(graph: Graph, user_outputs: int | None) -> int:
    """Bytes of the outputs the caller receives (a training forward's first `user_outputs`)."""
    outputs = graph.output_values()
    visible = outputs[:user_outputs] if graph.name == "forward" and user_outputs is not None else outputs
    return sum(tensor_bytes(value) for value in {id(v): v for v in visible}.values())


def tensor_bytes(value: Any) -> int:
    """Bytes of a static tensor value; 0 for scalars and symbolic shapes (not known until run time)."""
    if not isinstance(value.type, TensorType) or not value.type.is_static():
        return 0
    return math.prod(value.type.concrete_shape()) * value.type.dtype.itemsize
