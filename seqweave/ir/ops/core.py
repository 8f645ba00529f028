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
        self.overload = aten_overload(name)
        self.pure = not self.overload._schema.is_mutable  # type: ignore[misc]

    def infer(self, node: Node) -> list[ValueType] | None:
        if self.name in DEVICE_DEPENDENT_SHAPES:
            return None  # keep the types recorded at capture, for the device it ran on
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
