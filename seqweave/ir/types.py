"""Value types of the IR: tensors with symbolic shapes, dtypes and per-mesh-axis placements."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import sympy
import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.complex64: "c64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Replicate:
    """Every rank of the mesh axis holds the whole value."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Each rank of the mesh axis holds one slice of `dim`."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a partial value; the true value is their `reduce` (only sum for now)."""

    reduce: str = "sum"

    def __str__(self) -> str:
        return f"P({self.reduce})"


Placement = Union[Replicate, Shard, Partial]


def parse_placement(text: str) -> Placement:
    """Inverse of `str(placement)`: `R`, `S(1)`, `P(sum)`."""
    text = text.strip()
    if text == "R":
        return Replicate()
    if text.startswith("S(") and text.endswith(")"):
        return Shard(int(text[2:-1]))
    if text.startswith("P(") and text.endswith(")"):
        return Partial(text[2:-1])
    raise ValueError(f"unknown placement {text!r}: expected R, S(<dim>) or P(sum)")


def to_sympy(size: object) -> sympy.Expr:
    """A dimension as a sympy expression: ints stay integers, torch SymInts keep their symbol."""
    if isinstance(size, sympy.Expr):
        return size
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


@dataclass(frozen=True)
class TensorType:
    """A tensor: symbolic shape, dtype and one placement per named mesh axis (empty = single device)."""

    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    placements: tuple[tuple[str, Placement], ...] = field(default=())

    @staticmethod
    def of(shape: object, dtype: torch.dtype, placements: tuple[tuple[str, Placement], ...] = ()) -> "TensorType":
        return TensorType(tuple(to_sympy(s) for s in shape), dtype, placements)

    @staticmethod
    def from_tensor(tensor: torch.Tensor) -> "TensorType":
        return TensorType.of(tensor.shape, tensor.dtype)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self) -> bool:
        return all(dim.is_Integer for dim in self.shape)

    def concrete_shape(self, hints: dict[sympy.Symbol, int] | None = None) -> tuple[int, ...]:
        """The shape as ints, substituting `hints` for symbols; raises if a symbol has no hint."""
        dims = [dim.subs(hints) if hints else dim for dim in self.shape]
        if not all(dim.is_Integer for dim in dims):
            raise ValueError(f"shape {self.shape_text()} has symbols without a hint")
        return tuple(int(dim) for dim in dims)

    def shape_text(self) -> str:
        return "[" + ", ".join(str(dim) for dim in self.shape) + "]"

    def __deepcopy__(self, memo: dict) -> "TensorType":
        return self  # immutable: a copied graph shares its types (copying sympy shapes is slow)

    def __str__(self) -> str:
        text = f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}{self.shape_text()}"
        if self.placements:
            text += "{" + ", ".join(f"{axis}: {p}" for axis, p in self.placements) + "}"
        return text


@dataclass(frozen=True)
class ScalarType:
    """A non-tensor value (a SymInt size, a Python number) flowing through the graph."""

    kind: str  # "int" | "float" | "bool" | "none" (an output an op did not compute, e.g. an unasked gradient)

    def __str__(self) -> str:
        return self.kind


ValueType = Union[TensorType, ScalarType]
