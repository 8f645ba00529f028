"""The pattern rewriter: what matches, what is built (typed, placed, with provenance), what is removed."""
from __future__ import annotations

import pytest
import torch

from seqweave.errors import PassError
from seqweave.ir.interpreter import interpret
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.rewriter import Op, Rule, Var, match, rewrite

GRAPH = """\
graph g(%x: f32[2, 8], %y: f32[2, 8]) {
  %r = core.rsqrt(%y) : f32[2, 8] loc("model.norm")
  %m = core.mul.Tensor(%x, %r) : f32[2, 8] loc("model.norm:scale")
  %s = core.mul.Scalar(%m, 1.0) : f32[2, 8]
  %t = core.mul.Scalar(%s, 2.0) : f32[2, 8]
  %u = core.add.Tensor(%t, %t) : f32[2, 8]
  %v = core.add.Tensor(%t, %x) : f32[2, 8]
  return (%u, %v)
}
"""
RSQRT_MUL = Rule(Op("core.mul.Tensor", Var("x"), Op("core.rsqrt", Var("y"))),
                 lambda b, m: b.op("core.div.Tensor", m["x"], b.op("core.sqrt", m["y"])))
TIMES_ONE = Rule(Op("core.mul.Scalar", Var("x"), 1.0), lambda b, m: m["x"])


def _inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 8, generator=generator), torch.rand(2, 8, generator=generator) + 0.5]


def _expected(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph's function written in plain float64 torch."""
    x, y = x.double(), y.double()
    t = x / y.sqrt() * 2.0
    return t + t, t + x


def test_a_chain_is_replaced_typed_in_place_with_provenance_and_the_dead_nodes_go():
    graph = parse_graph(GRAPH)
    assert rewrite(graph, [RSQRT_MUL, TIMES_ONE]) == 2
    verify(graph)
    assert [node.op for node in graph.nodes] == ["core.sqrt", "core.div.Tensor", "core.mul.Scalar",
                                                 "core.add.Tensor", "core.add.Tensor"]
    assert [node.loc for node in graph.nodes[:2]] == ["model.norm:scale"] * 2  # the replaced root's location
    assert graph.nodes[2].args[0] is graph.nodes[1].results[0]  # `* 1.0` folded: `* 2.0` reads the division
    assert str(graph.nodes[1].results[0].type) == "f32[2, 8]"
    for got, want in zip(interpret(graph, _inputs()), _expected(*_inputs())):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_a_matched_node_that_is_still_read_stays():
    graph = parse_graph(GRAPH.replace("return (%u, %v)", "return (%u, %v, %r)"))
    assert rewrite(graph, [RSQRT_MUL]) == 1
    assert graph.count("core.rsqrt") == 1 and graph.count("core.div.Tensor") == 1
    verify(graph)


def test_patterns_check_ops_arity_literals_predicates_and_repeated_names():
    graph = parse_graph(GRAPH)
    values = {value.name: value for value in graph.values()}
    assert match(Op("core.mul.Scalar", Var(), 1.0), values["s"]) is not None
    assert match(Op("core.mul.Scalar", Var(), 1), values["s"]) is None  # 1 is not the float 1.0
    assert match(Op("core.mul.Scalar", Var()), values["s"]) is None  # every operand needs a pattern
    assert match(Op(("core.neg", "core.mul.Scalar"), Var(), Var()), values["t"]) is not None
    assert match(Op("core.add.Tensor", Var("a"), Var("a")), values["u"])["a"] is values["t"]
    assert match(Op("core.add.Tensor", Var("a"), Var("a")), values["v"]) is None
    assert match(Op("core.add.Tensor", Var(), Var(), where=lambda node: node.loc == "here"), values["u"]) is None
    found = match(Op("core.mul.Tensor", Var("x"), Op("core.rsqrt", Var("y")), name="root"), values["m"])
    assert [node.op for node in found.nodes] == ["core.mul.Tensor", "core.rsqrt"]
    assert (found["x"], found["y"], found["root"]) == (values["x"], values["y"], values["m"])
    assert match(Op("core.rsqrt", Var()), values["x"]) is None  # a graph input has no producer


def test_a_rule_that_declines_changes_nothing():
    graph = parse_graph(GRAPH)
    declines = Rule(Op("core.add.Tensor", Var(), Var()), lambda b, m: m.nodes[0].results[0])
    assert rewrite(graph, [declines]) == 0
    assert print_graph(graph) == GRAPH


def test_a_rule_that_keeps_firing_is_an_error():
    forever = Rule(Op("core.neg", Var("x")), lambda b, m: b.op("core.neg", m["x"]))
    graph = parse_graph(GRAPH.replace("%v = core.add.Tensor(%t, %x)", "%v = core.neg(%t)"))
    with pytest.raises(PassError, match="still fire"):
        rewrite(graph, [forever])


def test_a_result_type_the_op_cannot_infer_must_be_given():
    graph = parse_graph(GRAPH)
    untyped = Rule(Op("core.mul.Tensor", Var("x"), Var()), lambda b, m: b.op("core.nonzero", m["x"]))
    with pytest.raises(PassError, match="cannot type a new core.nonzero"):
        rewrite(graph, [untyped])
