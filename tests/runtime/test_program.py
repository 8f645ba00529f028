"""Lowered programs: same results as the reference interpreter, and every slot freed right
after its last reader (so long sequences do not keep every activation alive)."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings

from seqweave.codegen import cpu_flash
from seqweave.codegen.lower import lower
from seqweave.ir.graph import Graph, values_in
from seqweave.ir.interpreter import interpret
from seqweave.ir.parser import parse_graph
from seqweave.runtime.program import Program, Slot, Step
from seqweave.testing.equivalence import random_inputs
from seqweave.testing.strategies import attention_graphs, elementwise_graphs

CHAIN = """\
graph chain(%x: f64[64, 64]) {
  %a = core.neg(%x) : f64[64, 64]
  %b = core.relu(%a) : f64[64, 64]
  %c = core.mul.Tensor(%b, %b) : f64[64, 64]
  %d = core.add.Tensor(%c, %x) : f64[64, 64]
  %e = core.sum.dim_IntList(%d, [0]) : f64[64]
  return (%e, %c)
}
"""


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    """Bit-identical to the interpreter means the same kernels: the interpreter runs the blockwise
    reference, so the program does too here (the fused CPU kernel is checked against float64 in
    tests/codegen/test_cpu_flash.py)."""
    monkeypatch.setenv(cpu_flash.ENV, cpu_flash.FORCE_REFERENCE)


def slots_of(graph: Graph, program: Program) -> dict[str, int]:
    """Value name -> slot, read off the program's own inputs and step results (one step per node)."""
    assert [step.label for step in program.steps] == [node.op for node in graph.nodes]
    table = {value.name: slot for value, slot in zip(graph.inputs, program.inputs)}
    for node, step in zip(graph.nodes, program.steps):
        table.update({value.name: slot for value, slot in zip(node.results, step.results)})
    return table


def expected_occupied(graph: Graph, slots: dict[str, int], after_step: int) -> set[int]:
    """Slots that must still hold a value after `after_step`: defined by then, and an output or read later.

    Inputs nobody reads are left out (the caller holds them anyway; the runtime may keep them).
    """
    outputs = {value.name for value in graph.output_values()}
    read_at: dict[str, list[int]] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.operands:
            read_at.setdefault(value.name, []).append(index)
    defined = [value.name for value in graph.inputs if value.name in read_at]
    defined += [value.name for node in graph.nodes[:after_step + 1] for value in node.results]
    return {slots[name] for name in defined
            if name in outputs or any(index > after_step for index in read_at.get(name, []))}


def run_recording(program: Program, inputs: list[torch.Tensor]) -> tuple[Any, list[set[int]]]:
    """Run the program and note, after each step, which slots hold a value."""
    occupied: list[set[int]] = []

    def recording_run(step: Step, slots: list[Any]) -> None:
        Program._run(step, slots)
        occupied.append({index for index, value in enumerate(slots) if value is not None})

    program._run = recording_run  # the instance attribute shadows the static method
    return program(inputs), occupied


def assert_same(actual: Any, expected: Any) -> None:
    """Bit-identical outputs: the program runs the very same reference ops in the same order."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0, equal_nan=True)


def check_program(graph: Graph, seed: int) -> None:
    """Results equal the interpreter's; after every step exactly the live slots are occupied."""
    program = lower(graph)
    inputs = random_inputs(graph, torch.float64, seed=seed)
    result, occupied = run_recording(program, [t.clone() for t in inputs])
    assert_same(result, interpret(graph, inputs))
    slots = slots_of(graph, program)
    never_read_inputs = {slots[v.name] for v in graph.inputs} - set().union(*_reads(program))
    for index, held in enumerate(occupied):
        assert held - never_read_inputs == expected_occupied(graph, slots, index), f"after step {index}"


def _reads(program: Program) -> list[set[int]]:
    """The slots each step reads."""
    return [{item.index for item in _slot_refs((step.args, step.kwargs))} for step in program.steps]


def _slot_refs(template: Any) -> list[Slot]:
    if isinstance(template, Slot):
        return [template]
    if isinstance(template, (tuple, list)):
        return [slot for item in template for slot in _slot_refs(item)]
    if isinstance(template, dict):
        return [slot for item in template.values() for slot in _slot_refs(item)]
    return []


# ------------------------------------------------------------------ random graphs


@settings(max_examples=25, deadline=None)
@given(elementwise_graphs())
def test_random_graphs_match_interpreter_and_free_every_dead_slot(graph: Graph) -> None:
    check_program(graph, seed=0)


@settings(max_examples=25, deadline=None)
@given(attention_graphs())
def test_attention_graphs_match_interpreter_and_free_unused_lse(graph: Graph) -> None:
    graph.outputs = (graph.nodes[0].results[0],)  # out only: lse is read by nobody
    check_program(graph, seed=1)


@settings(max_examples=25, deadline=None)
@given(elementwise_graphs())
def test_no_step_frees_a_slot_a_later_step_reads(graph: Graph) -> None:
    program = lower(graph)
    reads = _reads(program)
    outputs = {slot.index for slot in _slot_refs(program.outputs)}
    freed: set[int] = set()
    for index, step in enumerate(program.steps):
        assert not reads[index] & freed, f"step {index} ({step.label}) reads a freed slot"
        assert not set(step.frees) & outputs, f"step {index} frees an output"
        assert not set(step.frees) & freed, f"step {index} frees a slot twice"
        freed |= set(step.frees)


# ------------------------------------------------------------------ memory really is released


def _watching(step: Step, on_call: Callable[[], None], refs: list[weakref.ref]) -> Step:
    """The step with its function wrapped: call `on_call` first, then keep a weakref to its result."""
    def run(*args: Any, **kwargs: Any) -> Any:
        on_call()
        result = step.fn(*args, **kwargs)
        refs.append(weakref.ref(result))
        return result
    return Step(step.label, run, step.args, step.kwargs, step.results, step.frees)


def test_intermediates_are_released_before_the_program_ends() -> None:
    graph = parse_graph(CHAIN)
    program = lower(graph)
    refs: list[weakref.ref] = []  # one per step, in order: a, b, c, d, e
    alive_at: list[list[bool]] = []
    snapshot = lambda: alive_at.append([ref() is not None for ref in refs])  # noqa: E731
    program.steps = [_watching(step, snapshot, refs) for step in program.steps]
    x = torch.randn(64, 64, dtype=torch.float64)

    e, c = program([x])

    # when the last step (sum of d) starts: a (last read by relu) and b (by mul) are gone,
    # c is an output and d is being read
    assert alive_at[-1] == [False, False, True, True]
    assert alive_at[2] == [False, True], "a is freed right after relu, its last reader"
    torch.testing.assert_close(e, (torch.relu(-x) ** 2 + x).sum(0), rtol=0.0, atol=0.0)
    torch.testing.assert_close(c, torch.relu(-x) ** 2, rtol=0.0, atol=0.0)
    del e, c
    assert [ref() is None for ref in refs] == [True] * 5


def test_wrong_number_of_inputs_is_a_type_error() -> None:
    program = lower(parse_graph(CHAIN))
    with pytest.raises(TypeError, match="takes 1 inputs, got 2"):
        program([torch.zeros(64, 64), torch.zeros(64, 64)])


def test_slots_of_reads_the_mapping_from_the_program() -> None:
    """The helper itself: every value gets a distinct slot, and outputs map to the program's outputs."""
    graph = parse_graph(CHAIN)
    program = lower(graph)
    slots = slots_of(graph, program)
    assert len(set(slots.values())) == len(slots) == 6
    assert [slot.index for slot in program.outputs] == [slots[v.name] for v in values_in(graph.outputs)]
