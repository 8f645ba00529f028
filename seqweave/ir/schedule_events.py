"""The events of a sharded program's collective schedule: what each rank sends, receives and joins, in order.

A sharded graph is the same on every rank, but what a rank communicates is not: the ring plan
skips sends per rank and step, hybrid ranks sit in different groups. `collective_schedule`
derives one rank's events from node attributes and local types with the same pure decisions
the runtime makes (`ir/sharding.py`: ring plans and paths, hybrid groups, LASP-2 run tables,
message tags), transfer for transfer as `runtime/distributed_ops.py` and the modules it calls
issue them. `check_schedule` (`ir/schedule.py`) then proves that the ranks agree before
any of them runs.

Events come in batches: a batch is posted at once and waited for as a whole (one ring step's
shifts, or one collective), which is how the runtime issues them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from seqweave.errors import ScheduleError
from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.ops import op_def
from seqweave.ir.ops.attn_reference import lse_dtype
from seqweave.ir.ops.linear_attn_reference import state_dtype
from seqweave.ir.positions import Rope, parse_positions
from seqweave.ir.sharding import (CH_GRADS, CH_HOME, CH_KV, Layout, RingPlan, hybrid_groups, hybrid_plan, kv_repeat,
                                  message_tag, plan_ring, run_table, shard_positions)
from seqweave.ir.types import DTYPE_NAMES, TensorType

Payload = tuple[tuple[int, ...], torch.dtype]  # what one message or collective carries per rank


@dataclass(frozen=True)
class Event:
    """One transfer a rank takes part in."""

    kind: str                  # all_gather | all_reduce | all_to_all | send | recv
    comm: str                  # the communicator: "world", or hybrid's "ulysses" / "ring" groups
    group: tuple[int, ...]     # its members (world ranks, in group-rank order)
    shape: tuple[int, ...]     # this rank's payload (all_to_all: one chunk)
    dtype: torch.dtype
    node: str                  # the IR node that issues it: "%out = attn.ring"
    what: str                  # the runtime's name for the transfer
    batch: int                 # events of one batch are posted together, then waited for together
    peer: int | None = None    # send / recv: the other rank (world rank)
    tag: int | None = None

    @property
    def is_collective(self) -> bool:
        return self.peer is None

    def signature(self) -> tuple:
        """What every member of a collective must agree on."""
        return self.kind, self.comm, self.group, self.shape, self.dtype

    def text(self) -> str:
        payload = f"[{', '.join(map(str, self.shape))}] {DTYPE_NAMES.get(self.dtype, str(self.dtype))}"
        if self.is_collective:
            core = f"{self.kind} {payload} over {self.group}"
        else:
            core = f"{self.kind} {payload} {'to' if self.kind == 'send' else 'from'} rank {self.peer} tag {self.tag}"
        return f"{core}  ({self.node}: {self.what})"


@dataclass(frozen=True)
class _Group:
    """This rank's view of one communicator: its members and its own index among them."""

    name: str
    members: tuple[int, ...]
    me: int

    @property
    def size(self) -> int:
        return len(self.members)

    def at(self, index: int) -> int:
        """The world rank of group rank `index` (mod the group size, as the ring counts)."""
        return self.members[index % self.size]


@dataclass
class _Recorder:
    """Collects one rank's events; `node` names the IR node being scheduled."""

    events: list[Event] = field(default_factory=list)
    batch: int = 0
    node: str = ""

    def collective(self, kind: str, group: _Group, payload: Payload, what: str) -> None:
        self.wait()
        self.events.append(Event(kind, group.name, group.members, *payload, self.node, what, self.batch))
        self.wait()

    def exchange(self, group: _Group, sends: list[int], recvs: list[int], tag: int, payload: Payload,
                 what: str) -> None:
        """Point-to-point sends and receives (group ranks), sends first as `Communicator.exchange` posts them."""
        for kind, peers in (("send", sends), ("recv", recvs)):
            for peer in peers:
                self.events.append(Event(kind, group.name, group.members, *payload, self.node, what, self.batch,
                                         group.at(peer), tag))

    def wait(self) -> None:
        """Close the open batch (if it holds anything): the rank waits for all of it here."""
        if self.events and self.events[-1].batch == self.batch:
            self.batch += 1


class Plans:
    """Ring plans and run tables, planned once per check (every rank reads the same ones)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, object] = {}

    def _get(self, key: tuple, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def ring(self, mask: str, layout: str, world: int, length: int) -> RingPlan:
        return self._get(("ring", mask, layout, world, length),
                         lambda: plan_ring(parse_mask(mask), Layout(layout), world, length))

    def hybrid(self, mask: str, layout: str, world: int, length: int, ulysses: int) -> RingPlan:
        positions_of = lambda rank: shard_positions(Layout(layout), rank, world, length)  # noqa: E731
        return self._get(("hybrid", mask, layout, world, length, ulysses),
                         lambda: hybrid_plan(parse_mask(mask), positions_of, ulysses, world // ulysses))

    def runs_width(self, layout: str, world: int, length: int) -> int:
        positions_of = lambda rank: shard_positions(Layout(layout), rank, world, length)  # noqa: E731
        return self._get(("runs", layout, world, length), lambda: run_table(positions_of, world).width)


@dataclass
class _Rank:
    """What a rule needs: who this rank is, the plans, and where its events go."""

    rank: int
    world: int
    ulysses: int
    plans: Plans
    out: _Recorder

    def world_group(self) -> _Group:
        return _Group("world", tuple(range(self.world)), self.rank)

    def hybrid_groups(self, ulysses: int) -> tuple[_Group, _Group]:
        """(this rank's Ulysses group, its ring group), as `runtime/hybrid.py` creates them."""
        inner, outer = hybrid_groups(self.world, ulysses)
        group, member = divmod(self.rank, ulysses)
        return _Group("ulysses", tuple(inner[group]), member), _Group("ring", tuple(outer[member]), group)


# ------------------------------------------------------------------ payloads

def _type(value: Value) -> TensorType:
    return value.type


def _numel(value: Value, copies: int = 1) -> int:
    count = copies
    for size in _type(value).shape:
        count *= int(size)
    return count


def _shape(value: Value) -> tuple[int, ...]:
    return tuple(int(size) for size in _type(value).shape)


def _kv_payload(k: Value, v: Value, copies: int = 1) -> Payload:
    """k and v packed into one flat message (`_pack`: torch.cat promotes to a common dtype)."""
    return (_numel(k, copies) + _numel(v, copies),), torch.promote_types(_type(k).dtype, _type(v).dtype)


def _swap(out: _Recorder, group: _Group, parts: list[tuple[int, torch.dtype]], what: str) -> None:
    """Ulysses' `_swap`: one all-to-all per dtype (first-seen order) of every tensor's 1/P chunk packed."""
    for dtype in dict.fromkeys(dtype for _, dtype in parts):
        chunk = sum(numel for numel, same in parts if same == dtype) // group.size
        out.collective("all_to_all", group, ((chunk,), dtype), what)


def _part(value: Value, copies: int = 1) -> tuple[int, torch.dtype]:
    return _numel(value, copies), _type(value).dtype


# ------------------------------------------------------------------ the ring

def _check_delivery(out: _Recorder, group: _Group, plan: RingPlan, step: int) -> None:
    """A step that computes needs the K/V it computes with: the runtime would stop there
    (`_held_kv`); say so now, naming the rank whose send is missing."""
    rank = group.me
    if plan.computes(rank, step) and not plan.holds(rank, step):
        source, previous = plan.source(rank, step), (rank - 1) % group.size
        raise ScheduleError(f"{out.node}: rank {group.at(rank)} computes at ring step {step} with the K/V of rank "
                            f"{group.at(source)}, which never reach it: rank {group.at(previous)} does not forward "
                            f"them at step {step - 1}", hint="the ring plan's sends must reach every rank whose "
                            "step is not EMPTY (ir/sharding.py plan_from_positions)")


def _ring_forward(out: _Recorder, group: _Group, plan: RingPlan, kv: Payload) -> None:
    """`ring_attention_forward`: at each step, shift K/V to rank+1 where the plan forwards them."""
    rank = group.me
    for step in range(group.size):
        _check_delivery(out, group, plan, step)
        sends = [rank + 1] if plan.forwards(rank, step) else []
        recvs = [rank - 1] if plan.forwards((rank - 1) % group.size, step) else []
        out.exchange(group, sends, recvs, message_tag(step, CH_KV), kv, f"ring forward shift of k/v, step {step}")
        out.wait()


def _ring_backward(out: _Recorder, group: _Group, plan: RingPlan, kv: Payload, grads: Payload) -> None:
    """`ring_attention_backward`: K/V and their dK/dV travel together; the path's last holder sends dK/dV home."""
    rank = group.me
    hops = plan.hops(rank)  # how far this rank's own K/V travel: its dK/dV come home from there
    for step in range(group.size):
        _check_delivery(out, group, plan, step)
        previous_forwards = plan.forwards((rank - 1) % group.size, step)
        forwards = plan.forwards(rank, step)
        out.exchange(group, [rank + 1] if forwards else [], [rank - 1] if previous_forwards else [],
                     message_tag(step, CH_KV), kv, f"ring backward shift of k/v, step {step}")
        out.exchange(group, [rank + 1] if forwards else [], [rank - 1] if previous_forwards else [],
                     message_tag(step, CH_GRADS), grads, f"ring backward shift of dk/dv, step {step}")
        source = plan.source(rank, step)
        last_holder = plan.holds(rank, step) and not forwards
        home_send = [source] if last_holder and source != rank else []
        home_recv = [rank + hops] if hops == step and hops > 0 else []
        out.exchange(group, home_send, home_recv, message_tag(step, CH_HOME), grads,
                     f"ring backward return of dk/dv, step {step}")
        out.wait()


def _branch_masks(node: Node) -> list[str]:
    """The mask of each set of pairs the op attends: its own, and a far rotation's (`attn_positions`)."""
    spec = parse_positions(node.kwargs.get("positions", "none"))
    far = [spec.far] if isinstance(spec, Rope) and spec.far else []
    return [node.kwargs["mask"], *far]


def _qkv(node: Node) -> tuple[Value, Value, Value]:
    first = 1 if node.op.endswith("_backward") else 0
    return node.args[first], node.args[first + 1], node.args[first + 2]


def _ring(ctx: _Rank, node: Node) -> None:
    kw, (q, k, v) = node.kwargs, _qkv(node)
    for mask in _branch_masks(node):
        plan = ctx.plans.ring(mask, kw["layout"], kw["world"], kw["length"])
        if node.op.endswith("_backward"):
            grads = (_kv_payload(k, v)[0], lse_dtype(_type(q).dtype))  # dK/dV accumulate like lse
            _ring_backward(ctx.out, ctx.world_group(), plan, _kv_payload(k, v), grads)
        else:
            _ring_forward(ctx.out, ctx.world_group(), plan, _kv_payload(k, v))


# ------------------------------------------------------------------ Ulysses and hybrid

def _ulysses(ctx: _Rank, node: Node) -> None:
    group, (q, k, v) = ctx.world_group(), _qkv(node)
    copies = kv_repeat(group.size, int(_type(k).shape[1]))
    for _ in _branch_masks(node):
        if node.op.endswith("_backward"):
            dout, out_, lse = node.args[0], node.args[4], node.args[5]
            _swap(ctx.out, group, [_part(dout), _part(q), _part(k, copies), _part(v, copies), _part(out_),
                                   _part(lse)], "ulysses backward all-to-all of dout/q/k/v/out/lse")
            dq, dk, dv = node.results
            _swap(ctx.out, group, [_part(dq), _part(dk, copies), _part(dv, copies)],
                  "ulysses backward all-to-all of dq/dk/dv")
        else:
            _swap(ctx.out, group, [_part(q), _part(k, copies), _part(v, copies)],
                  "ulysses forward all-to-all of q/k/v")
            _swap(ctx.out, group, [_part(r) for r in node.results], "ulysses forward all-to-all of out/lse")


def _hybrid(ctx: _Rank, node: Node) -> None:
    kw, (q, k, v) = node.kwargs, _qkv(node)
    ulysses = kw.get("ulysses", ctx.ulysses)
    inner, outer = ctx.hybrid_groups(ulysses)
    copies = kv_repeat(inner.size, int(_type(k).shape[1]))
    kv = _kv_payload(k, v, copies)
    for mask in _branch_masks(node):
        plan = ctx.plans.hybrid(mask, kw["layout"], kw["world"], kw["length"], ulysses)
        if node.op.endswith("_backward"):
            dout, out_, lse = node.args[0], node.args[4], node.args[5]
            _swap(ctx.out, inner, [_part(dout), _part(q), _part(k, copies), _part(v, copies), _part(out_),
                                   _part(lse)], "hybrid backward all-to-all")
            _ring_backward(ctx.out, outer, plan, kv, (kv[0], lse_dtype(_type(q).dtype)))
            dq, dk, dv = node.results
            _swap(ctx.out, inner, [_part(dq), _part(dk, copies), _part(dv, copies)],
                  "hybrid backward all-to-all of dq/dk/dv")
        else:
            _swap(ctx.out, inner, [_part(q), _part(k, copies), _part(v, copies)], "hybrid forward all-to-all of q/k/v")
            _ring_forward(ctx.out, outer, plan, kv)
            _swap(ctx.out, inner, [_part(r) for r in node.results], "hybrid forward all-to-all of out/lse")


# ------------------------------------------------------------------ gathers, sums, LASP-2

def _gather(ctx: _Rank, node: Node) -> None:
    x = node.args[0]
    ctx.out.collective("all_gather", ctx.world_group(), (_shape(x), _type(x).dtype),
                       f"gather of %{node.results[0].name}")


def _all_reduce(ctx: _Rank, node: Node) -> None:
    x = node.args[0]
    ctx.out.collective("all_reduce", ctx.world_group(), (_shape(x), _type(x).dtype),
                       f"all_reduce of %{node.results[0].name}")


def _transition_numel(recurrence: str, batch: int, heads: int, d_k: int) -> int:
    """Elements of one run's transition T (`runtime/lasp2._summary`): none for a constant decay
    (known from the run's length), a diagonal for GLA, a d_k x d_k matrix otherwise."""
    if recurrence == "decay":
        return 0
    return batch * heads * d_k * (1 if recurrence == "gla" else d_k)


def _lasp2(ctx: _Rank, node: Node) -> None:
    """One all-gather of every run's end state (and transition; backward: and demand), [runs width, X]."""
    kw, backward = node.kwargs, node.op.endswith("_backward")
    q, k, v = _qkv(node)
    batch, heads, _, d_k = _shape(k)
    d_v = _shape(v)[3]
    per_run = batch * heads * d_k * d_v + _transition_numel(kw.get("recurrence", "decay"), batch, heads, d_k)
    if backward:
        per_run += _shape(q)[0] * _shape(q)[1] * d_k * d_v  # the demand G on the run's start state
    width = ctx.plans.runs_width(kw["layout"], kw["world"], kw["length"])
    what = "lasp2 states and state gradients" if backward else "lasp2 states"
    ctx.out.collective("all_gather", ctx.world_group(), ((width, per_run), state_dtype(_type(q).dtype)), what)


RULES: dict[str, Callable[[_Rank, Node], None]] = {
    "sp.gather": _gather, "sp.all_reduce": _all_reduce,
    "attn.ring": _ring, "attn.ring_backward": _ring,
    "attn.ulysses": _ulysses, "attn.ulysses_backward": _ulysses,
    "attn.hybrid": _hybrid, "attn.hybrid_backward": _hybrid,
    "attn.lasp2": _lasp2, "attn.lasp2_backward": _lasp2,
}


def communicates(node: Node) -> bool:
    """Does the op talk to other ranks? (the sp dialect's runtime-bound ops: never pure)"""
    return node.op.startswith(("sp.", "attn.")) and not op_def(node.op).pure


def collective_schedule(graph: Graph, rank: int, world: int, ulysses: int = 1) -> list[Event]:
    """This rank's communication events in program order. `ulysses` is the hybrid group size for
    hybrid attention that does not carry its own `ulysses` attribute."""
    return rank_schedule(graph, rank, world, ulysses, Plans())


def rank_schedule(graph: Graph, rank: int, world: int, ulysses: int, plans: Plans) -> list[Event]:
    """`collective_schedule` with plans shared between the ranks of one check."""
    ctx = _Rank(rank, world, ulysses, plans, _Recorder())
    for index, node in enumerate(graph.nodes):
        if not communicates(node):
            continue
        if node.op not in RULES:
            raise ScheduleError(f"no schedule rule for {node.op}: cannot tell what it sends", op=node.op,
                                hint="add a rule to ir/schedule_events.py RULES that mirrors what the runtime sends")
        planned = node.kwargs.get("world", world)
        if planned != world:
            raise ScheduleError(f"%{node.results[0].name} = {node.op} is planned for {planned} ranks but the program "
                                f"runs on {world}", op=node.op, hint="shard the graph for the mesh it runs on")
        ctx.out.node = f"%{node.results[0].name} = {node.op} (node {index})"
        RULES[node.op](ctx, node)
    return ctx.out.events


def format_schedule(events: list[Event]) -> str:
    """One line per event: its step (index), its batch, and what it moves."""
    return "\n".join(f"{step:>3} b{event.batch:<3} {event.text()}" for step, event in enumerate(events))


def schedule_text(graph: Graph, world: int, ulysses: int = 1) -> str:
    """Every rank's schedule, for reading and golden tests."""
    plans = Plans()
    return "\n".join(f"rank {rank}:\n{format_schedule(rank_schedule(graph, rank, world, ulysses, plans))}"
                     for rank in range(world)) + "\n"
