"""`canonicalize`: golden text, must-not-fire cases, properties over random graphs and an
end-to-end compile checked against eager float64."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

from seqweave.config import CompileOptions
from seqweave.compiler import SeqweaveBackend
from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.interpreter import interpret
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.manager import run_pipeline
from seqweave.testing.equivalence import assert_equivalent, random_inputs
from seqweave.testing.strategies import attention_graphs, elementwise_graphs

NOTE_WITH_TIME = re.compile(r"^# after canonicalize: (\d+) rewrites, \d+\.\d ms$", re.MULTILINE)


def canonicalize(graph: Graph) -> int:
    """Run the pass through the manager (verifying after it); returns its rewrite count."""
    (run,) = run_pipeline(graph, "canonicalize", check=True)
    return run.result.rewrites


def printed_without_timing(graph: Graph) -> str:
    """The printed graph with each note's timing cut off (it differs from run to run)."""
    text = print_graph(graph)
    assert NOTE_WITH_TIME.search(text), f"no timed canonicalize note in:\n{text}"
    return NOTE_WITH_TIME.sub(r"# after canonicalize: \1 rewrites", text)


def body(graph: Graph) -> str:
    """The printed graph without its notes."""
    return print_graph(dataclasses.replace(graph, notes=[]))


def copy_of(graph: Graph) -> Graph:
    """An independent copy, through the text form."""
    return parse_graph(print_graph(graph))


# ------------------------------------------------------------------ golden text

GOLDEN_INPUT = """\
graph golden(%x: f32[2, 8], %y: f32[2, 8], %q: f32[1, 2, 5, 4], %k: f32[1, 1, 5, 4], %v: f32[1, 1, 5, 4]) {
  %c = core.clone(%x) : f32[2, 8]
  %r = core.reshape(%c, [2, 8]) : f32[2, 8]
  %t = core._to_copy(%r, dtype=torch.float32) : f32[2, 8]
  %a = core.add.Tensor(%t, %y) : f32[2, 8] loc("layers.0.mlp")
  %e = core.expand(%a, [2, 8]) : f32[2, 8]
  %dead = core.relu(%x) : f32[2, 8]
  %dead2 = core.neg(%dead) : f32[2, 8]
  %out, %lse = attn.sdpa(%q, %k, %v, [], mask="causal", score_mod="none", scale=0.5, kv_heads=1) : f32[1, 2, 5, 4], f32[1, 2, 5]
  %m = core.mul.Tensor(%e, %e) : f32[2, 8]
  %o = core.clone(%m) : f32[2, 8]
  return (%o, %a)
}
"""

# clone, reshape, _to_copy and expand fold (4); relu, neg and the unused attention are dead (3);
# %o stays: it is an output.
GOLDEN_OUTPUT = """\
# after canonicalize: 7 rewrites
graph golden(%x: f32[2, 8], %y: f32[2, 8], %q: f32[1, 2, 5, 4], %k: f32[1, 1, 5, 4], %v: f32[1, 1, 5, 4]) {
  %a = core.add.Tensor(%x, %y) : f32[2, 8] loc("layers.0.mlp")
  %m = core.mul.Tensor(%a, %a) : f32[2, 8]
  %o = core.clone(%m) : f32[2, 8]
  return (%o, %a)
}
"""


def test_golden_text() -> None:
    graph = parse_graph(GOLDEN_INPUT)
    verify(graph)
    (run,) = run_pipeline(graph, "canonicalize")
    assert printed_without_timing(graph) == GOLDEN_OUTPUT
    assert (run.result.rewrites, run.result.detail) == (7, "4 folded, 3 dead")


def test_golden_numerics_match_unrewritten_graph() -> None:
    """At the recorded f32 (in float64 the folded `_to_copy(dtype=f32)` would have rounded)."""
    before, after = parse_graph(GOLDEN_INPUT), parse_graph(GOLDEN_INPUT)
    canonicalize(after)
    assert_equivalent(before, after, random_inputs(before, dtype=None, seed=1), atol=0.0, rtol=0.0)


# ------------------------------------------------------------------ must not fire

MUST_NOT_FIRE = {
    "expand to a new shape": """\
graph g(%x: f32[2, 8]) {
  %e = core.expand(%x, [3, 2, 8]) : f32[3, 2, 8]
  %s = core.sum.dim_IntList(%e, [0]) : f32[2, 8]
  return (%s,)
}
""",
    "_to_copy that changes dtype (a lossy round trip)": """\
graph g(%x: f32[2, 8]) {
  %h = core._to_copy(%x, dtype=torch.float16) : f16[2, 8]
  %b = core._to_copy(%h, dtype=torch.float32) : f32[2, 8]
  return (%b,)
}
""",
    "_to_copy with a device request": """\
graph g(%x: f32[2, 8]) {
  %d = core._to_copy(%x, dtype=torch.float32, device=device("cpu")) : f32[2, 8]
  %n = core.neg(%d) : f32[2, 8]
  return (%n,)
}
""",
    "clone with a memory format": """\
graph g(%x: f32[4, 4]) {
  %t = core.transpose.int(%x, 0, 1) : f32[4, 4]
  %c = core.clone(%t, memory_format=torch.contiguous_format) : f32[4, 4]
  %v = core.view(%c, [16]) : f32[16]
  return (%v,)
}
""",
    "foldable candidates that are graph outputs": """\
graph g(%x: f32[2, 8]) {
  %c = core.clone(%x) : f32[2, 8]
  %v = core.view(%x, [2, 8]) : f32[2, 8]
  %t = core._to_copy(%x, dtype=torch.float32) : f32[2, 8]
  return (%c, [%v, None], %t)
}
""",
    "a copy that an output views (the output must not alias %x)": """\
graph g(%x: f32[2, 8]) {
  %c = core.clone(%x) : f32[2, 8]
  %v = core.view(%c, [16]) : f32[16]
  return (%v,)
}
""",
    "a copy that makes a strided tensor viewable": """\
graph g(%x: f32[3, 4]) {
  %s = core.slice.Tensor(%x, 1, 0, 4, 2) : f32[3, 2]
  %c = core.clone(%s) : f32[3, 2]
  %v = core.view(%c, [6]) : f32[6]
  %n = core.neg(%v) : f32[6]
  return (%n,)
}
""",
    "transpose that keeps the type": """\
graph g(%x: f32[3, 3]) {
  %t = core.transpose.int(%x, 0, 1) : f32[3, 3]
  %n = core.neg(%t) : f32[3, 3]
  return (%n,)
}
""",
    "view to a different shape": """\
graph g(%x: f32[2, 8]) {
  %v = core.view(%x, [16]) : f32[16]
  %n = core.neg(%v) : f32[16]
  return (%n,)
}
""",
    "attention whose lse is unused (the node is live through out)": """\
graph g(%q: f32[1, 4, 7, 8], %k: f32[1, 2, 7, 8], %v: f32[1, 2, 7, 8]) {
  %out, %lse = attn.sdpa(%q, %k, %v, [], mask="causal", score_mod="none", scale=0.25, kv_heads=2) : f32[1, 4, 7, 8], f32[1, 4, 7]
  return (%out,)
}
""",
}


@pytest.mark.parametrize("text", MUST_NOT_FIRE.values(), ids=MUST_NOT_FIRE.keys())
def test_must_not_fire(text: str) -> None:
    graph = parse_graph(text)
    verify(graph)
    assert canonicalize(graph) == 0
    assert body(graph) == text


STRIDED_VIEW_CHAIN = """\
graph g(%x: f64[3, 4]) {
  %s = core.slice.Tensor(%x, 1, 0, 4, 2) : f64[3, 2]
  %c = core.clone(%s) : f64[3, 2]
  %same = core.view(%c, [3, 2]) : f64[3, 2]
  %flat = core.view(%same, [6]) : f64[6]
  %n = core.neg(%flat) : f64[6]
  return (%n,)
}
"""


def test_folding_a_same_shape_view_keeps_the_copy_a_later_view_needs() -> None:
    """`x[:, ::2].clone().view(3, 2).view(-1)`: the first view folds, the clone must stay."""
    graph = parse_graph(STRIDED_VIEW_CHAIN)
    assert canonicalize(graph) == 1
    assert [node.op for node in graph.nodes] == ["core.slice.Tensor", "core.clone", "core.view", "core.neg"]
    x = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    (result,) = interpret(graph, [x])
    torch.testing.assert_close(result, -x[:, ::2].reshape(-1), rtol=0, atol=0)


# ------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(elementwise_graphs())
def test_random_graphs_verify_stay_equivalent_and_reach_a_fixed_point(graph: Graph) -> None:
    verify(graph)
    before = copy_of(graph)
    rewrites = canonicalize(graph)  # verifies after the pass
    assert rewrites == len(before.nodes) - len(graph.nodes), "each rewrite removes exactly one node"
    assert [v.name for v in graph.output_values()] == [v.name for v in before.output_values()], \
        "outputs are never replaced"
    once = body(graph)
    assert canonicalize(graph) == 0
    assert body(graph) == once
    assert_equivalent(before, graph, random_inputs(before, torch.float64, seed=0))


def _with_copy_and_dead_node(graph: Graph) -> Graph:
    """The attention graph with q read through a plain clone and a dead neg(k) in front."""
    attention = graph.nodes[0]
    q, k = attention.args[0], attention.args[1]
    copy = Node("core.clone", (q,), {}, [Value("q_copy", q.type)])
    dead = Node("core.neg", (k,), {}, [Value("k_neg", k.type)])
    attention.args = (copy.results[0],) + attention.args[1:]
    graph.nodes[:0] = [copy, dead]
    return graph


@settings(max_examples=25, deadline=None)
@given(attention_graphs())
def test_attention_graphs_lose_only_the_copy_and_the_dead_node(graph: Graph) -> None:
    original = body(graph)
    rewritten = _with_copy_and_dead_node(copy_of(graph))
    verify(rewritten)
    assert canonicalize(rewritten) == 2
    assert body(rewritten) == original
    assert_equivalent(graph, rewritten, random_inputs(graph, seed=3))


# ------------------------------------------------------------------ end to end


class Copies(torch.nn.Module):
    """A linear layer followed by copies and reshapes that change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).clone()
        h = h.reshape(h.shape).to(torch.float64, copy=True)
        return (torch.tanh(h) * x).sum(-1)


def _node_count(path: Path) -> int:
    return len(parse_graph(path.read_text()).nodes)


def test_compiled_module_matches_eager_and_the_pass_fired(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Copies()
    backend = SeqweaveBackend(CompileOptions(dump_dir=str(tmp_path)))
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = compiled(x)
    out.sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x_ref)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, [x_ref.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)

    (forward,) = [compiled_graph for compiled_graph in backend.graphs if compiled_graph.kind == "forward"]
    rewrites = forward.passes[0].result.rewrites
    assert forward.passes[0].name == "canonicalize" and rewrites > 0
    imported = _node_count(tmp_path / "forward.00.input.ir")
    assert len(forward.graph.nodes) == imported - rewrites < imported
    assert forward.graph.count("core._to_copy") == 0
