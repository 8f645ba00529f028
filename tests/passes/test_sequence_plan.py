"""`plan_sequence`: the sequence dim of each value feeding an attention, found backwards from
the attention (golden, must-not-fire, a property over layouts with colliding sizes), and how
`shard-sequence` uses it to shard a float input at its first use."""
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.ir.parser import parse_graph
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.sequence_plan import plan_sequence
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.passes.sharding_context import Seq

FLOAT_INPUT = '''graph inference(%x: f32[2, 8, 4], %w: f32[4, 4]) {
  %flat = core.view(%x, [16, 4]) : f32[16, 4]
  %t = core.t(%w) : f32[4, 4]
  %mm = core.mm(%flat, %t) : f32[16, 4]
  %h = core.view(%mm, [2, 8, 1, 4]) : f32[2, 8, 1, 4]
  %q = core.transpose.int(%h, 1, 2) : f32[2, 1, 8, 4]
  %out, %lse = attn.sdpa(%q, %q, %q, [], mask="full", score_mod="none", scale=0.5, kv_heads=1) : f32[2, 1, 8, 4], f32[2, 1, 8]
  return (%out,)
}
'''

GOLDEN = '''graph inference(%x: f32[2, 8, 4]{sp: R}, %w: f32[4, 4]{sp: R}, %sp_positions: i64[4]{sp: R}) {
  %shard = sp.shard(%x, %sp_positions, dim=1, inner=1, length=8) : f32[2, 4, 4]{sp: S(1)}
  %flat = core.view(%shard, [8, 4]) : f32[8, 4]{sp: S(0)}
  %t = core.t(%w) : f32[4, 4]{sp: R}
  %mm = core.mm(%flat, %t) : f32[8, 4]{sp: S(0)}
  %h = core.view(%mm, [2, 4, 1, 4]) : f32[2, 4, 1, 4]{sp: S(1)}
  %q = core.transpose.int(%h, 1, 2) : f32[2, 1, 4, 4]{sp: S(2)}
  %out, %lse = attn.ring(%q, %q, %q, [], mask="full", score_mod="none", scale=0.5, kv_heads=1, layout="none", world=2, length=8) : f32[2, 1, 4, 4]{sp: S(2)}, f32[2, 1, 4]{sp: S(2)}
  %gather = sp.gather(%out, dim=2, inner=1, length=8, world=2, layout="none") : f32[2, 1, 8, 4]{sp: R}
  return (%gather,)
}
'''


def _plan_of(text: str, length: int) -> dict[str, Seq]:
    graph = parse_graph(text)
    return {value.name: seq for value, seq in plan_sequence(graph, length).items()}


def test_golden_a_float_input_is_sharded_before_its_projection():
    graph = parse_graph(FLOAT_INPUT)
    assert _plan_of(FLOAT_INPUT, 8)["x"] == Seq(1)
    ShardSequence(world=2, layout="none", length=8).run(graph)
    verify(graph)
    assert print_graph(graph) == GOLDEN


def test_does_not_fire_off_the_paths_into_attention():
    """A position table with N rows, a mask and a graph without attention get no sequence dim:
    sizes alone do not decide it."""
    text = '''graph inference(%pos: i64[1, 8], %table: f32[8, 4], %mask: i1[1, 1, 8, 8]) {
  %p = core.embedding(%table, %pos) : f32[1, 8, 4]
  %h = core.view(%p, [1, 8, 1, 4]) : f32[1, 8, 1, 4]
  %q = core.transpose.int(%h, 1, 2) : f32[1, 1, 8, 4]
  %out, %lse = attn.sdpa(%q, %q, %q, [%mask], mask="dense($0)", score_mod="none", scale=0.5, kv_heads=1) : f32[1, 1, 8, 4], f32[1, 1, 8]
  return (%out,)
}
'''
    plan = _plan_of(text, 8)
    assert plan["pos"] == Seq(1) and "table" not in plan and "mask" not in plan
    assert _plan_of('''graph inference(%x: f32[2, 8, 4]) {
  %y = core.relu(%x) : f32[2, 8, 4]
  return (%y,)
}
''', 8) == {}


@settings(max_examples=40, deadline=None)
@given(order=st.permutations([0, 1, 2, 3]), collide=st.sampled_from(["none", "batch", "heads", "head_dim"]))
def test_finds_the_sequence_dim_of_any_layout_even_when_sizes_collide(order, collide):
    """x holds [B, H, N, D] in any dim order and is permuted back for the attention; another dim
    may have the same size as N. The plan names the dim the attention's sequence came from."""
    n = 6
    sizes = {"batch": 2, "heads": 3, "head_dim": 4}
    if collide != "none":
        sizes[collide] = n
    canonical = [sizes["batch"], sizes["heads"], n, sizes["head_dim"]]
    stored = [canonical[d] for d in order]  # x's dim i holds canonical dim order[i]
    back = [order.index(d) for d in range(4)]
    dims = ", ".join(map(str, canonical))
    text = f'''graph inference(%x: f32[{", ".join(map(str, stored))}]) {{
  %q = core.permute(%x, {back}) : f32[{dims}]
  %out, %lse = attn.sdpa(%q, %q, %q, [], mask="full", score_mod="none", scale=0.5, kv_heads={canonical[1]}) : f32[{dims}], f32[{dims.rsplit(", ", 1)[0]}]
  return (%out,)
}}
'''
    assert _plan_of(text, n)["x"] == Seq(order.index(2))
