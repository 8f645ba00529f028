"""The vocabulary `shard-sequence`'s rules speak: where a value's sequence sits, partial sums,
the context a rule builds with, and what a rule returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from seqweave.ir.graph import Node, Value


@dataclass(frozen=True)
class Seq:
    """The sequence factor of a value: in dim `dim`, with `inner` elements per position inside that dim."""

    dim: int
    inner: int = 1


@dataclass(frozen=True)
class PartialSum:
    """Each rank holds a partial sum of the value (a contraction over its sequence rows)."""


PARTIAL = PartialSum()


class Unshardable(Exception):
    """This op cannot run on sequence shards (yet); the message says why."""


class Context(Protocol):
    length: int      # global sequence length N, as the model sees it
    padded: int      # N rounded up so it splits over the ranks; positions >= N are masked padding
    world: int
    layout: str      # Layout value: "none" | "zigzag" | "striped"
    attention: str   # "ring" | "ulysses" | "hybrid" | "auto" (per layer, by the cost model)
    ulysses: int     # ranks per Ulysses group under "hybrid"
    positions: Value  # this rank's global positions, int64 [padded / world]

    def seq(self, value: Any) -> Seq | None: ...
    def global_shape(self, value: Value) -> tuple[int, ...]: ...
    def shard(self, value: Value, seq: Seq, fill: int = 0) -> Value: ...
    def emit(self, op: str, args: tuple, kwargs: dict, seqs: list, loc: str, *shapes: tuple) -> list[Value]: ...
    def local(self, size: int) -> int: ...
    def all_reduce(self, value: Value) -> Value: ...


Emit = tuple[str, tuple, dict, list]  # (op, args, kwargs, one Seq | None | PARTIAL per result)
#: An Emit whose op is EMITTED carries, in place of args, the result values the rule built itself.
EMITTED = "="
Rule = Callable[[Context, Node, tuple, dict], Emit]



def as_sharded(ctx: Context, value: Value, seq: Seq) -> Value:
    """`value` holding the sequence as `seq`: this rank's rows if it is whole (free: every rank
    holds it), itself if it already does; refused if it is sharded some other way."""
    have = ctx.seq(value)
    if have == seq:
        return value
    if have is None and ctx.global_shape(value)[seq.dim] % (ctx.length * seq.inner) == 0:
        return ctx.shard(value, seq)
    raise Unshardable(f"operands hold the sequence in different places ({have} vs {seq})")
