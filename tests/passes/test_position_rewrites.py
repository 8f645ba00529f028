"""Position and span rewrites on IR graphs: golden text, must-not-fire, and properties against
an independent dense reference of each rewrite's declared semantics (float64 under the
interpreter). The reference scores each pair (i, j) with q rotated by the distance the
method declares and k unrotated (RoPE depends on the distance only), with its own tables."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from seqweave.errors import PassError
from seqweave.ir.interpreter import interpret
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.manager import run_pipeline
from seqweave.testing.strategies import AttentionShape, GraphBuilder, attention_graph, rotary_attention_graph

TOLERANCE = 1e-5


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def dense_reference(q, k, v, allowed, distance, base):
    """Attention with pair (i, j) scored as rotate(q_i, distance[i, j]) . k_j (float64)."""
    d = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = distance.double()[..., None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q_pairs = q[:, :, :, None, :] * cos + _rotate_half(q)[:, :, :, None, :] * sin
    scores = (q_pairs * k[:, :, None]).sum(-1) * d ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _pairs(n):
    return torch.arange(n)[:, None], torch.arange(n)[None, :]


def streaming_pairs(n, sinks, window):
    i, j = _pairs(n)
    allowed = (j <= i) & ((j < sinks) | (i - j < window))
    return allowed, torch.where((i >= sinks + window) & (j < sinks), sinks + window - 1 - j, i - j)


def lm_infinite_pairs(n, sinks, window, limit):
    i, j = _pairs(n)
    return (j <= i) & ((j < sinks) | (i - j < window)), (i - j).clamp(max=limit)


def _inputs(graph, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v, positions = graph.inputs
    return [torch.randn(x.type.concrete_shape(), dtype=torch.float64, generator=generator) for x in (q, k, v)] + \
        [torch.arange(positions.type.concrete_shape()[1])[None]]


def _rewritten_output(graph, pipeline):
    run_pipeline(graph, pipeline)
    inputs = _inputs(graph)
    return interpret(graph, inputs)[0], inputs


SHAPE = AttentionShape(1, 1, 2, 9, 9, 8)


def test_golden_streaming_attributes():
    graph = rotary_attention_graph(SHAPE)
    runs = run_pipeline(graph, "streaming{sinks=2,window=4}")
    node = graph.nodes[0]
    assert node.kwargs["mask"] == "causal & (sinks(2) | sliding_window(3, 0)) & (sliding_window(3, 0) | queries_before(6))"
    assert node.kwargs["positions"] == ("rope(dims=8, positions=$0, rule=default, base=10000.0, "
                                        "far=[causal & (sinks(2) | sliding_window(3, 0)) & sinks(2) & "
                                        "queries_from(6)], far_q=5)")
    assert runs[0].result.rewrites == 1 and "layers 0" in runs[0].result.detail
    assert "attn.sdpa" in print_graph(graph)


def test_golden_mixed_spans_and_rope_scale():
    graph = rotary_attention_graph(SHAPE, layer=3)
    run_pipeline(graph, "mixed-spans{window=5,full=0+5},rope-scale{rule=linear,factor=4},rope-fp32")
    node = graph.nodes[0]
    assert node.kwargs["mask"] == "causal & sliding_window(4, 0)"
    assert node.kwargs["positions"] == ("rope(dims=8, positions=$0, compute=float32, rule=linear, base=10000.0, "
                                        "factor=4.0)")


def test_a_second_mixed_spans_changes_nothing():
    """Idempotent, as it claims: the window is not appended again (`... & sliding_window(4, 0)` twice)."""
    graph = rotary_attention_graph(SHAPE, layer=3)
    run_pipeline(graph, "mixed-spans{window=5}")
    before = print_graph(graph).split("\n", 1)[1]  # below the pass's note
    [again] = run_pipeline(graph, "mixed-spans{window=5}")
    assert again.result.rewrites == 0 and print_graph(graph).split("\n", 2)[2] == before
    assert str(graph.nodes[0].kwargs["mask"]) == "causal & sliding_window(4, 0)"


@pytest.mark.parametrize("pipeline", ["streaming{sinks=4,window=8}", "rope-scale{base=500000}", "rope-fp32",
                                      "lm-infinite{sinks=2,window=8}", "mixed-spans{window=8,full=0}"])
def test_must_not_fire_without_attention_or_outside_the_listed_layers(pipeline):
    builder = GraphBuilder.new("plain")
    x = builder.input((3, 4), torch.float32)
    builder.graph.outputs = (builder.one("core.add.Tensor", (x, x)),)
    _must_not_fire(builder.graph, pipeline)
    step = pipeline if pipeline.startswith("mixed") else pipeline.replace("}", ",layers=1}") \
        if "{" in pipeline else pipeline + "{layers=1}"
    _must_not_fire(rotary_attention_graph(SHAPE, layer=0), step)


def _must_not_fire(graph, pipeline):
    before = print_graph(graph)
    assert run_pipeline(graph, pipeline)[0].result.rewrites == 0
    graph.notes.clear()  # the pipeline's stamp; the graph itself must be as it was
    assert print_graph(graph) == before


@pytest.mark.parametrize("pipeline", ["streaming{sinks=4,window=8}", "rope-scale{base=500000}", "rope-fp32",
                                      "lm-infinite{sinks=2,window=8}"])
def test_attention_without_lifted_positions_is_refused_by_name(pipeline):
    graph = attention_graph(AttentionShape(1, 1, 2, 31, 31, 8), "causal")  # more keys than any span here
    with pytest.raises(PassError, match="carries no lifted rotary"):
        run_pipeline(graph, pipeline)


def test_keys_a_rolling_cache_bounds_are_left_alone():
    """A decode step over a StreamingCache: at most sinks + window keys, rotated by the cache."""
    graph = attention_graph(AttentionShape(1, 1, 2, 1, 12, 8), "full")
    _must_not_fire(graph, "streaming{sinks=4,window=8}")


def test_a_second_streaming_rewrite_is_refused():
    graph = rotary_attention_graph(SHAPE)
    with pytest.raises(PassError, match="already rewritten"):
        run_pipeline(graph, "streaming{sinks=2,window=4},lm-infinite{sinks=2,window=4}")


@pytest.mark.parametrize("text", ["rope-scale{rule=yarn,factor=4}", "rope-scale{rule=cubic}",
                                  "streaming{sinks=-1,window=4}", "mixed-spans{window=0}",
                                  "mixed-spans{window=4,full=a+b}"])
def test_bad_options_name_what_to_do(text):
    with pytest.raises(PassError, match="what to do"):
        run_pipeline(rotary_attention_graph(SHAPE), text)


shapes = st.builds(lambda b, kv, g, n, d: AttentionShape(b, kv, g, n, n, d), st.integers(1, 2), st.integers(1, 2),
                   st.sampled_from((1, 2)), st.integers(1, 23), st.sampled_from((4, 8)))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, sinks=st.integers(0, 3), window=st.integers(1, 9))
def test_streaming_equals_its_dense_reference(shape, sinks, window):
    graph = rotary_attention_graph(shape)
    got, (q, k, v, _) = _rewritten_output(graph, f"streaming{{sinks={sinks},window={window}}}")
    verify(graph)
    expected = dense_reference(q, k, v, *streaming_pairs(shape.q_len, sinks, window), 10000.0)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, sinks=st.integers(1, 3), window=st.integers(1, 9), limit=st.integers(1, 12))
def test_lm_infinite_equals_its_dense_reference(shape, sinks, window, limit):
    graph = rotary_attention_graph(shape)
    got, (q, k, v, _) = _rewritten_output(graph, f"lm-infinite{{sinks={sinks},window={window},max_distance={limit}}}")
    expected = dense_reference(q, k, v, *lm_infinite_pairs(shape.q_len, sinks, window, limit), 10000.0)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, base=st.sampled_from([50.0, 10000.0, 500000.0]), window=st.integers(1, 9))
def test_rope_scale_and_mixed_spans_equal_their_dense_reference(shape, base, window):
    graph = rotary_attention_graph(shape, layer=1)
    got, (q, k, v, _) = _rewritten_output(graph, f"rope-scale{{base={base}}},mixed-spans{{window={window},full=0}}")
    i, j = _pairs(shape.q_len)
    expected = dense_reference(q, k, v, (j <= i) & (i - j < window), i - j, base)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


@settings(max_examples=15, deadline=None)
@given(shape=shapes, sinks=st.integers(0, 3), window=st.integers(1, 9))
def test_backward_is_rewritten_like_the_forward(shape, sinks, window):
    """Forward and backward graphs are compiled apart: the same rewrite gives the same attributes."""
    forward, backward = rotary_attention_graph(shape), rotary_attention_graph(shape, backward=True)
    for graph in (forward, backward):
        run_pipeline(graph, f"streaming{{sinks={sinks},window={window}}}")
    assert {key: forward.nodes[0].kwargs[key] for key in ("mask", "positions")} == \
        {key: backward.nodes[0].kwargs[key] for key in ("mask", "positions")}
