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
    #: running the pass again on its own output rewrites nothing and changes no text
    #: (`seqweave.testing.check_pass` holds a pass to this unless it sets False)
    idempotent: ClassVar[bool] = True

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def declared_semantics(self, graph: Graph) -> Graph | None:
        """None for an exact pass (its output computes what `graph` does). An approximate pass
        returns a new graph computing what its rewrite of `graph` promises instead (e.g. the
        original with a windowed mask); `check_pass` compares against that. Leaves `graph` as it is."""
        return None
