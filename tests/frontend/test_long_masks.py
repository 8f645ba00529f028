"""Masks lifted at real lengths (32k, 128k tokens) without any N×N tensor, in lifting or in the graph."""
import math

import pytest

import seqweave.frontend.attention as attention_frontend
from seqweave.explain import explain
from seqweave.testing.memory import LargestAllocation
from seqweave.testing.models import SampleSpec, build_sample


@pytest.fixture
def lifting_allocations(monkeypatch):
    """Wrap mask lifting in an allocation tracker (independent of the code it watches)."""
    tracker = LargestAllocation()
    lift = attention_frontend.lift_mask

    def tracked(*args, **kwargs):
        with tracker:
            return lift(*args, **kwargs)
    monkeypatch.setattr(attention_frontend, "lift_mask", tracked)
    return tracker


@pytest.mark.parametrize("name, seq_len, options, mask", [
    ("llama-tiny", 131072, dict(padded=True), "causal & padding($0)"),
    ("mistral-tiny", 32768, dict(packed=True), "causal & sliding_window(8191, 0) & document($0)"),
    ("gpt2-tiny", 32768, dict(attn_implementation="eager"), "causal"),  # an additive float mask
])
def test_masks_lift_at_real_lengths_without_building_them(name, seq_len, options, mask, lifting_allocations):
    model, inputs = build_sample(SampleSpec(name, seq_len=seq_len, layers=2, hidden=64, **options))
    explanation = explain(model, inputs)
    assert [layer["mask"] for layer in explanation.layers] == [mask, mask]
    assert all("never built whole" in layer["reason"] for layer in explanation.layers)
    square = 2 * seq_len * seq_len  # batch 2
    assert 0 < lifting_allocations.largest <= square // 64, "lifting allocated a block of N×N size"
    # The lifted mask's subgraph was removed: the compiled graph holds nothing near N×N.
    assert math.prod(explanation.totals["largest_tensor"]) < seq_len * seq_len // 16
