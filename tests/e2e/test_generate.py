"""HF models in eval mode with their caches, through the backend, against eager.

- `generate()` through a compiled `forward` with a StaticCache gives eager's greedy tokens, from
  two graphs (prefill and decode: no recompiling per token), and the cache writes (`index_copy_`
  into the cache tensors) really happen — dropping them once gave eager's first three tokens only.
- With the default DynamicCache, prefill and each decode step give eager's logits; compiled the
  default way (`dynamic` unset) the key length becomes symbolic after the first decode step,
  and `generate()` gives eager's tokens from three graphs, not one per token.
"""
import pytest
import torch

import seqweave
from seqweave.testing.models import SampleSpec, build_sample

PROMPT = 40
NEW_TOKENS = 64
TOLERANCE = 1e-5


def _eval_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    model, inputs = build_sample(SampleSpec(name, seq_len=PROMPT + NEW_TOKENS, batch=1))
    return model.eval(), inputs["input_ids"][:, :PROMPT]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_generate_with_static_cache_gives_eager_tokens(name):
    model, prompt = _eval_model(name)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(prompt, **options)
    backend = seqweave.backend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    got = model.generate(prompt, **options)
    assert torch.equal(got, expected), (got[0, PROMPT:], expected[0, PROMPT:])
    assert [graph.kind for graph in backend.graphs] == ["inference", "inference"]  # prefill, decode
    assert backend.attention_count() == 2 * 2  # every layer's attention ran as attn.sdpa in both


def test_mistral_static_cache_decode_steps_match_eager():
    """Mistral's sliding-window static cache guards on a Python int that grows every token, so
    dynamo recompiles each step whatever the backend; a few steps through seqweave must still
    equal eager."""
    model, prompt = _eval_model("mistral-tiny")
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(prompt, **options)
    backend = seqweave.backend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    assert torch.equal(model.generate(prompt, **options), expected)
    assert len(backend.graphs) == 4


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "mistral-tiny"])
def test_default_dynamic_cache_prefill_and_decode_match_eager(name):
    """`model(ids)` in eval mode uses HF's default cache (use_cache=True): a lifted tensor
    constant once made this fail to capture; prefill then two decode steps match eager."""
    from transformers import DynamicCache

    model, prompt = _eval_model(name)
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    mine, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
    step = prompt
    with torch.no_grad():
        for _ in range(3):
            got = compiled(step, cache=mine).logits
            expected = model(step, cache=theirs).logits
            assert float((got - expected).abs().max()) <= TOLERANCE
            step = expected[:, -1:].argmax(-1)
    assert len(backend.graphs) == 3 and backend.attention_count() == 3 * 2
    for layer_mine, layer_theirs in zip(mine.layers, theirs.layers):
        assert layer_mine.keys.shape == layer_theirs.keys.shape
        torch.testing.assert_close(layer_mine.keys, layer_theirs.keys, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(layer_mine.values, layer_theirs.values, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_generate_with_dynamic_cache_gives_eager_tokens_without_recompiling_per_token(name):
    """Mistral's sliding-window cache reads its fill level as a symbolic size: its mask stays dense."""
    model, prompt = _eval_model(name)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **options)
    backend = seqweave.backend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    got = model.generate(prompt, **options)
    assert torch.equal(got, expected), (got[0, PROMPT:], expected[0, PROMPT:])
    assert len(backend.graphs) == 3  # prefill, first decode step, then every later step (symbolic length)
    assert backend.attention_count() == 3 * 2
