"""Rotary embeddings lifted into attention (`frontend.rope_lift`).

Every HF architecture with rotary positions in the sample zoo (full rotary: Llama, Qwen2,
Mistral, Phi-3, Gemma; partial: GPT-NeoX) compiles with its rotary lifted into the attention
op, the report says so, no cos/sin is left in the forward graph, and the training step equals
eager. A rotary the lifter cannot reproduce stays in the graph, exact, with the reason.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqweave
from seqweave.testing.models import SampleSpec, build_sample

TOLERANCE = 1e-5
ROTARY_SAMPLES = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "phi3-tiny", "gemma-tiny", "neox-tiny"]


def _relative(got, expected):
    got, expected = got.detach(), expected.detach()
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12))


def _step(model, inputs, run=None):
    model.zero_grad()
    out = (model if run is None else run)(**inputs)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ROTARY_SAMPLES)
def test_hf_rotary_is_lifted_and_training_matches_eager(name):
    model, inputs = build_sample(SampleSpec(name, seq_len=12, batch=2))
    logits, grads = _step(model, inputs)
    backend = seqweave.backend()
    got_logits, got_grads = _step(model, inputs, torch.compile(model, backend=backend, fullgraph=True,
                                                                  dynamic=False))
    assert _relative(got_logits, logits) <= TOLERANCE
    assert grads.keys() == got_grads.keys()
    for key, grad in grads.items():
        assert _relative(got_grads[key], grad) <= TOLERANCE, key
    found = [report for report in backend.reports if report.found]
    assert len(found) == 2 and all("rotary lifted" in r.reason and r.positions.startswith("rope(") for r in found)
    expected_dims = 4 if name == "neox-tiny" else 16  # NeoX rotates a quarter of each 16-wide head
    assert all(f"dims={expected_dims}," in r.positions for r in found)
    forward = next(g.graph for g in backend.graphs if g.kind == "forward")
    assert forward.count("core.cos") == 0 and forward.count("core.sin") == 0
    attention = [node for g in backend.graphs for node in g.graph.nodes if node.op.startswith("attn.")]
    assert len(attention) == 4 and all(str(node.kwargs["positions"]).startswith("rope(") for node in attention)
    assert sorted(node.kwargs["layer"] for node in attention) == [0, 0, 1, 1]


@pytest.mark.parametrize("rope_parameters, expected", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16, "rope_theta": 10000.0}, "freqs=$1)"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
     "scaling=1.1386"),
    ({"rope_type": "default", "rope_theta": 500000.0}, "base=500000.0"),
], ids=["llama3", "yarn", "abf-base"])
def test_scaled_frequency_tables_are_lifted(rope_parameters, expected):
    """Tables that are not HF's default rule are lifted with the captured frequencies (and
    YaRN's attention scaling); a default rule keeps its base, so rope-scale can change it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                         rope_parameters=rope_parameters))
    ids = torch.randint(1, 64, (2, 24))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    logits, grads = _step(model, inputs)
    backend = seqweave.backend()
    got_logits, got_grads = _step(model, inputs, torch.compile(model, backend=backend, fullgraph=True, dynamic=False))
    assert _relative(got_logits, logits) <= TOLERANCE
    assert all(_relative(got_grads[key], grad) <= TOLERANCE for key, grad in grads.items())
    assert all(expected in r.positions for r in backend.reports)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class OddRotary(nn.Module):
    """Rotary written almost like HF's; `variant` makes it something the lifter must refuse."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.proj = nn.Linear(16, 48)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
        self.scale = nn.Parameter(torch.ones(()))

    def tables(self, positions):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.variant == "squared-cos":
            return emb.cos().square().unsqueeze(1), emb.sin().unsqueeze(1)
        if self.variant == "learned-scale":  # 1.0 at first, so the tables match HF's until it trains
            return (emb.cos() * self.scale).unsqueeze(1), (emb.sin() * self.scale).unsqueeze(1)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        positions = torch.arange(n)[None]
        cos, sin = self.tables(positions)
        q = q * cos + _rotate_half(q) * sin
        if self.variant == "shifted-keys":
            cos, sin = self.tables(positions + 3)
        k = k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("variant, reason", [
    ("squared-cos", "the captured tables are not rope("),
    ("shifted-keys", "q and k are rotated by different tables"),
    ("learned-scale", "the tables also read"),
])
def test_a_rotary_the_lifter_cannot_reproduce_stays_with_its_reason(variant, reason):
    torch.manual_seed(0)
    model, x = OddRotary(variant), torch.randn(2, 10, 16)
    backend = seqweave.backend()
    got = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x)
    assert _relative(got, model(x)) <= TOLERANCE
    (report,) = backend.reports
    assert report.found and report.positions == "" and f"rotary left in the graph: {reason}" in report.reason


def test_keys_from_a_cache_keep_their_rotary_in_the_graph():
    from transformers import DynamicCache

    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=12, batch=1))
    model.eval()
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(inputs["input_ids"], cache=DynamicCache(config=model.config)).logits
        expected = model(inputs["input_ids"], cache=DynamicCache(config=model.config)).logits
    assert _relative(got, expected) <= TOLERANCE
    assert all("k is not rotated right before the attention" in r.reason for r in backend.reports if r.found)


class OuterProductRotary(nn.Module):
    """Rotary as many people write it outside HF: `torch.outer` of token indices and
    frequencies, an [S, D] table broadcast with `[None, None]`, no position ids at all."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.register_buffer("inv_freq", 1.0 / (500000 ** (torch.arange(0, 8, 2).float() / 8)))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        freqs = torch.outer(torch.arange(n, device=x.device).float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_outer_product_rotary_with_broadcast_tables_is_lifted():
    torch.manual_seed(0)
    model, x = OuterProductRotary(), torch.randn(2, 10, 16, requires_grad=True)
    expected = model(x)
    expected.backward(torch.ones_like(expected))
    grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    x.grad = None
    model.zero_grad()
    backend = seqweave.backend()
    got = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x)
    got.backward(torch.ones_like(got))
    assert _relative(got, expected) <= TOLERANCE
    for mine, theirs in zip([x.grad, *(p.grad for p in model.parameters())], grads):
        assert _relative(mine, theirs) <= TOLERANCE
    (report,) = backend.reports
    assert "rotary lifted" in report.reason and "base=500000.0" in report.positions


def test_rope_scale_on_a_user_rotary_equals_the_module_built_with_that_base():
    """A rewrite on a model that is not HF's, gradients taken outside the graph with `out.backward(dout)`."""
    torch.manual_seed(0)
    model, x = OuterProductRotary(), torch.randn(2, 10, 16)
    rebased = OuterProductRotary()
    rebased.load_state_dict(model.state_dict() | {"inv_freq": 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))})
    dout = torch.randn(2, 2, 10, 8)
    expected = rebased(x)
    expected.backward(dout)
    backend = seqweave.backend(pipeline="canonicalize,rope-scale{base=10000}")
    got = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(x)
    got.backward(dout)
    assert _relative(got, expected) <= TOLERANCE
    assert _relative(model.proj.weight.grad, rebased.proj.weight.grad) <= TOLERANCE
    attention = [n for g in backend.graphs for n in g.graph.nodes if n.op.startswith("attn.")]
    assert [n.op for n in attention] == ["attn.sdpa", "attn.sdpa_backward"]
    assert all("base=10000.0" in str(n.kwargs["positions"]) for n in attention)
