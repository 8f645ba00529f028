"""What a pass is: a frozen dataclass with a kebab-case name whose fields are its options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from seqweave.ir.graph import Graph


@dataclass(frozen=True)
class PassResult:
    """How many rewrites a pass made (0 = it did not fire), and what the user should know: a
    warning is a choice that is exact but costly (logged by the pipeline, kept in the result)."""

    rewrites: int
    detail: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pass:
    """Subclasses set `name` and implement `run`; they edit the graph in place and leave it verifying."""

    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError
