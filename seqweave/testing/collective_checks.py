"""The collective checks of `check_pass`: on the rewritten graph (no dead or duplicated
collective, a schedule the ranks agree on) and on its simulated run (bytes as `passes.cost`
models them). Each returns a list of problems in words, empty when all is well."""
from __future__ import annotations

from typing import Any

import torch

from seqweave.ir.graph import Graph
from seqweave.ir.schedule import check_schedule, dead_or_duplicate_collectives
from seqweave.ir.schedule_events import communicates
from seqweave.testing.collective_bytes import expected_bytes, float64_only
from seqweave.testing.simulate import ATTENTION_KINDS, Simulation

def collective_problems(graph: Graph) -> list[str]:
    """Dead or duplicated collectives, and (for a sharded graph) a schedule the ranks disagree on
    (`ir.schedule`, the checks the compiler runs on every sharded program)."""
    problems = dead_or_duplicate_collectives(graph)
    worlds = {node.kwargs["world"] for node in graph.nodes if communicates(node) and "world" in node.kwargs}
    if problems or len(worlds) != 1:
        return problems
    ulysses = next((node.kwargs["ulysses"] for node in graph.nodes if "ulysses" in node.kwargs), 1)
    try:
        check_schedule(graph, worlds.pop(), ulysses)
    except Exception as error:  # noqa: BLE001 (ScheduleError, or a crash of the checker: both are findings)
        problems.append(f"collective schedule: {type(error).__name__}: {error}")
    return problems


def byte_problems(graph: Graph, simulation: Simulation, inputs: list[Any]) -> list[str]:
    """Simulated byte counters against the cost model; [] where the model does not apply (a graph
    with floating types other than float64, or inputs that are not float64, run at other sizes)."""
    floats = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not float64_only(graph) or any(t.dtype != torch.float64 for t in floats):
        return []
    expected = expected_bytes(graph, 8)
    sent = simulation.bytes_sent(ATTENTION_KINDS)
    problems = []
    if expected.attention is not None and sum(sent) != expected.attention:
        problems.append(f"attention bytes: the ranks sent {sent} (total {sum(sent)}) but the cost model says "
                        f"{expected.attention} in total")
    for kind, want in (("gather", expected.gather), ("all_reduce", expected.all_reduce)):
        got = simulation.bytes_sent((kind,))
        if any(amount != want for amount in got):
            problems.append(f"{kind} bytes: the ranks sent {got}, the graph's shapes say {want} each")
    return problems
