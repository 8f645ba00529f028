"""`scalar.*`: Python arithmetic on sizes, as dynamo and aot_autograd record it under dynamic
shapes (`s0 - 18`, `sym_max(s0, 1)`). Operands are graph inputs of scalar type or
`core.sym_size.int` results; each op runs its Python function on the ints the call brings."""
from __future__ import annotations

import math
import operator
from functools import lru_cache
from typing import Any, Callable

import torch

from seqweave.ir.graph import Node
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.types import ScalarType, ValueType

SCALAR_PREFIX = "scalar."

#: IR name -> the Python function it applies (dynamo's targets, by identity).
SCALAR_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
    "truediv": operator.truediv, "mod": operator.mod, "pow": operator.pow, "neg": operator.neg,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "and": operator.and_, "or": operator.or_, "not": operator.not_,
    "sym_max": torch.sym_max, "sym_min": torch.sym_min, "sym_not": torch.sym_not, "sym_float": torch.sym_float,
    "sym_int": torch.sym_int, "ceil": math.ceil, "floor": math.floor,
}
_NAME_OF_FUNCTION = {function: name for name, function in SCALAR_FUNCTIONS.items()}


def scalar_op_name(target: Any) -> str | None:
    """`scalar.<name>` for a Python function dynamo records on sizes, else None."""
    try:
        name = _NAME_OF_FUNCTION.get(target)
    except TypeError:  # unhashable targets are not scalar functions
        return None
    return SCALAR_PREFIX + name if name else None


class ScalarOp(OpDef):
    """One Python function on scalars; the result type is the one recorded at capture."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.function = SCALAR_FUNCTIONS[name[len(SCALAR_PREFIX):]]

    def infer(self, node: Node) -> list[ValueType] | None:
        return None

    def verify(self, node: Node) -> None:
        if node.kwargs or len(node.results) != 1 or not isinstance(node.results[0].type, ScalarType):
            raise fail(node, "a scalar op takes positional operands and has one scalar result")

    def reference(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args)


@lru_cache(maxsize=None)
def scalar_op(name: str) -> ScalarOp:
    """The (cached, stateless) definition of a `scalar.*` op; KeyError for unknown names."""
    return ScalarOp(name)
