"""check_pass: the shipped passes hold over generated programs, and planted bugs (a flipped sign,
a forgotten all-reduce, a dead collective, a pass that is not idempotent, an approximation that
is not declared) are each reported with the program's IR text."""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import pytest

from seqweave.errors import OptionError
from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.testing.check_pass import check_pass
from seqweave.testing.strategies import AttentionShape, attention_graph, elementwise_graphs
from seqweave.testing.programs import generate_programs

check_pass_module = importlib.import_module("seqweave.testing.check_pass")


def _replace_uses(graph: Graph, old: Value, new: Value) -> None:
    swap = lambda value: new if value is old else value  # noqa: E731
    for node in graph.nodes:
        node.args, node.kwargs = map_values(node.args, swap), map_values(node.kwargs, swap)
    graph.outputs = map_values(graph.outputs, swap)


# ------------------------------------------------------------------ shipped passes hold


def test_canonicalize_holds_over_elementwise_graphs():
    report = check_pass("canonicalize", elementwise_graphs(), examples=30, seed=0)
    report.raise_if_failed()
    assert report.checked == 30 and report.fired["canonicalize"] > 0


@pytest.mark.parametrize("pipeline", ["shard-sequence", "canonicalize,shard-sequence{layout=striped}",
                                      "shard-sequence{attention=ulysses}"])
def test_shard_sequence_holds_over_generated_programs(pipeline):
    """Generated programs (attention, projections, norms, rotary, losses, backward programs) on
    2, 3, 4 and 2x2 simulated ranks: every rank's outputs equal the whole program's."""
    before = check_pass_module.PROGRAMS_CHECKED
    report = check_pass(pipeline, examples=16, seed=11)
    report.raise_if_failed()
    assert report.checked == 16 and report.fired["shard-sequence"] == 16 and not report.skipped
    assert check_pass_module.PROGRAMS_CHECKED == before + 16


def test_position_rewrites_are_held_to_their_declared_semantics_through_sharding():
    report = check_pass("streaming{sinks=2,window=4},shard-sequence", examples=8, seed=3)
    report.raise_if_failed()
    assert report.fired["streaming"] == 8


def test_an_unknown_pass_is_an_option_error():
    with pytest.raises(OptionError, match="no-such-pass"):
        check_pass("canonicalize,no-such-pass")


def test_strategies_are_drawn_the_same_for_the_same_seed():
    first = check_pass(_FlipsAnAdd(), elementwise_graphs(), examples=12, seed=4)
    second = check_pass(_FlipsAnAdd(), elementwise_graphs(), examples=12, seed=4)
    assert [f.program for f in first.failures] == [f.program for f in second.failures]
    assert first.checked == 12 and first.failures


# ------------------------------------------------------------------ planted bugs are caught


@dataclass(frozen=True)
class _FlipsAnAdd(Pass):
    """Planted bug: the first `add` becomes a `sub` (same types, wrong numbers)."""

    name = "flips-an-add"

    def run(self, graph: Graph) -> PassResult:
        for node in graph.nodes:
            if node.op == "core.add.Tensor":
                node.op = "core.sub.Tensor"
                return PassResult(1)
        return PassResult(0)


def test_a_flipped_sign_is_caught_with_the_program_text():
    report = check_pass(_FlipsAnAdd(), elementwise_graphs(), examples=30, seed=0)
    assert report.failures, "the planted sign flip went unnoticed"
    failure = report.failures[0]
    assert "outputs" in failure.problem and "core.add.Tensor" in failure.program
    assert failure.program.startswith("graph elementwise(")
    with pytest.raises(AssertionError, match="core.add.Tensor"):
        report.raise_if_failed()


@dataclass(frozen=True)
class _ForgetsTheAllReduce(ShardSequence):
    """Planted bug: shard-sequence, then every all-reduce of a partial sum is dropped (each rank
    keeps its own share of a loss over the sequence)."""

    def run(self, graph: Graph) -> PassResult:
        result = super().run(graph)
        for node in [n for n in graph.nodes if n.op == "sp.all_reduce"]:
            _replace_uses(graph, node.results[0], node.args[0])
            graph.nodes.remove(node)
        return result


def test_a_dropped_all_reduce_is_caught_on_simulated_ranks():
    programs = [p for p in generate_programs(5, 40) if p.graph.count("core.nll_loss_forward")
                or p.graph.count("core.mse_loss")][:6]
    assert programs, "the generator made no program with a loss over the sequence"
    report = check_pass([_ForgetsTheAllReduce()], programs)
    assert report.failures, "the dropped all-reduce went unnoticed"
    failure = report.failures[0]
    assert "ranks" in failure.mesh and failure.program.startswith("graph ")
    assert "rank" in failure.problem


@dataclass(frozen=True)
class _AddsADeadGather(ShardSequence):
    """Planted bug: shard-sequence, then one more gather of a sharded value nobody reads."""

    def run(self, graph: Graph) -> PassResult:
        result = super().run(graph)
        gather = next(node for node in graph.nodes if node.op == "sp.gather")
        dead = Node("sp.gather", gather.args, dict(gather.kwargs), [Value("dead", gather.results[0].type)])
        dead.results[0].producer = dead
        graph.nodes.insert(graph.nodes.index(gather) + 1, dead)
        return result


def test_a_dead_and_duplicated_collective_is_caught():
    graph = attention_graph(AttentionShape(1, 1, 1, 8, 8, 2), "causal")
    report = check_pass([_AddsADeadGather()], [graph], meshes=[2])
    problems = [failure.problem for failure in report.failures]
    assert any(p.startswith("dead") for p in problems) and any(p.startswith("duplicate") for p in problems)
    assert all("%dead" in p for p in problems)  # the gather it repeats and nobody reads


@dataclass(frozen=True)
class _AppendsAClone(Pass):
    """Planted bug: claims idempotence, but every run adds one more clone of the first output."""

    name = "appends-a-clone"

    def run(self, graph: Graph) -> PassResult:
        first = graph.output_values()[0]
        clone = Value(f"{first.name}_clone", first.type)
        node = Node("core.clone", (first,), {}, [clone])
        clone.producer = node
        graph.nodes.append(node)
        _replace_uses(graph, first, clone)
        node.args = (first,)
        return PassResult(1)


def test_a_pass_that_is_not_idempotent_is_caught_unless_it_says_so():
    graph = attention_graph(AttentionShape(1, 1, 1, 5, 5, 2), "causal")
    report = check_pass(_AppendsAClone(), [graph])
    assert len(report.failures) == 1 and "claims to be idempotent" in report.failures[0].problem

    @dataclass(frozen=True)
    class Honest(_AppendsAClone):
        idempotent = False

    check_pass(Honest(), [graph]).raise_if_failed()


def _windowed(graph: Graph) -> Graph:
    for node in graph.nodes:
        if node.op == "attn.sdpa":
            node.kwargs = {**node.kwargs, "mask": "causal & sliding_window(2, 0)"}
    return graph


@dataclass(frozen=True)
class _Windows(Pass):
    """An approximation that does not say so: causal attention becomes a window of 3."""

    name = "windows"

    def run(self, graph: Graph) -> PassResult:
        _windowed(graph)
        return PassResult(0)


@dataclass(frozen=True)
class _DeclaredWindows(_Windows):
    """The same approximation, declared."""

    def declared_semantics(self, graph: Graph) -> Graph:
        return _windowed(copy.deepcopy(graph))


def test_an_approximation_is_checked_against_its_declared_semantics():
    graphs = [attention_graph(AttentionShape(1, 1, 2, n, n, 2), "causal") for n in (6, 9)]
    assert len(check_pass(_Windows(), graphs).failures) == 2
    check_pass(_DeclaredWindows(), graphs).raise_if_failed()
    check_pass([_DeclaredWindows(), ShardSequence()], graphs, meshes=[3]).raise_if_failed()
