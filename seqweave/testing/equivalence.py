"""Numerical equivalence of two graphs, for pass tests: run both with the reference
interpreter on the same (float64) inputs and compare every output.

A rewrite is correct when the rewritten graph computes what the original did; float64
inputs make rounding noise far smaller than any real bug, so tolerances can be tight.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from seqweave.ir.graph import Graph
from seqweave.ir.interpreter import interpret
from seqweave.ir.types import TensorType

FLOAT64_ATOL = 1e-9
FLOAT64_RTOL = 1e-9
INT_INPUT_HIGH = 3  # integer inputs (mask operands) are drawn from [0, INT_INPUT_HIGH)


def random_inputs(graph: Graph, dtype: torch.dtype | None = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """One seeded random tensor per graph input.

    Floating inputs are standard normal in `dtype` whatever dtype the graph records (None:
    the recorded one; use that for graphs whose casts, e.g. `_to_copy(dtype=f32)`, only mean
    something at the recorded precision). Integer inputs are small non-negative ints
    (segment ids, padding flags), bools are random. Raises ValueError for scalar inputs or
    symbolic shapes: give those graphs explicit inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    return [_random_tensor(value.type, dtype, generator, value.name) for value in graph.inputs]


def _random_tensor(value_type: Any, dtype: torch.dtype | None, generator: torch.Generator,
                   name: str) -> torch.Tensor:
    if not isinstance(value_type, TensorType) or not value_type.is_static():
        raise ValueError(f"input %{name}: {value_type} is not a static tensor type; pass explicit inputs")
    shape = value_type.concrete_shape()
    if value_type.dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if value_type.dtype.is_floating_point or value_type.dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype or value_type.dtype)
    return torch.randint(0, INT_INPUT_HIGH, shape, generator=generator, dtype=value_type.dtype)


def _clone_inputs(inputs: Sequence[Any]) -> list[Any]:
    """Fresh copies, so that neither run can see what the other (or the caller) did to its inputs."""
    return [item.clone() if isinstance(item, torch.Tensor) else item for item in inputs]


def assert_equivalent(before: Graph, after: Graph, inputs: Sequence[Any] | None = None, *,
                      atol: float = FLOAT64_ATOL, rtol: float = FLOAT64_RTOL, seed: int = 0) -> None:
    """Assert that `after` computes the same outputs as `before` on `inputs`.

    Inputs default to `random_inputs(before, torch.float64, seed)`. Outputs must agree in
    structure (tuples, lists, None), dtype and shape, and in value within `atol` / `rtol`;
    NaN never matches (a rewrite that introduces NaN is wrong), equal infinities do. No
    output may share memory with an input or another output unless it did before.
    """
    if len(before.inputs) != len(after.inputs):
        raise AssertionError(f"{before.name} takes {len(before.inputs)} inputs but {after.name} "
                             f"takes {len(after.inputs)}: a rewrite must keep the graph signature")
    if inputs is None:
        inputs = random_inputs(before, torch.float64, seed)
    before_inputs, after_inputs = _clone_inputs(inputs), _clone_inputs(inputs)
    expected = interpret(before, before_inputs)
    actual = interpret(after, after_inputs)
    _compare(expected, actual, "outputs", atol, rtol)
    new_aliases = _aliasing(after_inputs, actual) - _aliasing(before_inputs, expected)
    if new_aliases:
        raise AssertionError(f"{after.name}: outputs share memory that they did not share before the rewrite: "
                             f"{sorted(new_aliases)} (pairs of 'input i' / 'output j'); an in-place edit of one "
                             "would now change the other")


def _tensor_leaves(template: Any) -> list[Any]:
    """Every leaf of a nested outputs template, in order (non-tensors included, to keep positions)."""
    if isinstance(template, (tuple, list)):
        return [leaf for item in template for leaf in _tensor_leaves(item)]
    if isinstance(template, dict):
        return [leaf for key in sorted(template) for leaf in _tensor_leaves(template[key])]
    return [template]


def _aliasing(inputs: Sequence[Any], outputs: Any) -> set[tuple[str, str]]:
    """Pairs (input or output, output) whose tensors share a storage."""
    named = [(f"input {i}", t) for i, t in enumerate(inputs)]
    named += [(f"output {j}", t) for j, t in enumerate(_tensor_leaves(outputs))]
    named = [(name, t.untyped_storage().data_ptr()) for name, t in named
             if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0]
    return {(first, second) for index, (first, ptr) in enumerate(named)
            for second, other in named[index + 1:] if second.startswith("output") and ptr == other}


def _compare(expected: Any, actual: Any, path: str, atol: float, rtol: float) -> None:
    """Walk both output templates together; `path` names the position for the message."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{path}: expected a tensor, got {type(actual).__name__}")
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False,
                                   msg=lambda message: f"{path}: {message}")
        return
    if isinstance(expected, (tuple, list)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            raise AssertionError(f"{path}: expected a {type(expected).__name__} of {len(expected)}, got {actual!r}")
        for index, (want, got) in enumerate(zip(expected, actual)):
            _compare(want, got, f"{path}[{index}]", atol, rtol)
        return
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            raise AssertionError(f"{path}: expected keys {sorted(expected)}, got {actual!r}")
        for key in expected:
            _compare(expected[key], actual[key], f"{path}[{key!r}]", atol, rtol)
        return
    if expected != actual:
        raise AssertionError(f"{path}: expected {expected!r}, got {actual!r}")
