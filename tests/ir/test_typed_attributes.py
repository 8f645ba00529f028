"""Typed IR attributes: a MaskSpec, a ScoreMod and a PositionSpec held in node kwargs print as
text (`mask("...")`), parse back to equal typed values, and run like their text forms."""
from __future__ import annotations

import pytest
import torch

from seqweave.ir.mask import Causal, Document, Sinks, SlidingWindow
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.parser import ParseError, parse_graph
from seqweave.ir.positions import NoPositions, Rope, parse_positions
from seqweave.ir.printer import print_graph
from seqweave.ir.score_mod import NoScoreMod, Softcap
from seqweave.ir.interpreter import interpret
from seqweave.ir.verifier import verify

B, H, S, D = 1, 2, 6, 4
GRAPH = f"""\
graph attn(%q: f64[{B}, {H}, {S}, {D}], %k: f64[{B}, {H}, {S}, {D}], %v: f64[{B}, {H}, {S}, {D}], \
%seg: i64[{B}, {S}]) {{
  %out, %lse = attn.sdpa(%q, %k, %v, [%seg], ATTRS) : f64[{B}, {H}, {S}, {D}], f64[{B}, {H}, {S}]
  return (%out,)
}}
"""
MASK = Causal() & (Sinks(1) | SlidingWindow(2, 0)) & Document(0)


def _graph(mask, score_mod, positions=None) -> str:
    attrs = f"mask={mask}, score_mod={score_mod}, scale=0.5, kv_heads={H}"
    return GRAPH.replace("ATTRS", attrs + (f", positions={positions}" if positions else ""))


def test_typed_values_print_as_text_and_parse_back_equal():
    text = _graph('mask("causal & (sinks(1) | sliding_window(2, 0)) & document($0)")', 'score_mod("softcap(30.0)")')
    graph = parse_graph(text)
    attrs = graph.nodes[0].kwargs
    assert attrs["mask"] == MASK and attrs["score_mod"] == Softcap(30.0)
    verify(graph)
    assert print_graph(graph) == text
    assert print_graph(parse_graph(print_graph(graph))) == text


def test_positions_round_trip_typed():
    rope = Rope(dims=4, positions=1, rule="default", base=10000.0)
    text = _graph('mask("causal")', 'score_mod("none")', f'positions("{rope}")')
    attrs = parse_graph(text).nodes[0].kwargs
    assert attrs["positions"] == rope and isinstance(attrs["positions"], Rope)
    assert 'positions("rope(dims=4, positions=$1' in print_graph(parse_graph(text))


def test_a_typed_attention_computes_what_plain_torch_does():
    graph = parse_graph(_graph('mask("causal & sliding_window(2, 0)")', 'score_mod("none")'))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, generator=generator) for _ in range(3))
    (out,) = interpret(graph, [q, k, v, torch.zeros(B, S, dtype=torch.int64)])
    rows, cols = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (cols <= rows) & (cols >= rows - 2)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-10, atol=1e-10)


def test_the_same_program_with_text_attributes_still_runs_and_prints_as_before():
    text = _graph('"causal & sliding_window(2, 0)"', '"none"')
    graph = parse_graph(text)
    assert graph.nodes[0].kwargs["mask"] == "causal & sliding_window(2, 0)"  # text stays text
    assert print_graph(graph) == text


def test_parsers_return_a_typed_value_as_it_is():
    rope = Rope(dims=4, positions=1, rule="default", base=100.0)
    assert parse_mask(MASK) is MASK and parse_score_mod(NoScoreMod()) == NoScoreMod()
    assert parse_positions(rope) is rope and parse_positions(NoPositions()) == NoPositions()
    assert parse_mask(str(MASK)) == MASK  # and the text form still parses


def test_typed_values_hash_as_values():
    """Plans and kernels are cached per mask: two equal specs must be one key."""
    cache = {parse_mask("causal & sinks(4)"): "plan"}
    assert cache[Causal() & Sinks(4)] == "plan"
    rope = Rope(dims=4, positions=1, rule="default", base=100.0)
    assert hash(rope) == hash(parse_positions("rope(dims=4, positions=$1, rule=default, base=100.0)"))


@pytest.mark.parametrize("bad", ['mask("causal &")', 'mask(causal)', 'score_mod("softcap(x)")'])
def test_a_bad_typed_literal_is_a_parse_error_naming_the_line(bad):
    with pytest.raises(ParseError, match="line 2"):
        parse_graph(_graph(bad, 'score_mod("none")') if bad.startswith("mask") else _graph('mask("causal")', bad))
