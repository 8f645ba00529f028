"""What every IR op defines: type inference, verification and a plain-torch reference."""
from __future__ import annotations

from typing import Any, ClassVar

from seqweave.errors import SeqweaveError
from seqweave.ir.graph import Node
from seqweave.ir.types import ValueType


class VerificationError(SeqweaveError, ValueError):
    """The graph breaks an IR invariant; the message names the node and what is wrong."""


class OpDef:
    """Semantics of one op name. Subclasses are stateless; one instance serves every node."""

    name: ClassVar[str] = ""
    #: Pure ops may be removed when their results are unused; collectives never are.
    pure: ClassVar[bool] = True

    def infer(self, node: Node) -> list[ValueType] | None:
        """Result types computed from the operands and attributes, or None when not inferable."""
        return None

    def verify(self, node: Node) -> None:
        """Raise `VerificationError` if the node's operands or attributes are malformed."""

    def workspace(self, node: Node) -> int:
        """Bytes the op may allocate inside itself while it runs, besides its results (0 for most
        ops; attention holds tiles and exchange buffers). The memory plan reserves them."""
        return 0

    def reference(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        """Compute the results with plain torch (a tensor, or a tuple for several results)."""
        raise NotImplementedError(f"{self.name} has no reference implementation")


def fail(node: Node, message: str) -> VerificationError:
    """A verification error that names the node, its location and its first result."""
    where = f" at {node.loc}" if node.loc else ""
    first = f"%{node.results[0].name} = " if node.results else ""
    return VerificationError(f"{first}{node.op}{where}: {message}")
