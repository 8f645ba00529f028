"""`absent-tangents`: golden text, must-not-fire cases, a property over random backward-like
programs (float64, against the original fed real zeros), and end to end: a model returning
logits nobody differentiates gets no logits-sized gradient, and its gradients equal eager's."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqweave
from seqweave.ir.interpreter import interpret
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.absent_tangents import AbsentTangents
from seqweave.testing.equivalence import random_inputs
from seqweave.testing.memory import LargestAllocation

GOLDEN_INPUT = """\
graph backward(%h: f32[6, 4], %w: f32[5, 4], %g: f32[6, 5], %t: f32[6, 5]) {
  %total = core.add.Tensor(%g, %t) : f32[6, 5]
  %tt = core.t(%t) : f32[5, 6]
  %dw_t = core.mm(%tt, %h) : f32[5, 4]
  %dh_g = core.mm(%g, %w) : f32[6, 4]
  %dh_t = core.mm(%t, %w) : f32[6, 4]
  %dh = core.add.Tensor(%dh_g, %dh_t) : f32[6, 4]
  %gt = core.t(%g) : f32[5, 6]
  %dw_g = core.mm(%gt, %h) : f32[5, 4]
  %dw = core.add.Tensor(%dw_g, %dw_t) : f32[5, 4]
  return (%total, %dh, %dw)
}
"""

GOLDEN_OUTPUT = """\
graph backward(%h: f32[6, 4], %w: f32[5, 4], %g: f32[6, 5], %t: f32[6, 5]) {
  %dh_g = core.mm(%g, %w) : f32[6, 4]
  %gt = core.t(%g) : f32[5, 6]
  %dw_g = core.mm(%gt, %h) : f32[5, 4]
  return (%g, %dh_g, %dw_g)
}
"""


def _body(graph) -> str:
    return print_graph(dataclasses.replace(graph, notes=[]))


def _with_zeros(graph, inputs, absent):
    return [torch.zeros_like(x) if index in absent else x for index, x in enumerate(inputs)]


def test_golden_text():
    graph = parse_graph(GOLDEN_INPUT)
    result = AbsentTangents((3,)).run(graph)
    verify(graph)
    assert _body(graph) == GOLDEN_OUTPUT
    assert result.rewrites == 6


def test_a_zero_read_by_an_op_without_a_rule_is_left_in_place():
    text = GOLDEN_INPUT.replace("%tt = core.t(%t)", "%tt = core.relu(%t) : f32[6, 5]\n  %tt2 = core.t(%tt)") \
                       .replace("core.mm(%tt, %h)", "core.mm(%tt2, %h)")
    graph = parse_graph(text)
    before = _body(graph)
    removal = AbsentTangents((3,))
    assert removal.eliminable(graph) == ()
    assert removal.run(graph).rewrites == 0
    assert _body(graph) == before


def test_a_zero_that_reaches_an_output_becomes_none_as_eager_leaves_that_grad():
    graph = parse_graph("""\
graph backward(%g: f32[3, 2], %t: f32[3, 2]) {
  %n = core.neg(%t) : f32[3, 2]
  %s = core.sum.dim_IntList(%n, [0]) : f32[2]
  return (%g, %s)
}
""")
    assert AbsentTangents((1,)).run(graph).rewrites == 2
    verify(graph)
    assert _body(graph).splitlines()[1] == "  return (%g, None)"
    assert interpret(graph, [torch.ones(3, 2), None])[1] is None


UNARY = ["core.neg", "core.clone"]


@st.composite
def backward_programs(draw):
    """A chain over a gradient %g and a tangent %t: each step either combines two live values
    (add / mul) or applies a zero-preserving unary op; outputs are the last two values."""
    lines, live = [], ["g", "t"]
    for index in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["add", "mul", "unary"]))
        a, b = draw(st.sampled_from(live)), draw(st.sampled_from(live))
        if kind == "add":
            lines.append(f"  %v{index} = core.add.Tensor(%{a}, %{b}) : f64[3, 4]")
        elif kind == "mul":
            lines.append(f"  %v{index} = core.mul.Tensor(%{a}, %{b}) : f64[3, 4]")
        else:
            lines.append(f"  %v{index} = {draw(st.sampled_from(UNARY))}(%{a}) : f64[3, 4]")
        live.append(f"v{index}")
    text = "graph backward(%g: f64[3, 4], %t: f64[3, 4]) {\n" + "\n".join(lines) + \
        f"\n  return (%{live[-1]}, %{live[-2]}, %g)\n}}\n"
    return text


@settings(max_examples=30, deadline=None)
@given(backward_programs())
def test_rewritten_program_equals_the_original_fed_zeros(text):
    original, graph = parse_graph(text), parse_graph(text)
    removal = AbsentTangents((1,))
    removable = removal.eliminable(graph)
    AbsentTangents(removable).run(graph)
    verify(graph)
    inputs = random_inputs(original)
    expected = interpret(original, _with_zeros(original, inputs, {1}))
    got = interpret(graph, [inputs[0], None if removable else torch.zeros_like(inputs[1])])
    for want, have in zip(expected, got):
        if have is None:  # an output only the absent tangent fed: autograd reads None as zero
            assert not bool(want.any()), want
        else:
            torch.testing.assert_close(have, want, rtol=0, atol=0)
    if removable:  # the tangent is never read again
        assert all(graph.inputs[1] not in node.operands for node in graph.nodes)


class LossAndLogits(torch.nn.Module):
    """A model returning a loss and, beside it, big logits the training loop does not use."""

    def __init__(self, vocab: int = 512, hidden: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.body = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        hidden = torch.tanh(self.body(self.embed(ids)))
        return hidden.pow(2).mean(), self.head(hidden)


def test_unused_logits_get_no_gradient_tensor_and_gradients_match_eager():
    torch.manual_seed(0)
    model, reference = LossAndLogits(), LossAndLogits().double()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 64))
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    compiled(ids)[0].backward()  # compiles the backward variant (compiling allocates freely)
    model.zero_grad(set_to_none=True)
    loss, logits = compiled(ids)
    with LargestAllocation() as watch:
        loss.backward()
    assert watch.largest < logits.numel(), "a logits-sized tensor was allocated in the backward"
    expected_loss, _ = reference(ids)
    expected_loss.backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        if expected.grad is None:  # the head: the loss does not reach it, so no gradient, as in eager
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad.double(), expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    (variant,) = [c for c in backend.graphs if c.kind == "backward"]  # only the variant that ran was compiled
    assert variant.passes[0].name == "absent-tangents" and variant.passes[0].result.rewrites >= 1
    # The same step with the logits differentiated too runs the full backward, exactly.
    loss, logits = compiled(ids)
    model.zero_grad()
    (loss + logits.sum()).backward()
    full = [c for c in backend.graphs if c.kind == "backward"][1]
    assert "absent-tangents" not in [run.name for run in full.passes]
