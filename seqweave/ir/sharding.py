"""Which global positions each rank holds under sequence parallelism, and the ring schedule
those positions imply for a MaskSpec.

Everything here is a pure function of (mask, layout, world size, length), so every rank
computes the same plan: a step skipped on a receiver is skipped on its sender too.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from seqweave.ir.mask import BlockClass, MaskSpec

#: Beyond this many contiguous runs per shard, classify by the shards' spans (conservative).
MAX_RUNS = 64

#: Message tags are step * MAX_CHANNELS + channel, so messages of different steps or
#: channels between the same two ranks can never be matched with each other.
MAX_CHANNELS = 16
CH_KV, CH_GRADS, CH_HOME = 0, 1, 2  # ring message channels: K/V, travelling dK/dV, dK/dV returning home

PositionsOf = Callable[[int], torch.Tensor]  # rank -> the global positions it holds (1-D int64)
Run = tuple[int, int]  # global [start, stop)


class Layout(enum.Enum):
    """How the sequence is split over ranks."""

    CONTIGUOUS = "none"   # rank r holds [r*N/P, (r+1)*N/P)
    ZIGZAG = "zigzag"     # rank r holds chunks r and 2P-1-r of 2P: equal causal work per rank
    STRIPED = "striped"   # rank r holds positions r, r+P, r+2P, ...


def chunks_per_rank(layout: Layout) -> int:
    return 2 if layout is Layout.ZIGZAG else 1


def padded_length(seq_len: int, world: int, layout: Layout) -> int:
    """The smallest length >= seq_len that the layout splits evenly (padding is masked, never truncated)."""
    multiple = world * chunks_per_rank(layout)
    return -(-seq_len // multiple) * multiple


def shard_positions(layout: Layout, rank: int, world: int, seq_len: int) -> torch.Tensor:
    """Global positions held by `rank`, in local order (1-D int64). `seq_len` must already be padded.

    Always on the CPU, whatever torch's default device: plans read them in Python, and the
    runtime moves them to the data's device where it indexes with them.
    """
    if seq_len % (world * chunks_per_rank(layout)):
        raise ValueError(f"length {seq_len} does not split evenly under {layout.value} over {world} ranks; "
                         f"pad it to padded_length(...) = {padded_length(seq_len, world, layout)}")
    if layout is Layout.STRIPED:
        return torch.arange(seq_len // world, device="cpu") * world + rank  # rank + world*i; empty for N = 0
    if layout is Layout.CONTIGUOUS:
        size = seq_len // world
        return torch.arange(rank * size, (rank + 1) * size, device="cpu")
    chunk = seq_len // (2 * world)
    first, second = rank * chunk, (2 * world - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device="cpu"),
                      torch.arange(second, second + chunk, device="cpu")])


def contiguous_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive positions, in order."""
    if positions.numel() == 0:
        return []
    breaks = (torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1).tolist()
    bounds = [0, *breaks, positions.numel()]
    return [(int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(bounds, bounds[1:])]


def _combine(classes: list[BlockClass]) -> BlockClass:
    if all(c is BlockClass.EMPTY for c in classes):
        return BlockClass.EMPTY
    if all(c is BlockClass.FULL for c in classes):
        return BlockClass.FULL
    return BlockClass.PARTIAL


def pair_class(mask: MaskSpec, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> BlockClass:
    """EMPTY / FULL / PARTIAL for every (query, key) pair of two shards; data masks count as unknown."""
    q_runs, kv_runs = contiguous_runs(q_positions), contiguous_runs(kv_positions)
    if len(q_runs) > MAX_RUNS or len(kv_runs) > MAX_RUNS:
        # EMPTY and FULL verdicts on the spans hold for every subset of them.
        return mask.block_class(_span(q_positions), _span(kv_positions), None)
    return _combine([mask.block_class(q, kv, None) for q in q_runs for kv in kv_runs])


def _span(positions: torch.Tensor) -> tuple[int, int]:
    return int(positions.min()), int(positions.max()) + 1


@dataclass(frozen=True)
class RingPlan:
    """The ring schedule: at step t rank r holds the K/V of source (r - t) mod P.

    `classes[r][s]` classifies rank r's queries against source s's keys (EMPTY = no compute);
    `sends[t][r]` says whether rank r forwards what it holds after step t to rank r+1, which
    is needed only while some later rank on the ring still has a non-EMPTY pair with it.
    """

    world: int
    classes: tuple[tuple[BlockClass, ...], ...]
    sends: tuple[tuple[bool, ...], ...]

    def source(self, rank: int, step: int) -> int:
        return (rank - step) % self.world

    def computes(self, rank: int, step: int) -> bool:
        return self.classes[rank][self.source(rank, step)] is not BlockClass.EMPTY

    def steps_with_compute(self) -> int:
        return sum(self.computes(r, t) for r in range(self.world) for t in range(self.world))

    def sends_total(self) -> int:
        return sum(sum(row) for row in self.sends)

    def forwards(self, rank: int, step: int) -> bool:
        """Does `rank` pass what it holds after `step` on to rank+1?"""
        return step < self.world - 1 and self.sends[step][rank]

    def holds(self, rank: int, step: int) -> bool:
        """Does `rank` hold source (rank - step)'s K/V at `step`? Paths are contiguous from the source."""
        return step == 0 or self.forwards((rank - 1) % self.world, step - 1)

    def hops(self, source: int) -> int:
        """How many ranks past `source` its K/V travel: the last holder is (source + hops) mod P."""
        hops = 0
        while self.forwards((source + hops) % self.world, hops):
            hops += 1
        return hops


def _needed_later(classes, source: int, holder: int, world: int) -> bool:
    """Does any rank after `holder` on the ring (before returning to `source`) need source's K/V?"""
    later = [(holder + hop) % world for hop in range(1, world)]
    later = later[: (source - holder - 1) % world]
    return any(classes[rank][source] is not BlockClass.EMPTY for rank in later)


@functools.lru_cache(maxsize=512)
def plan_ring(mask: MaskSpec, layout: Layout, world: int, seq_len: int) -> RingPlan:
    """The mask-aware ring schedule for `world` ranks over a (padded) length `seq_len`.

    Cached: every rank, every lowering and the schedule checker ask for the same plans, and a
    plan (frozen tuples) classifies world² position pairs of tiles."""
    return plan_from_positions(mask, [shard_positions(layout, rank, world, seq_len) for rank in range(world)])


def plan_from_positions(mask: MaskSpec, positions: list[torch.Tensor]) -> RingPlan:
    """The ring schedule for ranks holding these global positions (one tensor per ring rank)."""
    world = len(positions)
    classes = tuple(tuple(pair_class(mask, positions[r], positions[s]) for s in range(world)) for r in range(world))
    sends = tuple(tuple(_needed_later(classes, (r - t) % world, r, world) for r in range(world))
                  for t in range(world - 1))
    return RingPlan(world, classes, sends)


def message_tag(step: int, channel: int) -> int:
    """The tag of a point-to-point message of `step` on `channel` (see MAX_CHANNELS)."""
    return step * MAX_CHANNELS + channel


def kv_repeat(group: int, kv_heads: int) -> int:
    """How many copies of each K/V head Ulysses makes so that `group` ranks can split the heads:
    1 when the group divides them, else group // kv_heads (the group must be a multiple)."""
    return 1 if kv_heads % group == 0 else group // kv_heads


def gathered_order(world: int, positions_of: PositionsOf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted global positions, perm, inverse perm): gathered[perm] is in global order."""
    gathered = torch.cat([positions_of(r) for r in range(world)])
    perm = torch.argsort(gathered, stable=True)
    return gathered[perm], perm, torch.argsort(perm)


# ----------------------------------------------------------------- hybrid (Ulysses inside, ring across)

def hybrid_groups(world: int, ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, ring groups) of global ranks: consecutive ranks share a Ulysses group."""
    rings = world // ulysses
    inner = [[g * ulysses + j for j in range(ulysses)] for g in range(rings)]
    outer = [[g * ulysses + j for g in range(rings)] for j in range(ulysses)]
    return inner, outer


def group_positions(positions_of: PositionsOf, ulysses: int, group: int) -> PositionsOf:
    """Positions held by each member of Ulysses group `group` (members are consecutive ranks)."""
    return lambda member: positions_of(group * ulysses + member)


def ring_positions(positions_of: PositionsOf, ulysses: int) -> PositionsOf:
    """Positions one ring 'rank' (a whole Ulysses group) holds, in global order."""
    return lambda group: gathered_order(ulysses, group_positions(positions_of, ulysses, group))[0]


def hybrid_plan(mask: MaskSpec, positions_of: PositionsOf, ulysses: int, rings: int) -> RingPlan:
    """The ring schedule across Ulysses groups, planned on the groups' positions."""
    by_group = ring_positions(positions_of, ulysses)
    return plan_from_positions(mask, [by_group(g) for g in range(rings)])


# ----------------------------------------------------------------- LASP-2 runs

@dataclass(frozen=True)
class RunTable:
    """Every rank's runs of global rows, in local order; `width` is the most any rank holds."""

    runs: tuple[tuple[Run, ...], ...]

    @property
    def width(self) -> int:
        return max(len(runs) for runs in self.runs)

    def in_order(self) -> list[tuple[int, int, Run]]:
        """(rank, index on that rank, run) for every run, in global order."""
        found = [(rank, index, run) for rank, runs in enumerate(self.runs) for index, run in enumerate(runs)]
        return sorted(found, key=lambda item: item[2][0])


def run_table(positions_of: PositionsOf, world: int) -> RunTable:
    return RunTable(tuple(tuple(contiguous_runs(positions_of(rank))) for rank in range(world)))
