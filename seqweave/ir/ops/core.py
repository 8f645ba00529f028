"""`core.*`: ATen ops carried through 1:1. `core.mm` is `aten.mm.default`; `core.add.Tensor` is `aten.add.Tensor`."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from seqweave.ir.graph import Node, Value, map_values
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.types import ScalarType, TensorType, ValueType

CORE_PREFIX = "core."
#: Ops whose result shapes depend on the device: on meta, batch norm without training returns
#: saved statistics of shape [C]; on CPU (what the fake tensors recorded) empty [0] tensors.
DEVICE_DEPENDENT_SHAPES = frozenset({"core._native_batch_norm_legit_no_training"})


def core_name(overload: torch._ops.OpOverload) -> str:
    """The IR name of an ATen overload: the `.default` overload is implied."""
    suffix = "" if overload._overloadname == "default" else f".{overload._overloadname}"
    return CORE_PREFIX + overload._opname + suffix


def aten_overload(name: str) -> torch._ops.OpOverload:
    """Inverse of `core_name`; raises KeyError naming the op when ATen has no such overload."""
    parts = name[len(CORE_PREFIX):].split(".")
    packet_name, overload_name = parts[0], (parts[1] if len(parts) > 1 else "default")
    packet = getattr(torch.ops.aten, packet_name, None)
    overload = getattr(packet, overload_name, None) if packet is not None else None
    if not isinstance(overload, torch._ops.OpOverload):
        raise KeyError(f"{name}: no ATen op aten::{packet_name}.{overload_name}")
    return overload


def _meta_operand(value: Value) -> Any:
    if isinstance(value.type, TensorType) and value.type.is_static():
        return torch.empty(value.type.concrete_shape(), dtype=value.type.dtype, device="meta")
    raise LookupError("operand is not a static tensor")


INFER_CACHE_SIZE = 4096  # per op


def _signature(template: Any) -> Any:
    """A hashable key for an args template: values by their types, containers by kind (None
    when some literal is not hashable: such a node is inferred uncached)."""
    if isinstance(template, Value):
        return ("%", template.type)
    if isinstance(template, dict):
        template = tuple(sorted(template.items(), key=lambda item: str(item[0])))
    if isinstance(template, (tuple, list)):
        items = tuple(_signature(item) for item in template)
        return None if any(item is None for item in items) else (type(template).__name__, items)
    if isinstance(template, torch.Tensor):
        return None  # hashed by identity, which a later tensor may reuse
    try:
        hash(template)
    except TypeError:
        return None
    return (type(template).__name__, template)


def _flatten_types(result: Any) -> list[ValueType]:
    if isinstance(result, torch.Tensor):
        return [TensorType.of(result.shape, result.dtype)]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten_types(item)]
    if result is None:  # an output the op was told not to compute (convolution_backward's mask)
        return [ScalarType("none")]
    raise LookupError(f"result of kind {type(result).__name__} is not a tensor")


class CoreAtenOp(OpDef):
    """One ATen overload. Types are inferred by running the op on meta tensors."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        #: result types by operand types and literal arguments: the verifier and the passes ask
        #: again for the same signatures, and running an op on meta tensors is slow
        self._inferred: dict[Any, tuple[ValueType, ...] | None] = {}
        self.overload = aten_overload(name)
        self.pure = not self.overload._schema.is_mutable  # type: ignore[misc]

    def infer(self, node: Node) -> list[ValueType] | None:
        if self.name in DEVICE_DEPENDENT_SHAPES:
            return None  # keep the types recorded at capture, for the device it ran on
        key = _signature((node.args, node.kwargs))
        if key is not None and key in self._inferred:
            return list(self._inferred[key]) if self._inferred[key] is not None else None
        types = self._infer_on_meta(node)
        if key is not None and len(self._inferred) < INFER_CACHE_SIZE:
            self._inferred[key] = None if types is None else tuple(types)
        return types

    def _infer_on_meta(self, node: Node) -> list[ValueType] | None:
        try:
            args = map_values(node.args, _meta_operand)
            kwargs = map_values(node.kwargs, _meta_operand)
            return _flatten_types(self.overload(*args, **kwargs))
        except (LookupError, NotImplementedError, RuntimeError):
            return None  # symbolic shapes or no meta kernel: keep the recorded types

    def verify(self, node: Node) -> None:
        if self.overload._schema.is_mutable:
            raise fail(node, "mutating ATen ops are not allowed in the IR; functionalise the graph first")

    def reference(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        return self.overload(*args, **kwargs)


@lru_cache(maxsize=None)
def core_op(name: str) -> CoreAtenOp:
    """The (cached, stateless) definition of a `core.*` op."""
    return CoreAtenOp(name)
