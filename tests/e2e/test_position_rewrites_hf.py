"""Position and span rewrites against HF models configured to do the same thing.

The same random weights run (a) through seqweave with a rewrite in the pipeline and (b) in
eager HF with the config that means the same (`layer_types`, `rope_parameters`); logits and
every parameter's gradient must agree within 1e-5. Each test also pins what ran: the
rewritten mask or rotary is on every attention of both the forward and backward graphs.
"""
import pytest
import torch

import seqweave

SEQ, LAYERS = 24, 4
TOLERANCE = 1e-5


def max_relative_error(got, expected):
    """Largest difference relative to the largest magnitude of the expected tensor."""
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12))


def _pair(config_class, model_class, changed: dict, **sizes):
    """(base model, model built from the changed config) with the same weights."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="sdpa")
    common.update(sizes)
    base = model_class(config_class(**common))
    other = model_class(config_class(**common, **changed))
    other.load_state_dict(base.state_dict())
    return base, other


def _run(model, ids, backend=None):
    model.zero_grad()
    run = torch.compile(model, backend=backend, fullgraph=True, dynamic=False) if backend else model
    logits = run(input_ids=ids, use_cache=False).logits
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(mine, theirs):
    assert max_relative_error(mine[0], theirs[0]) <= TOLERANCE
    for name, grad in theirs[1].items():
        assert max_relative_error(mine[1][name], grad) <= TOLERANCE, name


def _attention_attributes(backend, key):
    return [str(node.kwargs.get(key, "none")) for graph in backend.graphs for node in graph.graph.nodes
            if node.op.startswith("attn.")]


def test_mixed_spans_equal_hf_sliding_layer_types():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    base, hf = _pair(Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=5,
                                                          layer_types=types))
    ids = torch.randint(1, 64, (2, SEQ))
    backend = seqweave.backend(pipeline="canonicalize,mixed-spans{window=5,full=0+3}")
    _assert_same(_run(base, ids, backend), _run(hf, ids))
    masks = _attention_attributes(backend, "mask")
    assert len(masks) == 2 * LAYERS and masks.count("causal & sliding_window(4, 0)") == 4
    assert masks.count("causal") == 4


@pytest.mark.parametrize("rope_parameters, pipeline", [
    ({"rope_type": "default", "rope_theta": 500000.0}, "rope-scale{base=500000}"),
    ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, "rope-scale{rule=linear,factor=4}"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16, "rope_theta": 10000.0},
     "rope-scale{rule=llama3,factor=8,original_max=16}"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
     "rope-scale{rule=yarn,factor=4,original_max=16}"),
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},  # HF: the config's max positions (16)
     "rope-scale{rule=ntk,factor=2,original_max=16}"),
], ids=["abf-base", "linear", "llama3", "yarn", "dynamic"])
def test_rope_scale_equals_hf_rope_parameters(rope_parameters, pipeline):
    from transformers import LlamaConfig, LlamaForCausalLM
    sizes = {"max_position_embeddings": 16} if rope_parameters["rope_type"] == "dynamic" else {}
    base, hf = _pair(LlamaConfig, LlamaForCausalLM, dict(rope_parameters=rope_parameters), **sizes)
    ids = torch.randint(1, 64, (2, SEQ))
    backend = seqweave.backend(pipeline=f"canonicalize,{pipeline}")
    _assert_same(_run(base, ids, backend), _run(hf, ids))
    rule = rope_parameters["rope_type"]
    assert all(f"rule={rule}" in spec for spec in _attention_attributes(backend, "positions"))
    assert len(_attention_attributes(backend, "positions")) == 2 * LAYERS


def test_unscaled_model_differs_from_scaled_one():
    """The comparison above can fail: the base model is not the scaled one."""
    from transformers import LlamaConfig, LlamaForCausalLM
    base, hf = _pair(LlamaConfig, LlamaForCausalLM, dict(rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0}))
    ids = torch.randint(1, 64, (2, SEQ))
    assert max_relative_error(_run(base, ids)[0], _run(hf, ids)[0]) > 1e-3
