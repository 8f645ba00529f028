"""A static check of a sharded program's collective schedule, run before any rank communicates.

`collective_schedule(graph, rank, world)` lists one rank's transfers (`ir/schedule_events.py`
derives them as the runtime issues them). `check_schedule` proves that the ranks agree:

1. collectives: on every communicator, every member issues the same collectives (kind, group,
   shape, dtype) in the same order;
2. point-to-point: every send has its receive on the peer (same tag, shape and dtype, matched
   in order as gloo and NCCL match them) and every receive its send;
3. progress: simulating the blocking order (a rank waits for its whole batch; a send completes
   only when received, as under NCCL: conservative) every rank reaches its end; otherwise the
   wait cycle (networkx) is reported.

The first mismatch raises `ScheduleError` naming both ranks and their steps (index in the
rank's schedule). `dead_or_duplicate_collectives` finds collectives nobody reads and collectives
issued twice on the same operands; the compiler refuses either (`check_sharded_program`).
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from seqweave.errors import ScheduleError
from seqweave.ir.graph import Graph, Node, map_values
from seqweave.ir.schedule_events import Event, Plans, collective_schedule, communicates, rank_schedule, schedule_text

__all__ = ["Event", "ScheduleError", "check_schedule", "check_sharded_program", "collective_schedule",
           "dead_or_duplicate_collectives", "schedule_text"]

HINT = ("the ranks would hang or exchange the wrong data: a rank-dependent decision (ring plan, group, a "
        "condition on the rank) differs between them; compare the two ranks' schedules with "
        "seqweave.ir.schedule.schedule_text(graph, world)")


@dataclass(frozen=True)
class _At:
    """One event in one rank's schedule."""

    rank: int
    step: int
    event: Event

    def text(self) -> str:
        return f"rank {self.rank} step {self.step}: {self.event.text()}"


def check_schedule(graph: Graph, world: int, ulysses: int = 1) -> None:
    """Raise ScheduleError at the first disagreement between the ranks' schedules (see module doc)."""
    plans = Plans()
    schedules = [rank_schedule(graph, rank, world, ulysses, plans) for rank in range(world)]
    _collectives_agree(schedules)
    partners = _messages_pair(schedules)
    _no_wait_cycle(schedules, partners)


def _fail(message: str) -> ScheduleError:
    return ScheduleError(message, hint=HINT)


def _earliest(problems: list[tuple[int, int, str]]) -> None:
    """Raise the problem found earliest in program order (step, then rank)."""
    if problems:
        raise _fail(min(problems)[2])


# ------------------------------------------------------------------ 1. collectives

def _collectives_agree(schedules: list[list[Event]]) -> None:
    sequences: dict[tuple, dict[int, list[_At]]] = {}
    for rank, events in enumerate(schedules):
        for step, event in enumerate(events):
            if not event.is_collective:
                continue
            at = _At(rank, step, event)
            if rank not in event.group:
                raise _fail(f"{at.text()} is a collective over a group without rank {rank}")
            members = sequences.setdefault((event.comm, event.group), {m: [] for m in event.group})
            members[rank].append(at)
    problems = []
    for (comm, group), by_rank in sequences.items():
        reference = by_rank[group[0]]
        for member in group[1:]:
            problem = _sequence_difference(reference, by_rank[member], group[0], member, schedules)
            if problem:
                problems.append(problem)
    _earliest(problems)


def _sequence_difference(ours: list[_At], theirs: list[_At], rank: int, other: int,
                         schedules: list[list[Event]]) -> tuple[int, int, str] | None:
    """(step, rank, message) of the first collective where two members of one group disagree."""
    for index in range(max(len(ours), len(theirs))):
        mine = ours[index] if index < len(ours) else None
        yours = theirs[index] if index < len(theirs) else None
        if mine and yours and mine.event.signature() == yours.event.signature():
            continue
        present = mine or yours
        where = f"collective #{index} over {present.event.group} ({present.event.comm} group)"
        sides = [at.text() if at else _missing(owner, present.step, schedules)
                 for at, owner in ((mine, rank), (yours, other))]
        return present.step, present.rank, f"ranks disagree on {where}: " + " / ".join(sides)
    return None


def _missing(rank: int, step: int, schedules: list[list[Event]]) -> str:
    """What a rank does instead of the collective it lacks: its event at the same step, if any."""
    events = schedules[rank]
    instead = f"step {step}: {events[step].text()}" if step < len(events) else f"its schedule ends after {len(events)}"
    return f"rank {rank} has no such collective ({instead})"


# ------------------------------------------------------------------ 2. point-to-point

def _messages_pair(schedules: list[list[Event]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Pair the i-th send and the i-th receive of every (communicator, sender, receiver, tag);
    returns {(rank, step): (peer, peer's step)} for both sides."""
    sends: dict[tuple, list[_At]] = {}
    recvs: dict[tuple, list[_At]] = {}
    for rank, events in enumerate(schedules):
        for step, event in enumerate(events):
            if event.kind == "send":
                key, side = (event.comm, event.group, rank, event.peer, event.tag), sends
            elif event.kind == "recv":
                key, side = (event.comm, event.group, event.peer, rank, event.tag), recvs
            else:
                continue
            side.setdefault(key, []).append(_At(rank, step, event))
    partners, problems = {}, []
    for key in sorted(sends.keys() | recvs.keys(), key=str):
        outgoing, incoming = sends.get(key, []), recvs.get(key, [])
        for send, recv in zip(outgoing, incoming):
            if (send.event.shape, send.event.dtype) != (recv.event.shape, recv.event.dtype):
                problems.append((min(send.step, recv.step), send.rank, f"a message's sides disagree: {send.text()} / "
                                 f"{recv.text()}"))
                break
            partners[(send.rank, send.step)] = (recv.rank, recv.step)
            partners[(recv.rank, recv.step)] = (send.rank, send.step)
        problems += _unmatched(key, outgoing, incoming)
    _earliest(problems)
    return partners


def _unmatched(key: tuple, outgoing: list[_At], incoming: list[_At]) -> list[tuple[int, int, str]]:
    """A send without its receive, or a receive without its send (the first of them)."""
    _, _, sender, receiver, tag = key
    if len(outgoing) > len(incoming):
        extra = outgoing[len(incoming)]
        return [(extra.step, sender, f"a send has no receive: {extra.text()} / rank {receiver} posts "
                 f"{len(incoming)} receive(s) from rank {sender} with tag {tag}, not {len(outgoing)}")]
    if len(incoming) > len(outgoing):
        extra = incoming[len(outgoing)]
        return [(extra.step, receiver, f"a receive has no send: {extra.text()} / rank {sender} posts "
                 f"{len(outgoing)} send(s) to rank {receiver} with tag {tag}, not {len(incoming)}")]
    return []


# ------------------------------------------------------------------ 3. progress

def _batches(events: list[Event]) -> list[list[int]]:
    """Steps of each batch, in order."""
    batches: list[list[int]] = []
    for step, event in enumerate(events):
        if not batches or events[batches[-1][0]].batch != event.batch:
            batches.append([])
        batches[-1].append(step)
    return batches


def _collective_peers(schedules: list[list[Event]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """{(rank, step): [(member, its step)] } for the same collective on every member (agreed in 1.)."""
    by_key: dict[tuple, dict[int, list[int]]] = {}
    for rank, events in enumerate(schedules):
        for step, event in enumerate(events):
            if event.is_collective:
                by_key.setdefault((event.comm, event.group), {}).setdefault(rank, []).append(step)
    peers = {}
    for by_rank in by_key.values():
        for index, rows in enumerate(zip(*by_rank.values())):
            members = list(zip(by_rank.keys(), rows))
            for member in members:
                peers[member] = members
    return peers


class _Progress:
    """Every rank runs its batches in order; a batch finishes once every peer has posted its side
    of every event in it (a collective: every member waits at it; a message: both ends posted)."""

    def __init__(self, schedules: list[list[Event]], partners: dict[tuple[int, int], tuple[int, int]]) -> None:
        self.schedules, self.partners = schedules, partners
        self.batches = [_batches(events) for events in schedules]
        self.batch_of = {(rank, step): index for rank, rows in enumerate(self.batches)
                         for index, row in enumerate(rows) for step in row}
        self.collective = _collective_peers(schedules)
        self.where = [0] * len(schedules)  # the batch each rank has posted and waits on

    def waits_for(self, rank: int, step: int) -> list[int]:
        """The ranks that have still to post their side of this event."""
        if self.schedules[rank][step].is_collective:
            others = self.collective[(rank, step)]
        else:
            others = [self.partners[(rank, step)]]
        return [peer for peer, peer_step in others if self.where[peer] < self.batch_of[(peer, peer_step)]]

    def current(self, rank: int) -> list[int]:
        rows = self.batches[rank]
        return rows[self.where[rank]] if self.where[rank] < len(rows) else []

    def run(self) -> None:
        """Advance every rank as far as it can go."""
        moved = True
        while moved:
            moved = False
            for rank in range(len(self.batches)):
                while self.current(rank) and not any(self.waits_for(rank, step) for step in self.current(rank)):
                    self.where[rank] += 1
                    moved = True

    def blocked(self) -> nx.DiGraph:
        """Who waits for whom once nobody can move (empty when every rank reached its end)."""
        graph = nx.DiGraph()
        for rank in range(len(self.batches)):
            for step in self.current(rank):
                for peer in self.waits_for(rank, step):
                    graph.add_edge(rank, peer, at=_At(rank, step, self.schedules[rank][step]))
        return graph


def _no_wait_cycle(schedules: list[list[Event]], partners: dict[tuple[int, int], tuple[int, int]]) -> None:
    progress = _Progress(schedules, partners)
    progress.run()
    blocked = progress.blocked()
    if not blocked.number_of_nodes():
        return
    try:
        edges, kind = nx.find_cycle(blocked), "deadlock"
    except nx.NetworkXNoCycle:  # a chain ending at a rank that finished: it will never post its side
        edges, kind = [next(iter(blocked.edges))], "a rank waits for one that has finished"
    raise _fail(f"{kind}: " + " / ".join(f"{blocked.edges[u, v]['at'].text()} waits for rank {v}" for u, v in edges))


# ------------------------------------------------------------------ dead and duplicate collectives

def dead_or_duplicate_collectives(graph: Graph) -> list[str]:
    """Collectives whose results nobody reads (and are not outputs), and collectives repeating an
    earlier one (same op, attributes and operands). Each costs a full exchange for nothing."""
    readers, outputs = graph.users(), set(graph.output_values())
    found, seen = [], {}
    for node in graph.nodes:
        if not communicates(node):
            continue
        label = f"%{node.results[0].name} = {node.op}"
        if not any(readers.get(value) or value in outputs for value in node.results):
            found.append(f"dead: {label}: nobody reads its results and they are not outputs")
        key = _identity(node)
        if key in seen:
            found.append(f"duplicate: {label} repeats %{seen[key].results[0].name} (same op, attributes and operands)")
        seen.setdefault(key, node)
    return found


def _identity(node: Node) -> tuple:
    """op, operands (by identity) and attributes: equal for two nodes that compute the same thing."""
    names = lambda template: repr(map_values(template, lambda value: ("%", id(value))))  # noqa: E731
    return node.op, names(node.args), names(node.kwargs)


def check_sharded_program(graph: Graph, world: int, ulysses: int = 1) -> None:
    """What the compiler runs on every sharded program when verification is on."""
    check_schedule(graph, world, ulysses)
    problems = dead_or_duplicate_collectives(graph)
    if problems:
        raise ScheduleError(f"the sharded {graph.name} graph has {len(problems)} wasted collective(s): "
                            + "; ".join(problems),
                            hint="a pass emitted a collective nobody needs; gather or all-reduce each value once, "
                                 "where it is read")
