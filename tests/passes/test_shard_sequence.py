"""`shard-sequence`: golden text, refusals, a property over lengths / worlds / layouts, and the
shard <-> gather round trip. The end-to-end numeric test on real ranks is
tests/e2e/test_sequence_parallel_inference.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.errors import PassError
from seqweave.ir.graph import Node, Value
from seqweave.ir.ops.sp import take_positions
from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.sharding import Layout, padded_length, shard_positions
from seqweave.ir.types import TensorType
from seqweave.ir.verifier import verify
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.runtime.distributed_ops import gather
from seqweave.testing.strategies import AttentionShape, attention_graph

MODEL = '''graph inference(%ids: i64[2, {n}], %w: f32[16, 4], %cos: f32[1, {n}, 4], %wq: f32[4, 4]) {{
  %emb = core.embedding(%w, %ids) : f32[2, {n}, 4]
  %flat = core.view(%emb, [{n2}, 4]) : f32[{n2}, 4]
  %t = core.t(%wq) : f32[4, 4]
  %mm = core.mm(%flat, %t) : f32[{n2}, 4]
  %x = core.view(%mm, [2, {n}, 1, 4]) : f32[2, {n}, 1, 4]
  %q = core.transpose.int(%x, 1, 2) : f32[2, 1, {n}, 4]
  %c = core.unsqueeze(%cos, 1) : f32[1, 1, {n}, 4]
  %qr = core.mul.Tensor(%q, %c) : f32[2, 1, {n}, 4]
  %out, %lse = attn.sdpa(%qr, %qr, %qr, [], mask="causal", score_mod="none", scale=0.5, kv_heads=1) : f32[2, 1, {n}, 4], f32[2, 1, {n}]
  return (%out,)
}}
'''

GOLDEN = '''graph inference(%ids: i64[2, 8]{sp: R}, %w: f32[16, 4]{sp: R}, %cos: f32[1, 8, 4]{sp: R}, %wq: f32[4, 4]{sp: R}, %sp_positions: i64[4]{sp: R}) {
  %shard = sp.shard(%ids, %sp_positions, dim=1, inner=1, length=8) : i64[2, 4]{sp: S(1)}
  %emb = core.embedding(%w, %shard) : f32[2, 4, 4]{sp: S(1)}
  %flat = core.view(%emb, [8, 4]) : f32[8, 4]{sp: S(0)}
  %t = core.t(%wq) : f32[4, 4]{sp: R}
  %mm = core.mm(%flat, %t) : f32[8, 4]{sp: S(0)}
  %x = core.view(%mm, [2, 4, 1, 4]) : f32[2, 4, 1, 4]{sp: S(1)}
  %q = core.transpose.int(%x, 1, 2) : f32[2, 1, 4, 4]{sp: S(2)}
  %shard_1 = sp.shard(%cos, %sp_positions, dim=1, inner=1, length=8) : f32[1, 4, 4]{sp: S(1)}
  %c = core.unsqueeze(%shard_1, 1) : f32[1, 1, 4, 4]{sp: S(2)}
  %qr = core.mul.Tensor(%q, %c) : f32[2, 1, 4, 4]{sp: S(2)}
  %out, %lse = attn.ring(%qr, %qr, %qr, [], mask="causal", score_mod="none", scale=0.5, kv_heads=1, layout="none", world=2, length=8) : f32[2, 1, 4, 4]{sp: S(2)}, f32[2, 1, 4]{sp: S(2)}
  %gather = sp.gather(%out, dim=2, inner=1, length=8, world=2, layout="none") : f32[2, 1, 8, 4]{sp: R}
  return (%gather,)
}
'''


def _model(n: int):
    return parse_graph(MODEL.format(n=n, n2=2 * n))


def test_golden():
    graph = _model(8)
    result = ShardSequence(world=2, layout="none", length=8).run(graph)
    assert print_graph(graph) == GOLDEN
    assert result.rewrites == 2 and "1 attn.ring" in result.detail


def test_refuses_what_has_no_rule_when_gathering_is_off():
    graph = parse_graph('''graph inference(%ids: i64[1, 8], %w: f32[16, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 8, 4]
  %run = core.cumsum(%emb, 1) : f32[1, 8, 4]
  return (%run,)
}
''')
    with pytest.raises(PassError, match="no sequence-sharding rule") as caught:
        ShardSequence(world=2, layout="none", length=8, gather_unshardable=False).run(graph)
    assert "core.cumsum" in str(caught.value)


def test_a_mean_over_the_sequence_is_the_global_mean_without_padding_rows():
    """9 tokens on 2 ranks: padded to 10, the padding row zeroed, the sum divided by 9 (not by
    this rank's 5 rows), all-reduced once."""
    graph = parse_graph('''graph inference(%ids: i64[1, 9], %w: f32[16, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 9, 4]
  %avg = core.mean.dim(%emb, [1]) : f32[1, 4]
  return (%avg,)
}
''')
    ShardSequence(world=2, layout="none", length=9).run(graph)
    verify(graph)
    ops = [node.op for node in graph.nodes]
    assert ops[-4:] == ["core.masked_fill.Scalar", "core.sum.dim_IntList", "core.div.Scalar", "sp.all_reduce"]
    assert graph.nodes[-2].args[1] == 9


def test_a_sum_over_the_sequence_is_partial_then_all_reduced():
    graph = parse_graph('''graph inference(%ids: i64[1, 8], %w: f32[16, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 8, 4]
  %total = core.sum.dim_IntList(%emb, [1]) : f32[1, 4]
  %scaled = core.mul.Scalar(%total, 2.0) : f32[1, 4]
  return (%scaled,)
}
''')
    ShardSequence(world=2, layout="none", length=8).run(graph)
    verify(graph)
    assert [node.op for node in graph.nodes][-2:] == ["core.mul.Scalar", "sp.all_reduce"]
    assert str(graph.nodes[-2].results[0].type) == "f32[1, 4]{sp: P(sum)}"


def test_a_length_that_does_not_split_is_padded_and_masked():
    graph = _model(9)
    ShardSequence(world=3, layout="zigzag", length=9).run(graph)
    verify(graph)
    ring = next(node for node in graph.nodes if node.op == "attn.ring")
    assert ring.kwargs["mask"] == "causal & sinks(9)" and ring.kwargs["length"] == 12  # padding keys masked
    assert int(ring.args[0].type.shape[2]) == 4  # 12 padded positions over 3 ranks
    assert graph.output_values()[0].type.shape[2] == 9  # padding rows dropped on the way out


def test_leaves_a_graph_without_sequence_alone():
    """No token ids and no attention: nothing is sharded, every value stays whole."""
    graph = parse_graph('''graph inference(%x: f32[3, 4]) {
  %y = core.relu(%x) : f32[3, 4]
  return (%y,)
}
''')
    assert ShardSequence(world=2, layout="zigzag", length=8).run(graph).rewrites == 0
    assert [node.op for node in graph.nodes] == ["core.relu"]


@settings(max_examples=25, deadline=None)
@given(world=st.sampled_from([1, 2, 3, 4]), layout=st.sampled_from(list(Layout)), n=st.integers(2, 24))
def test_sharded_graph_verifies_with_local_shapes(world, layout, n):
    graph = _model(n)
    ShardSequence(world=world, layout=layout.value, length=n).run(graph)
    verify(graph)
    ring = next(node for node in graph.nodes if node.op == "attn.ring")
    assert int(ring.args[0].type.shape[2]) == padded_length(n, world, layout) // world
    assert graph.output_values()[0].type.shape[2] == n


class _AllRanks:
    """Stands in for a Communicator in one process: all_to_all / all_gather return every rank's piece."""

    def __init__(self, pieces):
        self.world, self.pieces = len(pieces), pieces

    def all_to_all(self, chunks, step, op, kind="all_to_all"):
        return self.pieces

    def all_gather(self, tensor, step, op, kind="gather"):
        return torch.stack(self.pieces)


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("dim, inner", [(1, 1), (0, 3)])
def test_gather_undoes_shard(layout, dim, inner):
    world, length = 4, 16
    x = torch.randn(2 if dim == 1 else 2 * length * inner, length if dim == 1 else 5)
    pieces = [take_positions(x, shard_positions(layout, r, world, length), dim, length, inner) for r in range(world)]
    node = Node("sp.gather", (), {}, [Value("y", TensorType.from_tensor(x))])
    kwargs = {"dim": dim, "inner": inner, "length": length, "world": world, "layout": layout.value}
    torch.testing.assert_close(gather(_AllRanks(pieces), 0, node, pieces[0], **kwargs), x, rtol=0, atol=0)


@pytest.mark.parametrize("attention, world, expected", [
    ("ulysses", 2, "attn.ulysses"),  # 2 heads split over 2 ranks
    ("ring", 2, "attn.ring"),
])
def test_attention_strategy_is_chosen_per_option(attention, world, expected):
    text = MODEL.format(n=8, n2=16).replace("[2, {n}, 1, 4]".format(n=8), "[2, 8, 2, 2]").replace(
        "f32[2, 8, 1, 4]", "f32[2, 8, 2, 2]").replace("f32[2, 1, 8, 4]", "f32[2, 2, 8, 2]").replace(
        "kv_heads=1", "kv_heads=2").replace("f32[2, 1, 8]", "f32[2, 2, 8]").replace(
        "%cos: f32[1, 8, 4]", "%cos: f32[1, 8, 2]").replace("f32[1, 1, 8, 4]", "f32[1, 1, 8, 2]")
    graph = parse_graph(text)
    ShardSequence(world=world, layout="zigzag", length=8, attention=attention).run(graph)
    verify(graph)
    assert graph.count(expected) == 1


def test_ulysses_refuses_heads_that_do_not_split():
    with pytest.raises(PassError, match="not divisible by P=2"):
        ShardSequence(world=2, layout="zigzag", length=8, attention="ulysses").run(_model(8))


KEPT_WHOLE = '''graph inference(%ids: i64[1, 8], %w: f32[16, 4], %cache: f32[1, 8, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 8, 4]
  %p = core.permute(%emb, [1, 0, 2]) : f32[8, 1, 4]
  %s = core.select.int(%p, 1, 0) : f32[8, 4]
  %c = core.cumsum(%s, 0) : f32[8, 4]
  %idx = core.arange(8, dtype=torch.int64) : i64[8]
  %new = core.index_copy(%cache, 1, %idx, %emb) : f32[1, 8, 4]
  %again = core.index_copy(%cache, 1, %idx, %emb) : f32[1, 8, 4]
  return (%c, %new, %again)
}
'''

KEPT_WHOLE_GOLDEN = '''graph inference(%ids: i64[1, 8]{sp: R}, %w: f32[16, 4]{sp: R}, %cache: f32[1, 8, 4]{sp: R}, %sp_positions: i64[4]{sp: R}) {
  %shard = sp.shard(%ids, %sp_positions, dim=1, inner=1, length=8) : i64[1, 4]{sp: S(1)}
  %emb = core.embedding(%w, %shard) : f32[1, 4, 4]{sp: S(1)}
  %p = core.permute(%emb, [1, 0, 2]) : f32[4, 1, 4]{sp: S(0)}
  %s = core.select.int(%p, 1, 0) : f32[4, 4]{sp: S(0)}
  %gather = sp.gather(%s, dim=0, inner=1, length=8, world=2, layout="none") : f32[8, 4]{sp: R}
  %c = core.cumsum(%gather, 0) : f32[8, 4]{sp: R}
  %idx = core.arange(8, dtype=torch.int64) : i64[8]{sp: R}
  %gather_1 = sp.gather(%emb, dim=1, inner=1, length=8, world=2, layout="none") : f32[1, 8, 4]{sp: R}
  %new = core.index_copy(%cache, 1, %idx, %gather_1) : f32[1, 8, 4]{sp: R}
  %again = core.index_copy(%cache, 1, %idx, %gather_1) : f32[1, 8, 4]{sp: R}
  return (%c, %new, %again)
}
'''


def test_ops_without_a_rule_run_on_whole_operands_gathered_once():
    """A buffer written at sequence positions (index_copy) and a scan over the sequence are kept
    whole: exact, gathered once per value, and named in the pass result."""
    graph = parse_graph(KEPT_WHOLE)
    result = ShardSequence(world=2, layout="none", length=8).run(graph)
    verify(graph)
    assert print_graph(graph) == KEPT_WHOLE_GOLDEN
    assert "3 ops ran on gathered whole operands: core.cumsum" in result.detail
    assert "core.index_copy (no sequence-sharding rule for core.index_copy)" in result.detail


def test_refuses_instead_of_gathering_when_asked():
    graph = parse_graph(KEPT_WHOLE)
    with pytest.raises(PassError, match="no sequence-sharding rule for core.cumsum"):
        ShardSequence(world=2, layout="none", length=8, gather_unshardable=False).run(graph)


def test_ops_kept_whole_are_logged_as_warnings(caplog):
    from seqweave.passes.manager import run_pipeline

    graph = parse_graph(KEPT_WHOLE)
    with caplog.at_level("WARNING", logger="seqweave"):
        (run,) = run_pipeline(graph, [ShardSequence(world=2, layout="none", length=8)])
    assert len(run.result.warnings) == 3
    assert "shard-sequence: core.index_copy (no sequence-sharding rule for core.index_copy): ran on operands " \
           "gathered whole on every rank" in caplog.text


def test_a_saved_partial_sum_leaves_the_forward_all_reduced():
    """A training forward's saved activation that is a partial sum (a mean-pooled vector the
    backward reads) must leave the graph whole: the backward treats saved values without a
    sequence dim as whole on every rank."""
    graph = parse_graph('''graph forward(%ids: i64[1, 8], %w: f32[16, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 8, 4]
  %avg = core.mean.dim(%emb, [1]) : f32[1, 4]
  %out = core.mul.Scalar(%avg, 2.0) : f32[1, 4]
  return (%out, %avg)
}
''')
    ShardSequence(world=2, layout="none", length=8, keep_sharded_from=1).run(graph)
    verify(graph)
    saved = graph.outputs[1]
    assert saved.producer.op == "sp.all_reduce" and str(saved.type) == "f32[1, 4]{sp: R}"


def test_a_whole_operand_contracted_with_a_sharded_one_is_sliced_and_the_product_is_partial():
    """mm(whole g [4, N], sharded x [N, 4]): g is sliced to this rank's columns (free), the
    product is a partial sum with the padding row zeroed, all-reduced once on the way out."""
    graph = parse_graph('''graph inference(%ids: i64[9], %w: f32[16, 4], %g: f32[4, 9]) {
  %emb = core.embedding(%w, %ids) : f32[9, 4]
  %prod = core.mm(%g, %emb) : f32[4, 4]
  return (%prod,)
}
''')
    ShardSequence(world=2, layout="none", length=9).run(graph)
    verify(graph)
    mm = next(node for node in graph.nodes if node.op == "core.mm")
    assert mm.args[0].producer.op == "core.masked_fill.Scalar"  # padding columns of g zeroed
    assert mm.args[0].producer.args[0].producer.op == "sp.shard"
    assert str(mm.results[0].type) == "f32[4, 4]{sp: P(sum)}"
    assert graph.outputs[0].producer.op == "sp.all_reduce"


def test_refuses_a_graph_it_already_sharded():
    graph = _model(8)
    ShardSequence(world=2, layout="none", length=8).run(graph)
    with pytest.raises(PassError, match="already sharded"):
        ShardSequence(world=2, layout="none", length=8).run(graph)


def test_refuses_cross_attention_by_name_instead_of_emitting_ir_that_does_not_verify():
    graph = attention_graph(AttentionShape(batch=1, kv_heads=1, group=2, q_len=6, kv_len=10, head_dim=4), "full")
    with pytest.raises(PassError, match="6 queries to 10 keys"):
        ShardSequence(world=2, layout="none", length=6).run(graph)
