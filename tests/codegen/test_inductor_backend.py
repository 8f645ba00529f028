"""inner_backend="inductor": the IR lowered back to FX (codegen.fx_lower), seqweave's ops as
`seqweave::extern` calls in IR order, compiled by Inductor (codegen.inductor).

Golden text of a lowering; generated programs (hypothesis) and sharded attention on simulated
ranks run through the FX form against the float64 interpreter; a user-written model trained
through Inductor against float64 eager, pinning what ran; a graph Inductor cannot take runs
eager and says so; out-of-order extern calls are refused; ranks share Inductor's cache.
"""
from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import seqweave
from seqweave.codegen.extern_op import ExternCall, ExternOrderError, ExternTable, running
from seqweave.codegen.fx_lower import NotLowerable, to_fx
from seqweave.codegen.inductor import InductorProgram, program_digest
from seqweave.errors import OptionError
from seqweave.ir.interpreter import interpret
from seqweave.ir.types import ScalarType, TensorType
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.testing.equivalence import random_inputs
from seqweave.testing.graph_builder import GraphBuilder
from seqweave.testing.programs import ProgramSpec, programs
from seqweave.testing.simulate import simulate
from seqweave.testing.strategies import AttentionShape, attention_graph


def _scaled_attention_graph():
    """y = attn.sdpa(q * 2, k, v).out + q: one extern between two core ops."""
    builder = GraphBuilder.new("forward")
    q, k, v = (builder.input((1, 2, 5, 4), torch.float64) for _ in range(3))
    doubled = builder.one("core.mul.Tensor", (q, 2.0))
    out, _lse = builder.node("attn.sdpa", (doubled, k, v, []),
                             {"mask": "causal", "score_mod": "none", "scale": 0.5, "kv_heads": 2})
    builder.graph.outputs = (builder.one("core.add.Tensor", (out, q)),)
    return builder.graph


def _fx_text(module: torch.fx.GraphModule) -> list[str]:
    def name(target):
        return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    return [f"{node.name} = {node.op if node.op in ('placeholder', 'output') else name(node.target)}"
            f"{tuple(node.args) if node.op != 'placeholder' else ''}" for node in module.graph.nodes]


def test_lowering_golden_text():
    lowered = to_fx(_scaled_attention_graph())
    assert _fx_text(lowered.module) == [
        "in_0 = placeholder", "in_1 = placeholder", "in_2 = placeholder", "token = placeholder",
        "mul_tensor = aten.mul.Tensor(in_0, 2.0)",
        "extern_default = seqweave.extern.default(0, [token, mul_tensor, in_1, in_2])",
        "getitem = getitem(extern_default, 0)", "getitem_1 = getitem(extern_default, 1)",
        "getitem_2 = getitem(extern_default, 2)",
        "add_tensor = aten.add.Tensor(getitem, in_0)",
        "output = output([getitem_2, add_tensor],)",
    ]
    assert [call.label for call in lowered.table.calls] == ["attn.sdpa -> %" + _scaled_attention_graph().nodes[1]
                                                            .results[0].name]


def test_lowered_module_equals_the_interpreter():
    graph = _scaled_attention_graph()
    inputs = random_inputs(graph)
    (want,) = interpret(graph, [t.clone() for t in inputs])
    (got,) = to_fx(graph)(list(inputs))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(programs(ProgramSpec(max_steps=3)))
def test_generated_programs_through_fx_equal_the_interpreter(program):
    """Every generated program (attention under MaskSpec masks, rotary, norms, losses, backward
    programs) gives the interpreter's numbers through its FX form."""
    inputs = program.inputs()
    want = interpret(program.graph, [t.clone() for t in inputs])
    lowered = to_fx(program.graph)
    got = lowered([t.clone() for t in inputs])
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("attention, world, ulysses, mask", [
    ("ring", 3, 1, "causal & sliding_window(3, 0)"), ("ulysses", 2, 1, "causal"), ("hybrid", 4, 2, "causal")])
def test_sharded_attention_through_fx_on_simulated_ranks(attention, world, ulysses, mask):
    """Each simulated rank (a thread: the extern table is per thread) runs the FX form of the
    sharded graph, collectives bound to its own communicator."""
    graph = attention_graph(AttentionShape(1, 2, 2, 9, 9, 4), mask)
    sharded = copy.deepcopy(graph)
    ShardSequence(world=world, layout="zigzag", length=9, attention=attention, ulysses=ulysses).run(sharded)
    inputs = random_inputs(graph)
    whole = interpret(graph, [t.clone() for t in inputs])
    simulation = simulate(sharded, inputs, world, lowering=to_fx)
    for rank in range(world):
        for got, want in zip(simulation.outputs[rank], whole, strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert "shift" in simulation.kinds_used() or "all_to_all" in simulation.kinds_used()


def test_extern_calls_out_of_ir_order_are_refused():
    table = ExternTable()
    for label in ("first", "second", "third"):
        table.add(ExternCall(label, lambda tensors: [tensors[0] + 1], (((2,), torch.float32),)))
    token = torch.empty(0)
    table.run(0, [token, torch.zeros(2)])
    with pytest.raises(ExternOrderError, match="called third .* where the IR runs second"):
        table.run(2, [token, torch.zeros(2)])


def test_an_extern_result_never_aliases_its_input():
    """A custom op may not return its input; an identity-like op (mem.wait) gets a copy."""
    table = ExternTable()
    table.add(ExternCall("identity", lambda tensors: [tensors[0]], (((3,), torch.float32),)))
    x = torch.ones(3)
    result, token = table.run(0, [torch.empty(0), x])
    assert result.data_ptr() != x.data_ptr() and torch.equal(result, x) and token.numel() == 0


def test_extern_results_never_alias_each_other():
    """Gradients handed back as views of one buffer (dk, dv of a ring step) become two storages."""
    table = ExternTable()
    table.add(ExternCall("two views", lambda tensors: list(torch.zeros(2, 3).unbind(0)),
                         (((3,), torch.float32), ((3,), torch.float32))))
    first, second, _token = table.run(0, [torch.empty(0), torch.ones(1)])
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_an_extern_call_may_differentiate_inside():
    """Linear attention's reference backward runs autograd inside: the dispatcher switches
    autograd off below a custom op, and the extern call switches it back on."""
    def gradient_of_square(tensors):
        with torch.enable_grad():
            x = tensors[0].detach().requires_grad_()
            return [torch.autograd.grad((x * x).sum(), x)[0]]
    table = ExternTable()
    table.add(ExternCall("grad", gradient_of_square, (((3,), torch.float32),)))
    x = torch.tensor([1.0, 2.0, 3.0])
    with running(table), torch.no_grad():
        (grad, _token) = torch.ops.seqweave.extern.default(0, [torch.empty(0), x])
    torch.testing.assert_close(grad, 2 * x)


def test_a_graph_taking_sizes_is_not_lowerable():
    """dynamo's symbolic sizes arrive as int inputs with new values each call: compiled at one
    value the graph would be wrong at the next, so it runs eager."""
    builder = GraphBuilder.new("forward")
    x = builder.input((2, 3), torch.float32)
    builder.graph.inputs.append(size := type(x)("n", ScalarType("int")))
    out = builder.one("core.mul.Tensor", (x, 2.0))
    node = builder.graph.nodes[-1]
    node.op, node.args = "sp.all_reduce", (out, size)
    node.results[0].type = TensorType.of((2, 3), torch.float32)
    with pytest.raises(NotLowerable, match="takes symbolic sizes \\(%n: int\\)"):
        to_fx(builder.graph)


# ------------------------------------------------------------------ through torch.compile


class TinyBlock(nn.Module):
    """Written the way users write models: a norm, a fused qkv projection, F.sdpa, an MLP."""

    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(attended)
        return x + self.mlp(x)


def test_a_user_model_trains_through_inductor_exactly(caplog):
    """Loss outside the graph and out.backward(dout): forward and backward both compiled by
    Inductor with attention as an extern call; the numbers are float64 eager's."""
    torch.manual_seed(0)
    model, x = TinyBlock(), torch.randn(2, 16, 32)
    reference = copy.deepcopy(model).double()
    backend = seqweave.backend(inner_backend="inductor")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    dout = torch.randn(2, 16, 32)
    with caplog.at_level(logging.INFO, logger="seqweave.inductor"):
        out = compiled(x)
        out.backward(dout)
    want = reference(x.double())
    want.backward(dout.double())
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-4, rtol=1e-4, msg=name)
    ran = {g.kind: (g.runner, g.program.stats["compiles"], g.program.stats["extern_calls"]) for g in backend.graphs}
    assert ran == {"forward": ("inductor", 1, 1), "backward": ("inductor", 1, 1)}
    assert backend.attention_count() == 1 and backend.attention_count("backward") == 1
    assert "compiling the forward graph with Inductor" in caplog.text


def test_symbolic_sizes_run_eager_and_say_so(caplog):
    torch.manual_seed(0)
    model = TinyBlock()
    backend = seqweave.backend(inner_backend="inductor")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    x = torch.randn(1, 12, 32)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="seqweave"):
        out = compiled(x)
        want = model(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert [g.runner for g in backend.graphs] == ["eager"]
    assert "runs eager" in caplog.text


def test_same_program_compiles_once_then_reads_the_cache():
    """Two ranks' programs are the same code: the second compile is an FX-graph cache hit."""
    graph = _scaled_attention_graph()
    first, second = InductorProgram(graph), InductorProgram(copy.deepcopy(graph))
    assert first.digest == second.digest == program_digest(graph)
    inputs = random_inputs(graph)
    a, b = first(list(inputs)), second(list(inputs))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert second.stats["compiles"] == 1 and (first.stats["cache_hits"] + second.stats["cache_hits"]) >= 1


def test_the_compiled_program_lets_go_of_its_inputs():
    """Boxed like the eager step list: a backward can free each saved activation, and the caller
    keeps no reference the program does not need."""
    graph = _scaled_attention_graph()
    program = InductorProgram(graph)
    inputs = random_inputs(graph)
    (want,) = interpret(graph, [t.clone() for t in inputs])
    alive = weakref.ref(inputs[1])
    args = list(inputs)
    del inputs
    (got,) = program(args)
    assert args == [] and alive() is None
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_a_graph_with_a_memory_plan_is_not_lowerable():
    """A plan's host arenas are written through views and its peak planned op by op: Inductor
    would plan buffers its own way, so a planned graph keeps the eager runtime."""
    builder = GraphBuilder.new("forward")
    x = builder.input((2, 3), torch.float32)
    arena = builder.one("mem.host_arena", (x,), {"nbytes": 24})
    builder.graph.outputs = (builder.one("mem.offload", (x, arena), {"offset": 0}),)
    with pytest.raises(NotLowerable, match="activation-memory plan \\(mem.host_arena, mem.offload\\)"):
        to_fx(builder.graph)


def test_unknown_inner_backend_is_named():
    with pytest.raises(OptionError, match="inner_backend='tvm'"):
        seqweave.backend(inner_backend="tvm")
