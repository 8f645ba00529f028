"""The collective checks of `check_pass`: on the rewritten graph (no dead or duplicated
collective, a schedule the ranks agree on) and on its simulated run (bytes as `passes.cost`
models them). Each returns a list of problems in words, empty when all is well."""
from __future__ import annotations

from typing import Any

import torch

from seqweave.ir.graph import Graph, Node, map_values
from seqweave.testing.collective_bytes import expected_bytes, float64_only
from seqweave.testing.simulate import ATTENTION_KINDS, Simulation

#: ops that talk to other ranks (`ir.ops.sp`)
COLLECTIVE_OPS = frozenset({"sp.gather", "sp.all_reduce", "attn.ring", "attn.ring_backward", "attn.ulysses",
                            "attn.ulysses_backward", "attn.hybrid", "attn.hybrid_backward", "attn.lasp2",
                            "attn.lasp2_backward"})


def collective_problems(graph: Graph) -> list[str]:
    """Dead or duplicated collectives, and (for a sharded graph) a schedule the ranks disagree on."""
    problems = list(_dead_or_duplicate(graph))
    worlds = {node.kwargs["world"] for node in graph.nodes if node.op in COLLECTIVE_OPS and "world" in node.kwargs}
    if problems or len(worlds) != 1:
        return problems
    try:
        from seqweave.ir.schedule import check_schedule
    except ImportError:  # the static checker is optional here
        return problems
    ulysses = next((node.kwargs["ulysses"] for node in graph.nodes if "ulysses" in node.kwargs), 1)
    try:
        check_schedule(graph, worlds.pop(), ulysses)
    except Exception as error:  # noqa: BLE001 (ScheduleError, or a crash of the checker: both are findings)
        problems.append(f"collective schedule: {type(error).__name__}: {error}")
    return problems


def _dead_or_duplicate(graph: Graph) -> list[str]:
    try:
        from seqweave.ir.schedule import dead_or_duplicate_collectives
    except ImportError:
        return _local_dead_or_duplicate(graph)
    return dead_or_duplicate_collectives(graph)


def _local_dead_or_duplicate(graph: Graph) -> list[str]:
    """A collective none of whose results is read, or one issued twice on the same operands."""
    read = {value for node in graph.nodes for value in node.operands} | set(graph.output_values())
    seen: dict[str, Node] = {}
    problems = []
    for node in graph.nodes:
        if node.op not in COLLECTIVE_OPS:
            continue
        if not any(result in read for result in node.results):
            problems.append(f"dead collective: {node.op} of %{node.results[0].name}: nothing reads its result")
        key = _identity(node)
        if key in seen:
            problems.append(f"duplicate collective: {node.op} computes %{node.results[0].name} from the same "
                            f"operands as %{seen[key].results[0].name}")
        seen.setdefault(key, node)
    return problems


def _identity(node: Node) -> str:
    name = lambda value: f"%{value.name}"  # noqa: E731
    return f"{node.op}{map_values(node.args, name)!r}{sorted(map_values(node.kwargs, name).items())!r}"


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
