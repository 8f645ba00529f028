"""Per-rank memory of a training step, predicted from the compiled graphs as a polynomial in N.

A training forward is captured (compiled, not run) at N/4, N/2 and N on `world` ranks. Per
rank, what a step holds at the start of its backward is the forward's saved activations
(each storage once) plus the outputs the caller receives (a gathered output is whole on
every rank). The quadratic through the three points is exact for anything built from
shapes linear or quadratic in N, so an N² term (a dense mask, a gathered score matrix)
shows as a nonzero coefficient of N², and the expression can be read at any length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch

from seqweave.capture_only import capture
from seqweave.config import CompileOptions, Mesh

N = sympy.Symbol("N", positive=True, integer=True)
#: (seq_len) -> (model, inputs) at that length
Builder = Callable[[int], "tuple[torch.nn.Module, Any]"]


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes per rank as expressions of the global sequence length N."""

    saved: sympy.Expr
    outputs: sympy.Expr
    world: int

    @property
    def total(self) -> sympy.Expr:
        return sympy.expand(self.saved + self.outputs)

    def at(self, seq_len: int) -> int:
        return int(self.total.subs(N, seq_len))

    def quadratic_bytes(self) -> sympy.Expr:
        """The coefficient of N² (0 when nothing on a rank grows like N²)."""
        return sympy.Poly(self.total, N).coeff_monomial(N ** 2)

    def as_dict(self, seq_len: int) -> dict[str, Any]:
        return {"world": self.world, "saved_bytes": str(self.saved), "output_bytes": str(self.outputs),
                "total_bytes": str(self.total), f"bytes_at_{seq_len}": self.at(seq_len)}


def step_bytes(model: torch.nn.Module, inputs: Any, world: int) -> tuple[int, int]:
    """(saved activation bytes, caller-output bytes) of one rank's training forward, captured only."""
    torch._dynamo.reset()
    backend = capture(model, inputs, CompileOptions(mesh=Mesh(sp=world)), training=True)
    forwards = [compiled for compiled in backend.graphs if compiled.kind == "forward"]
    if not forwards:
        raise ValueError("no training forward was captured: does the model compute anything that needs a gradient?")
    return sum(c.saved_bytes for c in forwards), sum(c.output_bytes for c in forwards)


def predict_memory(build: Builder, seq_len: int, world: int = 1,
                   progress: Callable[[str], None] = lambda _message: None) -> MemoryPrediction:
    """Capture at N/4, N/2, N and fit each part with the polynomial through the three points."""
    lengths = (seq_len // 4, seq_len // 2, seq_len)
    points = []
    for length in lengths:
        progress(f"capturing a training step at N={length} on {world} rank(s)")
        points.append((length, *step_bytes(*build(length), world)))
    saved = sympy.interpolate([(n, s) for n, s, _ in points], N)
    outputs = sympy.interpolate([(n, o) for n, _, o in points], N)
    return MemoryPrediction(sympy.expand(saved), sympy.expand(outputs), world)
