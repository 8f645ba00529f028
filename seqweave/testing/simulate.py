"""Run a sharded graph on P simulated ranks in one process, for tests of passes and runtimes.

`simulate(graph, inputs, world)` does what the compiler does on each real rank (lower the
graph with a communicator, append the rank's global positions to the inputs, run it), with
`SimulatedCommunicator`s over one in-memory `Fabric` instead of torch.distributed, one thread
per rank. Forward and backward graphs are alike: each is just a graph. Run it in float64 and
compare every rank's outputs with the whole graph interpreted (`ir.interpreter.interpret`).
`simulate_ranks(world, body)` runs any `body(comm)` the same way (tests of runtime code).

It raises what a rank raised (the first failure, the cause; the others stop at their next
transfer), and `CommError` when the program ends with a transfer started but never waited or
a message nobody received: both are schedule bugs that real ranks may or may not survive.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from seqweave.codegen.lower import lower
from seqweave.ir.graph import Graph
from seqweave.ir.sharding import Layout, shard_positions
from seqweave.ir.types import TensorType
from seqweave.passes.shard_sequence import POSITIONS_INPUT
from seqweave.runtime.comm import KINDS, CommError
from seqweave.testing.simulated_comm import Fabric, SimulatedCommunicator, SimulatedHybridCommunicator, TraceEntry

#: kinds the attention strategies send with (ring K/V shifts, dK/dV sent home, Ulysses' all-to-alls)
ATTENTION_KINDS = ("shift", "p2p", "all_to_all")
DEFAULT_LAYOUT = "zigzag"


@dataclass
class Simulation:
    """What P simulated ranks did: per rank, its outputs, its byte counters (summed over its
    communicators, as `SeqweaveBackend.comm_stats` sums them) and its trace of transfers."""

    world: int
    layout: str
    ulysses: int
    outputs: list[Any]
    stats: list[dict[str, dict[str, int]]]
    traces: list[list[TraceEntry]]

    def bytes_sent(self, kinds: Sequence[str] = KINDS) -> list[int]:
        """Per rank, the payload bytes it sent in these kinds."""
        return [sum(stats[kind]["bytes_sent"] for kind in kinds) for stats in self.stats]

    def kinds_used(self) -> set[str]:
        """The kinds any rank moved data in."""
        return {kind for stats in self.stats for kind in KINDS if stats[kind]["calls"]}


def simulate(graph: Graph, inputs: Sequence[Any], world: int, *, layout: str | None = None,
             ulysses: int | None = None, timeout_s: float = 30.0,
             lowering: Callable[[Graph, Any], Callable[[list], Any]] = lower) -> Simulation:
    """Run the sharded `graph` on `world` simulated ranks.

    `inputs` are the graph's whole inputs without the positions (every rank gets its own copy,
    as every real rank holds the whole inputs); `layout` and `ulysses` default to what the
    graph's ops say (zigzag, 1 when none does) and must agree with them. `lowering(graph, comm)`
    makes what each rank runs: the eager step list, or e.g. `codegen.fx_lower.to_fx`.
    """
    layout = _attribute(graph, "layout", layout, DEFAULT_LAYOUT)
    ulysses = _attribute(graph, "ulysses", ulysses, 1)
    _check(graph, inputs, world, ulysses)
    length = int(graph.inputs[-1].type.shape[0]) * world
    hybrid = ulysses > 1 or any(node.op.startswith("attn.hybrid") for node in graph.nodes)

    def rank_main(comm: SimulatedCommunicator) -> Any:
        positions = shard_positions(Layout(layout), comm.world_rank, world, length)
        return lowering(graph, comm)([*_copies(inputs), positions])

    run = simulate_ranks(world, rank_main, ulysses=ulysses, hybrid=hybrid, timeout_s=timeout_s)
    return Simulation(world, layout, ulysses, run.results, run.stats, run.traces)


@dataclass
class RankRun:
    """What `simulate_ranks` gives back: per rank, what its body returned, its byte counters and its trace."""

    results: list[Any]
    stats: list[dict[str, dict[str, int]]]
    traces: list[list[TraceEntry]]


def simulate_ranks(world: int, body: Callable[[SimulatedCommunicator], Any], *, ulysses: int = 1,
                   hybrid: bool | None = None, timeout_s: float = 30.0) -> RankRun:
    """Run `body(comm)` on `world` simulated ranks at once, each with its own communicator (a
    hybrid one, with `.inner` / `.outer`, when `hybrid` or ulysses > 1).

    Raises the first exception a rank raised (the cause; other ranks stop at their next
    transfer), with a note naming the rank, and CommError when a transfer was started but never
    waited or a message never received.
    """
    fabric = Fabric(world)
    hybrid = ulysses > 1 if hybrid is None else hybrid
    comms = [_communicator(fabric, rank, ulysses, hybrid, timeout_s) for rank in range(world)]
    results = _run_ranks(fabric, [functools.partial(body, comm) for comm in comms])
    if fabric.failure is not None:
        rank, error = fabric.failure
        error.add_note(f"(raised on simulated rank {rank} of {world})")
        raise error
    leftovers = fabric.leftovers()
    if leftovers:
        raise CommError(f"{len(leftovers)} unfinished transfer(s) when the program ended: " + "; ".join(leftovers),
                        hint="every transfer a rank starts must be waited, and every send received")
    stats = [_summed(comm.communicators() if isinstance(comm, SimulatedHybridCommunicator) else [comm])
             for comm in comms]
    return RankRun(results, stats, fabric.traces)


def _attribute(graph: Graph, name: str, given: Any, default: Any) -> Any:
    """`given`, or the one value the graph's ops carry for attribute `name`; they must agree."""
    found = {node.kwargs[name] for node in graph.nodes if name in node.kwargs}
    if len(found) > 1:
        raise ValueError(f"simulate: the graph's ops disagree on {name}: {sorted(found)}")
    if given is not None and found and found != {given}:
        raise ValueError(f"simulate: {name}={given!r} but the graph's ops say {found.pop()!r}")
    return given if given is not None else (found.pop() if found else default)


def _check(graph: Graph, inputs: Sequence[Any], world: int, ulysses: int) -> None:
    if not graph.inputs or graph.inputs[-1].name != POSITIONS_INPUT:
        raise ValueError(f"simulate: graph {graph.name} is not sharded (its last input is not %{POSITIONS_INPUT}); "
                         "run shard-sequence first, or interpret it whole with ir.interpreter.interpret")
    worlds = {node.kwargs["world"] for node in graph.nodes if "world" in node.kwargs}
    if worlds - {world}:
        raise ValueError(f"simulate: world={world} but the graph was sharded for {sorted(worlds)} ranks")
    if world % ulysses:
        raise ValueError(f"simulate: ulysses={ulysses} does not divide world={world}")
    if len(inputs) != len(graph.inputs) - 1:
        raise ValueError(f"simulate: graph {graph.name} takes {len(graph.inputs) - 1} inputs besides the "
                         f"positions, got {len(inputs)}")
    for value, given in zip(graph.inputs, inputs):
        if isinstance(value.type, TensorType) and isinstance(given, torch.Tensor) and value.type.is_static() \
                and tuple(given.shape) != tuple(value.type.concrete_shape()):
            raise ValueError(f"simulate: input %{value.name} is {value.type} but got shape {tuple(given.shape)}; "
                             "every input is whole (inputs that arrive sharded are not simulated)")


def _communicator(fabric: Fabric, rank: int, ulysses: int, hybrid: bool, timeout_s: float) -> SimulatedCommunicator:
    if hybrid:
        return SimulatedHybridCommunicator(fabric, rank, ulysses, timeout_s)
    return SimulatedCommunicator(fabric, range(fabric.world), rank, timeout_s)


def _copies(inputs: Sequence[Any]) -> list[Any]:
    return [item.clone() if isinstance(item, torch.Tensor) else item for item in inputs]


def _summed(comms: Sequence[SimulatedCommunicator]) -> dict[str, dict[str, int]]:
    return {kind: {field: sum(comm.stats[kind][field] for comm in comms) for field in ("calls", "bytes_sent")}
            for kind in KINDS}


# One pool of rank threads for the process: a check of many small programs should not pay for
# starting threads each time. One simulation runs at a time (its ranks need all of theirs at once).
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(ranks: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < ranks:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=max(ranks, 8), thread_name_prefix="seqweave-rank")
    return _POOL


def _run_ranks(fabric: Fabric, bodies: list[Callable[[], Any]]) -> list[Any]:
    """What each rank's body returned (None for a rank that failed; `fabric.failure` says why)."""
    with _POOL_LOCK:
        pool = _pool(len(bodies))
        futures = [pool.submit(_rank_main, fabric, rank, body) for rank, body in enumerate(bodies)]
        return [future.result() for future in futures]


def _rank_main(fabric: Fabric, rank: int, body: Callable[[], Any]) -> Any:
    try:
        outputs = body()
    except BaseException as error:  # noqa: BLE001 (re-raised by simulate, on the caller's thread)
        fabric.fail(rank, error)
        return None
    fabric.finish(rank)
    return outputs
