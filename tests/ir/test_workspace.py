"""`OpDef.workspace`: what attention allocates inside itself, which the activation-memory plan
reserves, is at least what the accounting measures (and, for the blockwise reference the model
describes, not wildly more; PyTorch's fused CPU kernel allocates less, and the plan over-reserves
for it, which is safe)."""
import pytest
import torch

from seqweave.codegen import cpu_flash
from seqweave.codegen.lower import implementation
from seqweave.ir.graph import map_values
from seqweave.ir.ops import op_def
from seqweave.ir.parser import parse_graph
from seqweave.runtime.live_bytes import LiveBytes

ROPE = 'positions="rope(dims=32, positions=$0, rule=default, base=10000.0)", '
GRAPH = """\
graph attention(%q: f32[1, 4, {n}, 32], %k: f32[1, 2, {n}, 32], %v: f32[1, 2, {n}, 32], %pos: i64[1, {n}], %dout: f32[1, 4, {n}, 32]) {{
  %out, %lse = attn.sdpa(%q, %k, %v, [{operands}], mask="causal", score_mod="none", scale=0.25, kv_heads=2, {rope}layer=0) : f32[1, 4, {n}, 32], f32[1, 4, {n}]
  %dq, %dk, %dv = attn.sdpa_backward(%dout, %q, %k, %v, %out, %lse, [{operands}], mask="causal", score_mod="none", scale=0.25, kv_heads=2, {rope}layer=0) : f32[1, 4, {n}, 32], f32[1, 2, {n}, 32], f32[1, 2, {n}, 32]
  return (%dq, %dk, %dv)
}}
"""


@pytest.mark.parametrize("kernel", [cpu_flash.FORCE_REFERENCE, "fused"])
@pytest.mark.parametrize("n", [300, 1024])
@pytest.mark.parametrize("rope", [False, True])
def test_estimate_covers_what_attention_allocates(n, rope, kernel, monkeypatch):
    monkeypatch.setenv(cpu_flash.ENV, kernel)
    cpu_flash.launches.clear()
    graph = parse_graph(GRAPH.format(n=n, operands="%pos" if rope else "", rope=ROPE if rope else ""))
    values = {"q": torch.randn(1, 4, n, 32), "k": torch.randn(1, 2, n, 32), "v": torch.randn(1, 2, n, 32),
              "pos": torch.arange(n)[None], "dout": torch.randn(1, 4, n, 32)}
    for node in graph.nodes:
        args = map_values(node.args, lambda v: values[v.name])
        kwargs = map_values(node.kwargs, lambda v: values[v.name])
        with LiveBytes() as live:
            results = implementation(node, 0, None)(*args, **kwargs)
        for value, result in zip(node.results, results):
            values[value.name] = result
        produced = sum(r.numel() * r.element_size() for r in results)
        actual, estimate = live.device_peak - produced, op_def(node.op).workspace(node)
        assert actual <= estimate, (node.op, actual, estimate)
        if kernel == cpu_flash.FORCE_REFERENCE:  # the kernel the model describes: a tight estimate
            assert estimate <= 3 * actual + (1 << 20), (node.op, actual, estimate)
    assert bool(cpu_flash.launches) == (kernel == "fused")  # the kernel named is the one that ran
