"""Insert torch-level nodes into a dynamo graph as dynamo itself would have recorded them.

The rewrites that run before matching (decomposing `multi_head_attention_forward`, einsum and
bmm into matmul) emit new nodes. The matchers and the mask lifting read shapes and dtypes from
each node's `example_value`, so every node built here gets one, computed by running the op on
the example (fake) tensors of its inputs in the graph's fake mode, and it carries the module
stack of the node it stands for, so reports name the right layer.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from seqweave.frontend.patterns import example


class NodeBuilder:
    """Builds nodes before `origin` (or after `after`), in the image of `origin`."""

    def __init__(self, origin: fx.Node, after: fx.Node | None = None) -> None:
        self.graph = origin.graph
        self.origin = origin
        self._after = after
        self._fake_mode = _fake_mode_of([origin, *origin.all_input_nodes])

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        """`target(*args, **kwargs)` as a call_function node."""
        return self._insert("call_function", target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        """`args[0].name(*args[1:], **kwargs)` as a call_method node."""
        return self._insert("call_method", name, args, kwargs)

    def _insert(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        if self._after is not None:
            with self.graph.inserting_after(self._after):
                node = self.graph.create_node(op, target, args, kwargs)
            self._after = node  # the next node goes after this one: program order is kept
        else:
            with self.graph.inserting_before(self.origin):
                node = self.graph.create_node(op, target, args, kwargs)
        node.meta["example_value"] = self._example(op, target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.origin.meta:
                node.meta[key] = self.origin.meta[key]
        return node

    def _example(self, op: str, target: Any, args: tuple, kwargs: dict) -> Any:
        args, kwargs = fx.node.map_arg((args, kwargs), _example_of)
        with self._fake_mode or nullcontext():
            if op == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)


def _example_of(node: fx.Node) -> Any:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise ValueError(f"{node.name} has no example value to build on")
    return value


def _fake_mode_of(nodes: list[fx.Node]) -> FakeTensorMode | None:
    """The fake mode the example values were made in (not the tracing context's: it may be another)."""
    for node in nodes:
        value = example(node)
        if isinstance(value, FakeTensor):
            return value.fake_mode
    return None
