"""`generate()` through the backend with a rolling `StreamingCache`.

The prefill graph carries the `streaming` (or `lm-infinite`) rewrite; each decode step reads
sinks + window slots, sink keys re-rotated to the method's distance. The logits of every
decoded token must equal the same rewrite applied to the whole sequence at once (checked
against token-by-token plain-torch StreamingLLM in test_streaming_rewrites), from two graphs
(prefill, decode: no recompiling per token) and with a cache that never grows.
"""
import pytest
import torch

import seqweave
from seqweave.testing.models import SampleSpec, build_sample

SINKS, WINDOW, PROMPT = 2, 6, 12
NEW_TOKENS = 8 * WINDOW  # decode 8x past the window
TOLERANCE = 1e-5


@pytest.mark.parametrize("pipeline, max_distance", [
    (f"streaming{{sinks={SINKS},window={WINDOW}}}", 0),
    (f"lm-infinite{{sinks={SINKS},window={WINDOW},max_distance=9}}", 9),
])
def test_generate_with_a_rolling_cache_equals_the_whole_sequence_rewrite(pipeline, max_distance):
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=PROMPT, batch=1))
    model.eval()
    forward = model.forward
    backend = seqweave.backend(pipeline=f"canonicalize,{pipeline}")
    model.forward = torch.compile(forward, backend=backend, fullgraph=True, dynamic=False)
    cache = seqweave.StreamingCache(model, sinks=SINKS, window=WINDOW, max_distance=max_distance)
    out = model.generate(inputs["input_ids"], past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    model.forward = forward
    decoded = torch.stack(out.logits, dim=1)
    whole = seqweave.backend(pipeline=f"canonicalize,{pipeline}")
    with torch.no_grad():
        expected = torch.compile(model, backend=whole, fullgraph=True, dynamic=False)(
            out.sequences[:, :-1], use_cache=False).logits[:, PROMPT - 1:]
    assert float((decoded - expected).abs().max() / expected.abs().max()) <= TOLERANCE
    assert [graph.kind for graph in backend.graphs] == ["inference", "inference"]  # prefill, then every token
    prefill, decode = backend.graphs
    assert all("far=[" in str(n.kwargs["positions"]) for n in prefill.graph.nodes if n.op == "attn.sdpa")
    assert [n.args[1].type.shape[2] for n in decode.graph.nodes if n.op == "attn.sdpa"] == [SINKS + WINDOW] * 2
    slots = SINKS + WINDOW
    assert cache.cache_bytes() == 2 * 2 * (1 * 2 * slots * 16 * 4)  # layers x (K, V) x [B, Hkv, slots, D] fp32


def test_streaming_pass_refuses_a_growing_cache_with_what_to_do():
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=PROMPT, batch=1))
    model.eval()
    backend = seqweave.backend(pipeline=f"canonicalize,streaming{{sinks={SINKS},window=4}}")
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match="StreamingCache"):
        model.generate(inputs["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_cache_arguments_are_checked():
    model, _ = build_sample(SampleSpec("llama-tiny", seq_len=8, batch=1))
    with pytest.raises(seqweave.SeqweaveError, match="what to do"):
        seqweave.StreamingCache(model, sinks=0, window=4)
    with pytest.raises(seqweave.SeqweaveError, match="max_distance"):
        seqweave.StreamingCache(model, sinks=2, window=8, max_distance=3)
    mistral, _ = build_sample(SampleSpec("mistral-tiny", seq_len=8, batch=1))
    with pytest.raises(seqweave.SeqweaveError, match="sliding_window = None"):
        seqweave.StreamingCache(mistral, sinks=2, window=8)


def test_mistral_without_its_own_window_streams_like_the_whole_sequence_rewrite():
    model, inputs = build_sample(SampleSpec("mistral-tiny", seq_len=PROMPT, batch=1))
    model.eval()
    model.config.sliding_window = None  # as the refusal above says: the streaming window replaces it
    forward, pipeline = model.forward, f"canonicalize,streaming{{sinks={SINKS},window={WINDOW}}}"
    model.forward = torch.compile(forward, backend=seqweave.backend(pipeline=pipeline), fullgraph=True, dynamic=False)
    cache = seqweave.StreamingCache(model, sinks=SINKS, window=WINDOW)
    out = model.generate(inputs["input_ids"], past_key_values=cache, max_new_tokens=3 * WINDOW, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    model.forward = forward
    with torch.no_grad():
        expected = torch.compile(model, backend=seqweave.backend(pipeline=pipeline), fullgraph=True, dynamic=False)(
            out.sequences[:, :-1], use_cache=False).logits[:, PROMPT - 1:]
    decoded = torch.stack(out.logits, dim=1)
    assert float((decoded - expected).abs().max() / expected.abs().max()) <= TOLERANCE
