"""Reference interpreter: a real captured ATen graph against FX, and attn.sdpa (+ backward)
against an independent dense float64 softmax attention."""
from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.interpreter import interpret
from seqweave.ir.ops.core import core_name
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.types import TensorType
from seqweave.ir.verifier import verify

# ------------------------------------------------------------------ a real captured ATen graph


class TinyBlock(torch.nn.Module):
    """linear -> layernorm -> split -> softmax * other half -> fp32 and back -> sum."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 12)
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.norm(self.lin(x)).split(6, dim=-1)
        mixed = torch.softmax(a, dim=-1) * b.transpose(0, 1).reshape(3, 6)
        return mixed.to(torch.float32).to(torch.float64).sum()


def capture_aten_graphs() -> list[torch.fx.GraphModule]:
    """Forward and backward ATen graphs of TinyBlock, via dynamo + AOTAutograd."""
    captured: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        captured.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    torch._dynamo.reset()
    model = torch.compile(TinyBlock().double(), backend=backend, fullgraph=True)
    model(torch.randn(3, 8, dtype=torch.float64, requires_grad=True)).backward()
    torch._dynamo.reset()
    return captured


def _plain(template: Any, env: dict) -> Any:
    """FX args (immutable lists, fx Nodes) as an IR template of plain lists/tuples and Values."""
    if isinstance(template, torch.fx.Node):
        return env[template]
    if isinstance(template, (list, tuple)):
        items = [_plain(item, env) for item in template]
        return items if isinstance(template, list) else tuple(items)
    return template


def _call_node(fx_node: torch.fx.Node, env: dict) -> Node:
    value = fx_node.meta["val"]
    many = isinstance(value, (list, tuple))
    names = [f"{fx_node.name}.{i}" for i in range(len(value))] if many else [fx_node.name]
    results = [Value(name, TensorType.from_tensor(t)) for name, t in zip(names, value if many else [value])]
    node = Node(core_name(fx_node.target), _plain(fx_node.args, env), _plain(fx_node.kwargs, env), results)
    for result in results:
        result.producer = node
    env[fx_node] = results if many else results[0]
    return node


def fx_to_ir(gm: torch.fx.GraphModule, name: str) -> Graph:
    """Just enough of an FX -> IR importer for these graphs: placeholders, ATen calls, getitem."""
    env: dict[torch.fx.Node, Any] = {}
    inputs, nodes, outputs = [], [], None
    for fx_node in gm.graph.nodes:
        if fx_node.op == "placeholder":
            env[fx_node] = Value(fx_node.name, TensorType.from_tensor(fx_node.meta["val"]))
            inputs.append(env[fx_node])
        elif fx_node.op == "call_function" and fx_node.target is operator.getitem:
            env[fx_node] = env[fx_node.args[0]][fx_node.args[1]]
        elif fx_node.op == "call_function" and isinstance(fx_node.target, torch._ops.OpOverload):
            nodes.append(_call_node(fx_node, env))
        elif fx_node.op == "output":
            outputs = _plain(fx_node.args[0], env)
        else:
            raise AssertionError(f"test importer does not handle {fx_node.format_node()}")
    return Graph(name, inputs, nodes, outputs)


def test_captured_aten_graphs_verify_round_trip_and_interpret() -> None:
    graphs = capture_aten_graphs()
    assert len(graphs) == 2
    for gm, name in zip(graphs, ("forward", "backward")):
        graph = fx_to_ir(gm, name)
        verify(graph)
        text = print_graph(graph)
        assert print_graph(parse_graph(text)) == text
        parsed = parse_graph(text)
        verify(parsed)
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randn(tuple(v.type.shape), dtype=torch.float64, generator=generator) for v in graph.inputs]
        torch.testing.assert_close(list(interpret(parsed, inputs)), list(gm(*inputs)))
    assert "core.native_layer_norm(" in text or "core.native_layer_norm_backward(" in text
    assert 'device=device("cpu")' in text and "torch.float64" in text


# ------------------------------------------------------------------ attention vs a dense float64 reference

B, HQ, HKV, D = 2, 4, 2, 16
SCALE = 0.25
WINDOW = 37


def dense_mask(mask: str, seq: int, segments: torch.Tensor) -> torch.Tensor:
    """[B, S, S] booleans written out element by element, independently of seqweave.ir.mask."""
    ids = segments.tolist()
    allowed = [[[False] * seq for _ in range(seq)] for _ in range(B)]
    for b in range(B):
        for i in range(seq):
            for j in range(i + 1):  # causal: keys up to and including the query
                in_window = "sliding_window" not in mask or i - j <= WINDOW
                same_doc = "document" not in mask or ids[b][i] == ids[b][j]
                allowed[b][i][j] = in_window and same_doc
    return torch.tensor(allowed)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with K/V repeated per query-head group (repeat_kv order)."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k_full.transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_full, torch.logsumexp(scores, dim=-1)


ATTN_GRAPH = """\
graph attn(%q: f64[{b}, {hq}, {s}, {d}], %k: f64[{b}, {hkv}, {s}, {d}], %v: f64[{b}, {hkv}, {s}, {d}], \
%seg: i64[{b}, {s}], %dout: f64[{b}, {hq}, {s}, {d}]) {{
  %out, %lse = attn.sdpa(%q, %k, %v, [%seg], {attrs}) : f64[{b}, {hq}, {s}, {d}], f64[{b}, {hq}, {s}]
  %dq, %dk, %dv = attn.sdpa_backward(%dout, %q, %k, %v, %out, %lse, [%seg], {attrs}) \
: f64[{b}, {hq}, {s}, {d}], f64[{b}, {hkv}, {s}, {d}], f64[{b}, {hkv}, {s}, {d}]
  return (%out, %lse, %dq, %dk, %dv)
}}
"""


def attention_graph(mask: str, seq: int) -> Graph:
    attrs = f'mask="{mask}", score_mod="none", scale={SCALE}, kv_heads={HKV}'
    return parse_graph(ATTN_GRAPH.format(b=B, hq=HQ, hkv=HKV, s=seq, d=D, attrs=attrs))


MASKS = ["causal", f"causal & sliding_window({WINDOW}, 0)", "causal & document($0)"]


@pytest.mark.parametrize("seq", [130, 257])
@pytest.mark.parametrize("mask", MASKS)
def test_sdpa_and_backward_match_dense_reference(mask: str, seq: int) -> None:
    graph = attention_graph(mask, seq)
    verify(graph)
    generator = torch.Generator().manual_seed(seq)
    q, dout = (torch.randn(B, HQ, seq, D, dtype=torch.float64, generator=generator) for _ in range(2))
    k, v = (torch.randn(B, HKV, seq, D, dtype=torch.float64, generator=generator) for _ in range(2))
    segments = torch.cumsum(torch.rand(B, seq, generator=generator) < 0.02, dim=1)  # a few documents each
    out, lse, dq, dk, dv = interpret(graph, [q, k, v, segments, dout])

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*leaves, dense_mask(mask, seq, segments))
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, leaves, dout)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-10, atol=1e-10)  # fp64 lse for fp64 attention
    for name, got, want in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
