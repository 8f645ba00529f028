"""`shard-sequence`: run a whole-sequence graph on P ranks, each holding N/P positions.

Every input is whole on every rank (inputs="replicated"), so taking a rank's rows of a value
is free; the pass seeds the shard at the token ids of the embedding and carries it forward
through token-local ops with one rule per op (`sharding_rules.py`). Attention becomes
`attn.ring`; sharded outputs are gathered back into global order. The result has LOCAL
shapes, every tensor typed `{sp: S(d)}` or `{sp: R}`, and one extra input: this rank's
global positions (`sp_positions`, int64 [N/P]), which keeps the graph the same on every rank.

Invariants: positions (RoPE, masks) stay global; a value is sharded at most one way; an op
with no rule only ever sees whole values, else the pass refuses with the op's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqweave.errors import PassError
from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.ops import op_def
from seqweave.ir.ops.sp import SP_AXIS
from seqweave.ir.sharding import Layout, padded_length
from seqweave.ir.types import Replicate, Shard, TensorType
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.sharding_rules import Seq, Unshardable, rule_for

POSITIONS_INPUT = "sp_positions"


def _placed(t: Any, seq: Seq | None) -> Any:
    if not isinstance(t, TensorType):
        return t
    return TensorType(t.shape, t.dtype, ((SP_AXIS, Shard(seq.dim) if seq else Replicate()),))


class _Builder:
    """Builds the sharded graph; implements the rules' Context."""

    def __init__(self, graph: Graph, world: int, layout: Layout, length: int) -> None:
        self.world, self.layout, self.length = world, layout.value, length
        self.seqs: dict[Value, Seq | None] = {}
        self.global_shapes: dict[Value, tuple[int, ...]] = {}
        self.positions = Value(POSITIONS_INPUT, TensorType.of((length // world,), torch.int64, ((SP_AXIS, Replicate()),)))
        inputs = [Value(v.name, _placed(v.type, None)) for v in graph.inputs]
        for old, new in zip(graph.inputs, inputs):
            self._record(new, old, None)
        self.mapping: dict[Value, Value] = dict(zip(graph.inputs, inputs))
        self.out = Graph(graph.name, [*inputs, self.positions], [], (), list(graph.notes))
        self.taken = {value.name for value in graph.values()} | {POSITIONS_INPUT}
        self.shards = 0

    def _record(self, new: Value, old: Value, seq: Seq | None) -> None:
        self.seqs[new] = seq
        if isinstance(old.type, TensorType):
            self.global_shapes[new] = tuple(int(d) for d in old.type.shape)

    # -- Context
    def seq(self, value: Any) -> Seq | None:
        return self.seqs.get(value) if isinstance(value, Value) else None

    def global_shape(self, value: Value) -> tuple[int, ...]:
        return self.global_shapes[value]

    def shard(self, value: Value, seq: Seq) -> Value:
        kwargs = {"dim": seq.dim, "inner": seq.inner, "length": self.length}
        (result,) = self.emit("sp.shard", (value, self.positions), kwargs, [seq], "", self.global_shape(value))
        self.shards += 1
        return result

    # -- building
    def fresh(self, stem: str) -> str:
        name, index = stem, 0
        while name in self.taken:
            index += 1
            name = f"{stem}_{index}"
        self.taken.add(name)
        return name

    def emit(self, op: str, args: tuple, kwargs: dict, seqs: list[Seq | None], loc: str,
             *global_shapes: tuple[int, ...], names: list[str] | None = None) -> list[Value]:
        node = Node(op, args, kwargs, [], loc)
        types = op_def(op).infer(node)
        if types is None:
            raise Unshardable(f"cannot type {op} on shards")
        names = names or [self.fresh(op.split(".")[1]) for _ in types]
        node.results = [Value(name, _placed(t, s)) for name, t, s in zip(names, types, seqs)]
        for value, seq, shape in zip(node.results, seqs, global_shapes):
            value.producer = node
            self.seqs[value] = seq
            self.global_shapes[value] = shape
        self.out.nodes.append(node)
        return node.results

    def node(self, old: Node) -> None:
        args = map_values(old.args, self.mapping.__getitem__)
        kwargs = map_values(old.kwargs, self.mapping.__getitem__)
        op, args, kwargs, seqs = rule_for(self, old, args, kwargs)
        shapes = [tuple(int(d) for d in r.type.shape) if isinstance(r.type, TensorType) else () for r in old.results]
        names = [value.name for value in old.results]  # the sharded graph keeps the original names
        for old_value, new_value in zip(old.results, self.emit(op, args, kwargs, seqs, old.loc, *shapes, names=names)):
            self.mapping[old_value] = new_value

    def gathered(self, value: Value) -> Value:
        seq = self.seq(value)
        if seq is None:
            return value
        kwargs = {"dim": seq.dim, "inner": seq.inner, "length": self.length, "world": self.world,
                  "layout": self.layout}
        return self.emit("sp.gather", (value,), kwargs, [None], "", self.global_shape(value))[0]


@dataclass(frozen=True)
class ShardSequence(Pass):
    """Split the sequence over `world` ranks (`layout`: zigzag, striped or none)."""

    name = "shard-sequence"
    world: int = 2
    layout: str = "zigzag"
    length: int = 0  # the global sequence length N; must split evenly (pad the inputs first)

    def run(self, graph: Graph) -> PassResult:
        layout = Layout(self.layout)
        if self.length < 2:
            raise PassError(f"sequence length {self.length}: nothing to split", pass_name=self.name,
                            hint="compile with a sequence of at least 2 tokens, or without sequence parallelism")
        if self.length != padded_length(self.length, self.world, layout):
            raise PassError(f"sequence length {self.length} does not split over {self.world} ranks ({layout.value})",
                            pass_name=self.name, hint=f"pad the inputs to {padded_length(self.length, self.world, layout)}")
        builder = _Builder(graph, self.world, layout, self.length)
        for node in graph.nodes:
            try:
                builder.node(node)
            except Unshardable as why:
                raise PassError(str(why), pass_name=self.name, op=node.op, layer=node.loc,
                                hint="run this model without sequence parallelism, or report the op") from None
        builder.out.outputs = map_values(graph.outputs, lambda v: builder.gathered(builder.mapping[v]))
        graph.inputs, graph.nodes, graph.outputs = builder.out.inputs, builder.out.nodes, builder.out.outputs
        return PassResult(builder.shards, f"{builder.shards} shards taken, {graph.count('attn.ring')} ring attentions")
