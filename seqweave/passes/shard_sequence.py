"""`shard-sequence`: run a whole-sequence graph on P ranks, each holding N/P positions.

Every input is whole on every rank (inputs="replicated"), so taking a rank's rows of a value
is free. `sequence_plan.py` finds, backwards from the attentions, where each value feeding
one holds the sequence; the pass takes the rows of such values at their first use on that
path and carries the shard forward with one rule per op (`sharding_rules.py` and the
contraction and reduction rules beside it). Attention becomes `attn.ring`, `attn.ulysses` or
`attn.hybrid`, linear attention `attn.lasp2`; outputs are gathered back into global order, or
kept sharded (`outputs`). The result has LOCAL shapes, every tensor typed `{sp: S(d)}` or
`{sp: R}`, and one extra input: this rank's global positions (`sp_positions`, int64 [N/P]),
which keeps the graph the same on every rank.

Invariants: positions (RoPE, masks) stay global; a value is sharded at most one way; an op
with no rule (or whose rule cannot run it on shards) only ever sees whole values: its sharded
operands are gathered first, and the pass result names the op (with `gather_unshardable=False`
the pass refuses instead).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seqweave.errors import PassError
from seqweave.ir.graph import Graph, Node, Value, map_values, values_in
from seqweave.ir.ops import op_def
from seqweave.ir.ops.sp import SP_AXIS
from seqweave.ir.sharding import Layout, padded_length
from seqweave.ir.types import Partial, Replicate, Shard, TensorType
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.sequence_plan import plan_sequence
from seqweave.passes.sharding_context import EMITTED, PARTIAL, Seq, Unshardable
from seqweave.passes.sharding_rules import rule_for

POSITIONS_INPUT = "sp_positions"
#: Ops linear in their first operand: a partial sum stays a partial sum through them.
PARTIAL_LINEAR = frozenset(f"core.{name}" for name in (
    "view", "_unsafe_view", "reshape", "t", "transpose.int", "clone", "neg", "unsqueeze", "squeeze.dim",
    "mul.Scalar", "div.Scalar", "sum.dim_IntList", "detach", "_to_copy", "alias"))


def _placed(t: Any, seq: Any) -> Any:
    if not isinstance(t, TensorType):
        return t
    placement = Partial() if seq is PARTIAL else Shard(seq.dim) if seq else Replicate()
    return TensorType(t.shape, t.dtype, ((SP_AXIS, placement),))


def _local(t: Any, seq: Seq | None, local: Any) -> Any:
    """The type of this rank's piece of a value arriving sharded (`local` maps a dim's size)."""
    if seq is None or not isinstance(t, TensorType):
        return t
    shape = list(t.shape)
    shape[seq.dim] = local(int(shape[seq.dim]))
    return TensorType.of(shape, t.dtype, t.placements)


class _Builder:
    """Builds the sharded graph; implements the rules' Context."""

    def __init__(self, graph: Graph, world: int, layout: Layout, length: int,
                 input_seqs: dict[int, Seq], attention: str, ulysses: int, gather_unshardable: bool) -> None:
        self.world, self.layout, self.length, self.attention = world, layout.value, length, attention
        self.plan = plan_sequence(graph, length)  # where each value feeding an attention holds the sequence
        self.taken_shards: dict[tuple[Value, Seq, int], Value] = {}
        self.gather_unshardable = gather_unshardable
        self.kept_whole: list[str] = []  # ops that ran on gathered (whole) operands, and why
        self.whole: dict[Value, Value] = {}  # sharded value -> its gathered whole
        self.ulysses = ulysses
        self.padded = padded_length(length, world, layout)
        self.seqs: dict[Value, Any] = {}
        self.global_shapes: dict[Value, tuple[int, ...]] = {}
        self.positions = Value(POSITIONS_INPUT, TensorType.of((self.padded // world,), torch.int64,
                                                              ((SP_AXIS, Replicate()),)))
        inputs = [Value(v.name, _placed(_local(v.type, input_seqs.get(i), self.local), input_seqs.get(i)))
                  for i, v in enumerate(graph.inputs)]
        for index, (old, new) in enumerate(zip(graph.inputs, inputs)):
            self._record(new, old, input_seqs.get(index))
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
        found = self.seqs.get(value) if isinstance(value, Value) else None
        return found if isinstance(found, Seq) else None

    def partial(self, value: Any) -> bool:
        return isinstance(value, Value) and self.seqs.get(value) is PARTIAL

    def all_reduce(self, value: Value) -> Value:
        return self.emit("sp.all_reduce", (value,), {}, [None], "", self.global_shape(value))[0]

    def global_shape(self, value: Value) -> tuple[int, ...]:
        return self.global_shapes[value]

    def local(self, size: int) -> int:
        """This rank's size of a dim holding the sequence factor: outer * N * inner -> outer * N'/P * inner."""
        return size // self.length * (self.padded // self.world)

    def shard(self, value: Value, seq: Seq, fill: int = 0) -> Value:
        """This rank's rows of a whole value (taken once per value, place and fill)."""
        key = (value, seq, fill)
        if key not in self.taken_shards:
            kwargs = {"dim": seq.dim, "inner": seq.inner, "length": self.length}
            if self.padded != self.length:
                kwargs.update(padded=self.padded, fill=fill)
            (result,) = self.emit("sp.shard", (value, self.positions), kwargs, [seq], "", self.global_shape(value))
            self.shards += 1
            self.taken_shards[key] = result
        return self.taken_shards[key]

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

    def _partial_rule(self, old: Node, args: tuple, kwargs: dict) -> tuple:
        """Partial sums pass through ops linear in them; anything else sees them all-reduced first."""
        operands = [v for v in values_in((args, kwargs)) if isinstance(v.type, TensorType)]
        partial = [v for v in operands if self.partial(v)]
        others_whole = all(self.seqs.get(v) is None for v in operands if v not in partial)
        if old.op in PARTIAL_LINEAR and partial == [args[0]] and others_whole:
            return old.op, args, kwargs, [PARTIAL]
        if old.op in ("core.add.Tensor", "core.sub.Tensor") and len(partial) == len(operands) == 2:
            return old.op, args, kwargs, [PARTIAL]
        if old.op == "core.mul.Tensor" and len(partial) == 1 and others_whole:
            return old.op, args, kwargs, [PARTIAL]
        reduce = lambda v: self.gathered(v) if self.partial(v) else v  # noqa: E731 (all-reduced once)
        return rule_for(self, old, map_values(args, reduce), map_values(kwargs, reduce))

    def _rule(self, old: Node, args: tuple, kwargs: dict) -> tuple:
        if any(self.partial(v) for v in values_in((args, kwargs))):
            return self._partial_rule(old, args, kwargs)
        return rule_for(self, old, args, kwargs)

    def _whole(self, old: Node, args: tuple, kwargs: dict, why: Unshardable) -> tuple:
        """Run `old` on whole values: gather its sharded operands (exact, at the cost of a
        whole-sequence tensor on every rank; counted in the pass result and named in its detail).
        Attention is never run whole: that would be the N x N work the pass exists to split."""
        if not self.gather_unshardable or old.op.startswith("attn."):
            raise why
        args, kwargs = map_values(args, self.gathered), map_values(kwargs, self.gathered)
        self.kept_whole.append(f"{old.op} ({why})")
        return old.op, args, kwargs, [None] * len(old.results)

    def _operand(self, old: Value, feeds_attention: bool) -> Value:
        """The operand in the sharded graph: on a path into an attention, a whole value the plan
        places is taken as this rank's rows (free), so token-wise work before the attention is
        split too; elsewhere as it is."""
        new = self.mapping[old]
        seq = self.plan.get(old) if feeds_attention else None
        if seq is None or self.seqs.get(new) is not None:
            return new
        return self.shard(new, seq)

    def node(self, old: Node) -> None:
        feeds_attention = any(result in self.plan for result in old.results)
        args = map_values(old.args, lambda value: self._operand(value, feeds_attention))
        kwargs = map_values(old.kwargs, lambda value: self._operand(value, feeds_attention))
        try:
            op, args, kwargs, seqs = self._rule(old, args, kwargs)
        except Unshardable as why:
            op, args, kwargs, seqs = self._whole(old, args, kwargs, why)
        if op == EMITTED:
            results = list(args)
        else:
            shapes = [tuple(int(d) for d in r.type.shape) if isinstance(r.type, TensorType) else () for r in old.results]
            names = [value.name for value in old.results]  # the sharded graph keeps the original names
            results = self.emit(op, args, kwargs, seqs, old.loc, *shapes, names=names)
        for old_value, new_value in zip(old.results, results):
            self.mapping[old_value] = new_value

    def gathered(self, value: Value) -> Value:
        """The whole value on every rank; each value is gathered (or all-reduced) at most once."""
        if value not in self.whole:
            self.whole[value] = self._gather(value)
        return self.whole[value]

    def _gather(self, value: Value) -> Value:
        if self.partial(value):
            return self.all_reduce(value)
        seq = self.seq(value)
        if seq is None:
            return value
        kwargs = {"dim": seq.dim, "inner": seq.inner, "length": self.padded, "world": self.world,
                  "layout": self.layout}
        if self.padded != self.length:
            kwargs["true_length"] = self.length
        return self.emit("sp.gather", (value,), kwargs, [None], "", self.global_shape(value))[0]


def _flat_outputs(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


@dataclass(frozen=True)
class ShardSequence(Pass):
    """Split the sequence over `world` ranks (`layout`: zigzag, striped or none); attention runs as
    ring or Ulysses (`attention`)."""

    name = "shard-sequence"
    idempotent = False  # its output is another dialect (local shapes, positions input): not run twice
    world: int = 2
    layout: str = "zigzag"
    length: int = 0  # the global sequence length N; padded (and masked) up to what splits over the ranks
    attention: str = "ring"  # "ring" | "ulysses" | "hybrid" | "auto": per layer, the fewest bytes by the cost model
    ulysses: int = 1  # ranks per Ulysses group under "hybrid" (ring across world // ulysses groups)
    #: outputs from this index on stay sharded (a training forward's activations saved for backward)
    keep_sharded_from: int = -1
    #: "sharded": outputs the caller sees stay sharded where their sequence is one plain dim
    #: (returned as DTensors by the runtime); "gathered": gathered whole on every rank
    outputs: str = "gathered"
    #: inputs that arrive sharded: (input index, dim, inner) (a backward's saved activations)
    input_seqs: tuple[tuple[int, int, int], ...] = ()
    #: an op that cannot run on shards gets its operands gathered whole (exact; costs memory and
    #: bytes, named in the pass result) instead of refusing the graph
    gather_unshardable: bool = True
    #: filled by run(): "output_seqs", one (dim, inner) or None per output, in order
    report: dict = field(default_factory=dict, compare=False, repr=False)

    def run(self, graph: Graph) -> PassResult:
        layout = Layout(self.layout)
        if self.length < 2:
            raise PassError(f"sequence length {self.length}: nothing to split", pass_name=self.name,
                            hint="compile with a sequence of at least 2 tokens, or without sequence parallelism")
        _refuse_what_cannot_be_split(graph)
        builder = _Builder(graph, self.world, layout, self.length,
                           {index: Seq(dim, inner) for index, dim, inner in self.input_seqs}, self.attention,
                           self.ulysses, self.gather_unshardable)
        for node in graph.nodes:
            try:
                builder.node(node)
            except Unshardable as why:
                raise PassError(str(why), pass_name=self.name, op=node.op, layer=node.loc,
                                hint="run this model without sequence parallelism, or report the op") from None
        builder.out.outputs = self._outputs(builder, graph)
        graph.inputs, graph.nodes, graph.outputs = builder.out.inputs, builder.out.nodes, builder.out.outputs
        ops = ("attn.ring", "attn.ulysses", "attn.hybrid", "attn.lasp2")
        strategies = ", ".join(f"{graph.count(op)} {op}" for op in ops if graph.count(op))
        whole = f"; {len(builder.kept_whole)} ops ran on gathered whole operands: " + \
            "; ".join(builder.kept_whole) if builder.kept_whole else ""
        warnings = tuple(f"{entry}: ran on operands gathered whole on every rank" for entry in builder.kept_whole)
        warnings += self._largest_gathered(graph)
        return PassResult(builder.shards, f"{builder.shards} shards taken, {strategies or 'no attention'}{whole}",
                          warnings)

    def _outputs(self, builder: _Builder, graph: Graph) -> Any:
        """Gather (or all-reduce) what the caller sees, unless asked to keep it sharded; keep saved
        activations sharded; say how each output is placed."""
        outputs, seqs, gathered_bytes = [], [], []
        for index, value in enumerate(_flat_outputs(graph.outputs)):
            mapped = builder.mapping.get(value) if isinstance(value, Value) else value
            seq = builder.seq(mapped) if isinstance(mapped, Value) else None
            saved = 0 <= self.keep_sharded_from <= index
            if builder.partial(mapped):  # a partial sum leaves the graph only all-reduced
                mapped = builder.gathered(mapped)
            elif isinstance(mapped, Value) and not saved and not self._stays_sharded(builder, mapped, seq):
                if seq is not None:
                    gathered_bytes.append((index, _bytes(builder.global_shape(mapped), mapped.type.dtype)))
                mapped = builder.gathered(mapped)
            seq = builder.seq(mapped) if isinstance(mapped, Value) else None
            outputs.append(mapped)
            seqs.append((seq.dim, seq.inner) if seq else None)
        self.report["output_seqs"] = seqs
        self.report["gathered_output_bytes"] = gathered_bytes
        return tuple(outputs) if isinstance(graph.outputs, tuple) else outputs

    def _largest_gathered(self, graph: Graph) -> tuple[str, ...]:
        """A gathered output that is the largest tensor this rank holds (logits, typically) is named.
        A backward's outputs are gradients of whole inputs: gathered whatever `outputs` says."""
        gathered = self.report["gathered_output_bytes"] if graph.name != "backward" else []
        local = [_bytes(tuple(int(d) for d in v.type.shape), v.type.dtype) for node in graph.nodes
                 if node.op != "sp.gather" for v in node.results if isinstance(v.type, TensorType)]
        largest = max(local, default=0)
        return tuple(f"output {index} is gathered whole on every rank ({size:,} bytes, the largest tensor per rank); "
                     f"outputs='sharded' keeps it sharded" for index, size in gathered if size >= largest)

    def _stays_sharded(self, builder: _Builder, value: Value, seq: Seq | None) -> bool:
        """outputs="sharded" keeps an output sharded when DTensor's Shard(dim) can describe it: the
        sequence is the whole dim (not folded with batch or features into one)."""
        return self.outputs == "sharded" and seq is not None and seq.inner == 1 and \
            builder.global_shape(value)[seq.dim] == self.length


def _bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _refuse_what_cannot_be_split(graph: Graph) -> None:
    """PassError for a graph already sharded (a second run would split its shards again) and for an
    attention between two lengths (cross-attention: the keys' sequence is not the queries')."""
    sharded = any(value.name == POSITIONS_INPUT for value in graph.inputs) or \
        any(node.op.startswith("sp.") for node in graph.nodes)
    if sharded:
        raise PassError("the graph is already sharded (it has sp.* ops or a positions input)",
                        pass_name=ShardSequence.name, hint="run shard-sequence once, on the whole-sequence graph")
    for node in graph.nodes:
        if node.op in ("attn.sdpa", "attn.sdpa_backward"):
            q, k = node.args[:2] if node.op == "attn.sdpa" else node.args[1:3]  # the backward takes dout first
            q_len, kv_len = q.type.shape[2], k.type.shape[2]
            if q_len != kv_len:
                raise PassError(f"attention from {q_len} queries to {kv_len} keys (cross-attention) cannot be "
                                "split over one sequence", pass_name=ShardSequence.name, op=node.op, layer=node.loc,
                                hint="run this model without sequence parallelism")
