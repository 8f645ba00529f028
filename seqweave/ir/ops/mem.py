"""`mem.*`: where a saved activation is held between a training step's forward and backward.

The `activation-memory` pass writes these; each keeps the value's meaning and changes only
where its bytes are:
- `mem.host_arena(x; nbytes)` -> u8[nbytes]: the step's host arena (x only says which device
  the step runs on); `mem.offload(x, arena; offset)` copies x into it at `offset` and returns
  the host copy, typed like x; `mem.prefetch(h)` copies it back to the device the arena
  serves, and `mem.wait(x)` is where the backward first needs it (on CUDA the copy runs on a
  side stream and this waits for it; elsewhere both are plain copies and `wait` is identity).
- `mem.quantize(x; group)` -> u8[packed] and `mem.dequantize(p; shape, dtype, group)`: 8-bit
  storage (`ir.ops.quantize8`, with its stated error bound).
- `mem.drop(x)` -> an empty tensor standing in for a value the backward recomputes.

References here are plain torch (the interpreter runs them); the runtime supplies the
pooled, stream-ordered versions (`runtime.memory_ops`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from seqweave.ir.graph import Node
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.ops.quantize8 import CHUNK_ELEMENTS, DEFAULT_GROUP, dequantize, packed_nbytes, quantize
from seqweave.ir.types import DTYPES_BY_NAME, Replicate, TensorType, ValueType, parse_placement


def _tensor(node: Node, index: int) -> TensorType:
    value_type = node.args[index].type if index < len(node.args) else None
    if not isinstance(value_type, TensorType) or not value_type.is_static():
        raise fail(node, f"operand {index} must be a tensor of static shape")
    return value_type


def _nbytes(value_type: TensorType) -> int:
    return math.prod(value_type.concrete_shape()) * value_type.dtype.itemsize


def _per_rank(value_type: TensorType) -> tuple:
    """Placements for a rank's own scratch value (an arena, a packed buffer, a stand-in): on the
    same mesh axes as the step's values, `Replicate` on each (nothing reads it across ranks)."""
    return tuple((axis, Replicate()) for axis, _ in value_type.placements)


def placement_texts(value_type: TensorType) -> list[str]:
    """`["sp:S(1)"]`: a value's placements as `mem.dequantize` carries them."""
    return [f"{axis}:{placement}" for axis, placement in value_type.placements]


def _parse_placement(text: str) -> tuple:
    axis, _, placement = text.partition(":")
    return axis, parse_placement(placement)


def _chunk_workspace(value_type: TensorType) -> int:
    """fp32 temporaries of one chunk of (de)quantisation (`quantize8` converts a chunk at a time)."""
    return 4 * 4 * min(math.prod(value_type.concrete_shape()), CHUNK_ELEMENTS + value_type.concrete_shape()[-1])


class HostArena(OpDef):
    """(x; nbytes) -> u8[nbytes] on the host: the arena a step's offloaded values go to."""

    name = "mem.host_arena"
    pure = False  # taken from the pool for this step; never merged with another step's

    def infer(self, node: Node) -> list[ValueType]:
        # on the same mesh axes as the step's values: each rank has its own arena (nothing is
        # read across ranks), which `Replicate` says as well as any placement can
        return [TensorType.of([node.kwargs["nbytes"]], torch.uint8, _per_rank(node.args[0].type))]

    def verify(self, node: Node) -> None:
        _tensor(node, 0)
        if not isinstance(node.kwargs.get("nbytes"), int) or node.kwargs["nbytes"] <= 0:
            raise fail(node, "nbytes must be a positive int")

    def reference(self, node: Node, x, **kwargs: Any) -> torch.Tensor:
        return torch.empty(kwargs["nbytes"], dtype=torch.uint8)


class Offload(OpDef):
    """(x, arena; offset) -> the host copy of x, typed like x, at `offset` bytes into the arena."""

    name = "mem.offload"

    def infer(self, node: Node) -> list[ValueType]:
        return [node.args[0].type]

    def verify(self, node: Node) -> None:
        x, arena = _tensor(node, 0), _tensor(node, 1)
        end = node.kwargs.get("offset", -1) + _nbytes(x)
        if node.kwargs.get("offset", -1) < 0 or end > arena.concrete_shape()[0]:
            raise fail(node, f"offset {node.kwargs.get('offset')} + {_nbytes(x)} bytes does not fit the arena")
        if node.kwargs["offset"] % x.dtype.itemsize:
            raise fail(node, f"offset {node.kwargs['offset']} is not aligned to {x.dtype}")

    def reference(self, node: Node, x, arena, **kwargs: Any) -> torch.Tensor:
        return host_view(arena, kwargs["offset"], x).copy_(x)


def host_view(arena: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The bytes of `arena` from `offset` seen as a contiguous tensor shaped like `like`."""
    nbytes = like.numel() * like.element_size()
    return arena[offset:offset + nbytes].view(like.dtype).view(like.shape)


class Prefetch(OpDef):
    """(h) -> a device copy of the offloaded host value h (ready once `mem.wait` has run)."""

    name = "mem.prefetch"

    def infer(self, node: Node) -> list[ValueType]:
        return [node.args[0].type]

    def verify(self, node: Node) -> None:
        _tensor(node, 0)

    def reference(self, node: Node, h, **kwargs: Any) -> torch.Tensor:
        return h.clone()


class Wait(OpDef):
    """(x) -> x, once its prefetch has landed: the first backward use reads this."""

    name = "mem.wait"

    def infer(self, node: Node) -> list[ValueType]:
        return [node.args[0].type]

    def verify(self, node: Node) -> None:
        producer = node.args[0].producer if node.args else None
        if producer is None or producer.op != "mem.prefetch":
            raise fail(node, "waits for a mem.prefetch result")

    def reference(self, node: Node, x, **kwargs: Any) -> torch.Tensor:
        return x


class Quantize(OpDef):
    """(x; group) -> u8[packed]: x in 8 bits, one fp32 scale per (row, group of channels)."""

    name = "mem.quantize"

    def infer(self, node: Node) -> list[ValueType]:
        x = node.args[0].type
        shape = tuple(x.concrete_shape())
        packed = packed_nbytes(shape, node.kwargs.get("group", DEFAULT_GROUP))
        return [TensorType.of([packed], torch.uint8, _per_rank(x))]  # this rank's share, packed

    def workspace(self, node: Node) -> int:
        return _chunk_workspace(node.args[0].type)

    def verify(self, node: Node) -> None:
        if not _tensor(node, 0).dtype.is_floating_point:
            raise fail(node, "only floating-point activations are stored in 8 bits")

    def reference(self, node: Node, x, **kwargs: Any) -> torch.Tensor:
        return quantize(x, kwargs.get("group", DEFAULT_GROUP))


class Dequantize(OpDef):
    """(packed; shape, dtype, group, placements) -> the tensor `mem.quantize` stored, within its error bound."""

    name = "mem.dequantize"

    def infer(self, node: Node) -> list[ValueType]:
        placements = tuple(_parse_placement(text) for text in node.kwargs.get("placements", ()))
        return [TensorType.of(list(node.kwargs["shape"]), DTYPES_BY_NAME[node.kwargs["dtype"]], placements)]

    def workspace(self, node: Node) -> int:
        return _chunk_workspace(node.results[0].type)

    def verify(self, node: Node) -> None:
        packed = _tensor(node, 0)
        shape = tuple(node.kwargs.get("shape", ()))
        if node.kwargs.get("dtype") not in DTYPES_BY_NAME:
            raise fail(node, f"dtype must be one of {sorted(DTYPES_BY_NAME)}")
        expected = packed_nbytes(shape, node.kwargs.get("group", DEFAULT_GROUP))
        if tuple(packed.concrete_shape()) != (expected,):
            raise fail(node, f"a {list(shape)} tensor packs into {expected} bytes, the operand has "
                             f"{packed.shape_text()}")

    def reference(self, node: Node, packed, **kwargs: Any) -> torch.Tensor:
        return dequantize(packed, tuple(kwargs["shape"]), DTYPES_BY_NAME[kwargs["dtype"]],
                          kwargs.get("group", DEFAULT_GROUP))


class Drop(OpDef):
    """(x) -> an empty tensor of x's dtype: x is not kept; the backward recomputes it."""

    name = "mem.drop"

    def infer(self, node: Node) -> list[ValueType]:
        return [TensorType.of([0], node.args[0].type.dtype, _per_rank(node.args[0].type))]

    def verify(self, node: Node) -> None:
        _tensor(node, 0)

    def reference(self, node: Node, x, **kwargs: Any) -> torch.Tensor:
        return x.new_empty(0)


MEMORY_OPS = (HostArena(), Offload(), Prefetch(), Wait(), Quantize(), Dequantize(), Drop())

