"""The program generator: every program verifies, runs whole in float64, round-trips as IR text,
covers what it promises (attention with every mask family, GQA/MQA, rotary, norms, projections,
losses, backward programs), meets its constraints, and derives the same inputs from its text."""
import collections
import re

import pytest
import torch
from hypothesis import given, settings

from seqweave.ir.interpreter import interpret
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.testing.programs import (IGNORE_INDEX, ProgramSpec, generate_program, generate_programs,
                                       integer_roles, program_inputs)
from seqweave.testing.strategies import Mesh, mask_specs, meshes, programs

PROGRAMS = generate_programs(1, 60)


@pytest.fixture(scope="module")
def run_whole():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {id(p): interpret(p.graph, p.inputs()) for p in PROGRAMS}
    torch.set_num_threads(before)


def test_every_program_verifies_runs_and_round_trips(run_whole):
    for program in PROGRAMS:
        verify(program.graph)
        text = print_graph(program.graph)
        assert print_graph(parse_graph(text)) == text
        outputs = run_whole[id(program)]
        assert outputs and all(torch.isfinite(o).all() for o in outputs if o.is_floating_point()), str(program)


def test_the_programs_cover_what_the_generator_promises():
    ops = collections.Counter(node.op for p in PROGRAMS for node in p.graph.nodes)
    masks = " ".join(str(n.kwargs["mask"]) for p in PROGRAMS for n in p.graph.nodes if n.op == "attn.sdpa")
    for op in ("attn.sdpa", "attn.sdpa_backward", "core.mm", "core.addmm", "core.native_layer_norm", "core.rsqrt",
               "core.embedding", "core.nll_loss_forward", "core.mse_loss", "core.split_with_sizes", "core.cat"):
        assert ops[op], f"no {op} in 60 programs"
    for family in ("causal", "sliding_window", "sinks", "chunked", "document", "padding"):
        assert family in masks
    attentions = [n for p in PROGRAMS for n in p.graph.nodes if n.op == "attn.sdpa"]
    ratios = {n.args[0].type.shape[1] // n.kwargs["kv_heads"] for n in attentions}
    assert {1, 2} <= ratios and any(n.kwargs["kv_heads"] == 1 and n.args[0].type.shape[1] > 1 for n in attentions)
    assert any("positions" in n.kwargs for n in attentions)
    assert any(int(n.args[0].type.shape[2]) % 2 for n in attentions)  # odd lengths
    assert sum("backward" in p.features for p in PROGRAMS) >= 10


def test_the_same_seed_gives_the_same_program():
    assert print_graph(generate_program(7).graph) == print_graph(generate_program(7).graph)
    assert print_graph(generate_program(7).graph) != print_graph(generate_program(8).graph)


@pytest.mark.parametrize("multiple", [2, 3, 4])
def test_heads_split_over_the_ulysses_group(multiple):
    for program in generate_programs(2, 15, ProgramSpec(head_multiple=multiple)):
        for node in program.graph.nodes:
            if node.op.startswith("attn.sdpa"):
                q = node.args[1 if "backward" in node.op else 0]
                q_heads, kv_heads = int(q.type.shape[1]), node.kwargs["kv_heads"]
                assert q_heads % multiple == 0 and (kv_heads % multiple == 0 or multiple % kv_heads == 0)


def test_rope_always_lifts_every_rotary_and_sizes_stay_in_bounds():
    for program in generate_programs(3, 15, ProgramSpec(rope="always", max_seq=9, min_seq=5, max_batch=1)):
        assert 5 <= program.length <= 9
        for node in program.graph.nodes:
            if node.op.startswith("attn.sdpa"):
                assert "positions" in node.kwargs and int(node.args[1].type.shape[0]) == 1  # batch


def test_integer_inputs_hold_what_their_consumers_need():
    seen = set()
    for program in PROGRAMS:
        roles = integer_roles(program.graph)
        for value, tensor in zip(program.graph.inputs, program.inputs()):
            kind, bound = roles.get(value, ("float", 0)) if not tensor.is_floating_point() else ("float", 0)
            seen.add(kind)
            if kind == "ids":
                assert 0 <= tensor.min() and tensor.max() < bound
            elif kind == "targets":
                real = tensor[tensor != IGNORE_INDEX]
                assert real.numel() == 0 or (0 <= real.min() and real.max() < bound)
            elif kind == "segments":
                assert (tensor.diff(dim=-1) >= 0).all()  # packed documents: non-decreasing ids
            elif kind == "valid":
                assert (tensor[..., 0] == 1).all() and (tensor.diff(dim=-1) <= 0).all()  # right padding
            elif kind == "positions":
                assert torch.equal(tensor[0], torch.arange(tensor.shape[-1]))
    assert {"ids", "targets", "segments", "valid", "positions"} <= seen


def test_inputs_come_from_the_text_alone():
    program = next(p for p in PROGRAMS if re.search(r"document|padding", print_graph(p.graph)))
    reread = parse_graph(print_graph(program.graph))
    for a, b in zip(program.inputs(), program_inputs(reread, program.seed)):
        assert torch.equal(a, b)


@settings(max_examples=15)
@given(programs(ProgramSpec(max_steps=2, max_seq=12)))
def test_the_hypothesis_strategy_draws_valid_programs(program):
    verify(program.graph)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interpret(program.graph, program.inputs())
    finally:
        torch.set_num_threads(before)


@settings(max_examples=40)
@given(meshes(), mask_specs())
def test_meshes_and_mask_specs(mesh, mask):
    assert 1 <= mesh.world <= 8 and mesh.world % mesh.ulysses == 0
    assert isinstance(mesh, Mesh) and (mesh.hybrid == (1 < mesh.ulysses < mesh.world))
    assert parse_mask(str(mask)) == mask
