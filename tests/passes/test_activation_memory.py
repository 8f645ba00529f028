"""`activation-memory`: golden text of both graphs, must-not-fire, properties over random steps
and budgets (results unchanged, static live bytes within the budget), budgets as text, and the
verifier's rules for moved values. End-to-end runs are in tests/e2e/test_memory_budget*.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.errors import OptionError
from seqweave.ir.interpreter import interpret
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import VerificationError, verify
from seqweave.passes.activation_memory import ActivationMemory, ApplyPlan, parse_budget
from seqweave.passes.liveness import profile, storage_lifetimes
from seqweave.passes.manager import run_pipeline
from seqweave.passes.memory_plan import InfeasibleBudget


def step_pair(tokens: int = 512, width: int = 64) -> tuple[str, str]:
    """Two ReLU layers: the forward saves x, h1, r1, h2 and w2; the backward reads them back."""
    act, weight, act_t = f"f32[{tokens}, {width}]", f"f32[{width}, {width}]", f"f32[{width}, {tokens}]"
    forward = f"""\
graph forward(%x: {act}, %w1: {weight}, %w2: {weight}) {{
  %h1 = core.mm(%x, %w1) : {act}
  %r1 = core.relu(%h1) : {act}
  %h2 = core.mm(%r1, %w2) : {act}
  %r2 = core.relu(%h2) : {act}
  %s = core.sum(%r2) : f32[]
  return (%s, %x, %h1, %r1, %h2, %w2)
}}
"""
    backward = f"""\
graph backward(%x: {act}, %h1: {act}, %r1: {act}, %h2: {act}, %w2: {weight}, %tangent: f32[]) {{
  %e = core.expand(%tangent, [{tokens}, {width}]) : {act}
  %dh2 = core.threshold_backward(%e, %h2, 0) : {act}
  %r1t = core.t(%r1) : {act_t}
  %dw2 = core.mm(%r1t, %dh2) : {weight}
  %w2t = core.t(%w2) : {weight}
  %dr1 = core.mm(%dh2, %w2t) : {act}
  %dh1 = core.threshold_backward(%dr1, %h1, 0) : {act}
  %xt = core.t(%x) : {act_t}
  %dw1 = core.mm(%xt, %dh1) : {weight}
  return (%dw1, %dw2)
}}
"""
    return forward, backward


GOLDEN_FORWARD = """\
graph forward(%x: f32[512, 64], %w1: f32[64, 64], %w2: f32[64, 64]) {
  %h1 = core.mm(%x, %w1) : f32[512, 64]
  %r1 = core.relu(%h1) : f32[512, 64]
  %h2 = core.mm(%r1, %w2) : f32[512, 64]
  %dropped = mem.drop(%r1) : f32[0]
  %r2 = core.relu(%h2) : f32[512, 64]
  %s = core.sum(%r2) : f32[]
  return (%s, %x, %h1, %dropped, %h2, %w2)
}
"""
GOLDEN_BACKWARD = """\
graph backward(%x: f32[512, 64], %h1: f32[512, 64], %r1: f32[0], %h2: f32[512, 64], %w2: f32[64, 64], %tangent: f32[]) {
  %e = core.expand(%tangent, [512, 64]) : f32[512, 64]
  %dh2 = core.threshold_backward(%e, %h2, 0) : f32[512, 64]
  %r1_recomputed = core.relu(%h1) : f32[512, 64]
  %r1t = core.t(%r1_recomputed) : f32[64, 512]
  %dw2 = core.mm(%r1t, %dh2) : f32[64, 64]
  %w2t = core.t(%w2) : f32[64, 64]
  %dr1 = core.mm(%dh2, %w2t) : f32[512, 64]
  %dh1 = core.threshold_backward(%dr1, %h1, 0) : f32[512, 64]
  %xt = core.t(%x) : f32[64, 512]
  %dw1 = core.mm(%xt, %dh1) : f32[64, 64]
  return (%dw1, %dw2)
}
"""


def planned(budget, tokens: int = 512, width: int = 64, quantize: bool = False):
    forward, backward = (parse_graph(text) for text in step_pair(tokens, width))
    step = ActivationMemory(budget=budget, quantize=quantize).plan_step(forward, backward, saved_from=1)
    (forward_run,) = run_pipeline(forward, [ApplyPlan(step, "forward")])
    (backward_run,) = run_pipeline(backward, [ApplyPlan(step, "backward")])
    return step, forward, backward, forward_run.result.rewrites + backward_run.result.rewrites


def body(graph) -> str:
    return "\n".join(line for line in print_graph(graph).splitlines() if not line.startswith("#")) + "\n"


def test_golden_text_recomputes_the_relu_from_its_kept_input():
    step, forward, backward, rewrites = planned(420_000)
    assert body(forward) == GOLDEN_FORWARD
    assert body(backward) == GOLDEN_BACKWARD
    assert rewrites == 2 and step.plan.of("recompute") == ["r1"]
    assert "plan-free peak 0.5 MiB -> 0.4 MiB" in step.summary()


@pytest.mark.parametrize("budget", [1.0, "1GB", 10**9])
def test_must_not_fire_when_everything_fits(budget):
    step, forward, backward, rewrites = planned(budget)
    before_forward, before_backward = (parse_graph(text) for text in step_pair())
    assert rewrites == 0 and not step.choices
    assert body(forward) == body(before_forward) and body(backward) == body(before_backward)


def _static_peak(forward, backward, saved_from: int = 1) -> int:
    """The rewritten step's own live-bytes profile: forward values, then what the backward holds
    (its inputs except parameters and the host copies, which are not device bytes)."""
    host = {node.results[0] for node in forward.nodes if node.op in ("mem.offload", "mem.host_arena")}
    forward_live = profile(forward, storage_lifetimes(forward, inputs=False), host)
    saved = forward.output_values()[saved_from:]
    outside = {backward.inputs[i] for i, value in enumerate(saved) if value.producer is None or value in host}
    backward_live = profile(backward, storage_lifetimes(backward), outside)
    return max(forward_live + backward_live)


@settings(deadline=None, max_examples=40)
@given(tokens=st.sampled_from([256, 512, 1024]), width=st.sampled_from([32, 64]),
       fraction=st.floats(0.3, 1.0), quantize=st.booleans(), seed=st.integers(0, 100))
def test_results_unchanged_and_static_bytes_within_budget(tokens, width, fraction, quantize, seed):
    generator = torch.Generator().manual_seed(seed)
    x, w1, w2 = (torch.randn(shape, generator=generator) for shape in ((tokens, width), (width, width), (width, width)))
    reference_forward, reference_backward = (parse_graph(text) for text in step_pair(tokens, width))
    expected = _run_step(reference_forward, reference_backward, x, w1, w2)
    try:
        step, forward, backward, _ = planned(fraction, tokens, width, quantize)
    except InfeasibleBudget as refusal:
        assert refusal.least_peak > refusal.budget
        return
    got = _run_step(forward, backward, x, w1, w2)
    assert torch.equal(got[0], expected[0])
    if not step.plan.of("quantize"):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert _static_peak(forward, backward) <= step.budget


def _run_step(forward, backward, x, w1, w2):
    outputs = interpret(forward, [x, w1, w2])
    loss, saved = outputs[0], list(outputs[1:])
    return [loss, *interpret(backward, [*saved, torch.tensor(1.0)])]


def test_infeasible_budget_names_the_least_peak():
    with pytest.raises(InfeasibleBudget, match="least peak any plan reaches is 409604 bytes"):
        planned(300_000)


@pytest.mark.parametrize("text, expected", [("12GB", (12 * 10**9, None)), ("512MiB", (512 * 2**20, None)),
                                            (0.25, (None, 0.25)), ("0.5", (None, 0.5)), (1_000_000, (1_000_000, None))])
def test_budgets(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["twelve", "12 parsecs", 0, -3, 0.0])
def test_bad_budgets_say_what_to_write(bad):
    with pytest.raises(OptionError, match="bytes"):
        parse_budget(bad)


def test_verifier_refuses_a_read_of_a_value_not_brought_back():
    _, forward, backward, _ = planned(420_000)
    text = body(backward).replace("%r1t = core.t(%r1_recomputed)", "%r1t = core.t(%r1_ghost)")
    text = text.replace("  %r1_recomputed = core.relu(%h1) : f32[512, 64]\n",
                        "  %r1_recomputed = core.relu(%h1) : f32[512, 64]\n  %r1_ghost = mem.drop(%h1) : f32[0]\n")
    with pytest.raises(VerificationError, match="nothing \\(it is an empty stand-in\\)"):
        verify(parse_graph(text.replace("%r1t = core.t(%r1_ghost) : f32[64, 512]",
                                        "%r1t = core.t(%r1_ghost) : f32[0]")))


def test_backend_says_a_bad_budget_before_compiling():
    import seqweave

    with pytest.raises(OptionError, match="not a size"):
        seqweave.backend(memory_budget="a lot")
    assert seqweave.backend(memory_budget="2GiB").options.memory_budget == "2GiB"


def test_the_pipeline_string_form_is_the_same_pass():
    from seqweave.compiler import SeqweaveBackend
    from seqweave.config import CompileOptions

    backend = SeqweaveBackend(CompileOptions(pipeline="canonicalize,activation-memory{budget=0.5,quantize=true}"))
    assert backend._memory_pass() == ActivationMemory(budget=0.5, quantize=True)
    assert [p.name for p in backend._pipeline()] == ["canonicalize"]
