"""`attention="auto"` picks a strategy with the fewest bytes by the cost model, over a grid of layers.

The reference recomputes every candidate's bytes here from cost.py's formulas (dense ring, the
ring under the layout's mask-aware plan, Ulysses, and hybrid for every U | P on a hybrid mesh)
and the chosen strategy must cost the minimum. A chooser that picks the costlier candidate,
or drops one from the comparison, fails; so does a compiler that runs something else.
"""
import itertools

import pytest

from seqweave.ir.graph import Node
from seqweave.ir.mask import Causal, Full, MaskSpec, Sinks, SlidingWindow
from seqweave.ir.parser import parse_graph
from seqweave.ir.sharding import Layout, padded_length, plan_ring
from seqweave.passes.cost import evaluate_expr, hybrid_bytes, ring_bytes, ulysses_bytes
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.passes.strategy import LayerShape, choose_strategy

MASKS = {"causal": Causal(), "full": Full(), "narrow-window": Causal() & SlidingWindow(3, 0)}
#: (q_heads, kv_heads): Ulysses fits, fits with K/V replicated, or is refused (Hq % P)
HEADS = [(8, 8), (8, 1), (6, 2)]


def _splits(q_heads: int, kv_heads: int, group: int) -> bool:
    return q_heads % group == 0 and (kv_heads % group == 0 or group % kv_heads == 0)


def reference_costs(mask: MaskSpec, shape: LayerShape, layout: Layout, training: bool,
                    hybrid: bool) -> dict[tuple[str, int], int]:
    """(strategy, Ulysses group size) -> bytes from the busiest device, for every applicable candidate."""
    padded = padded_length(shape.seq_len, shape.world, layout)
    ran = mask & Sinks(shape.seq_len) if padded != shape.seq_len else mask  # padding keys hidden
    values = shape.values(padded)

    def cost(forward, backward) -> int:
        return evaluate_expr(forward + (backward if training else 0), **values)

    plan = plan_ring(ran, layout, shape.world, padded)
    costs = {("ring", 1): cost(ring_bytes(), ring_bytes(backward=True)),
             ("halo", 1): cost(ring_bytes(plan), ring_bytes(plan, backward=True))}
    groups = range(2, shape.world + 1) if hybrid else [shape.world] if shape.world > 1 else []
    for group in (g for g in groups if shape.world % g == 0 and _splits(shape.q_heads, shape.kv_heads, g)):
        if group == shape.world:
            costs[("ulysses", group)] = cost(ulysses_bytes(), ulysses_bytes(backward=True))
        else:
            rings = shape.world // group
            sub = plan_ring(ran, layout, rings, padded)
            costs[("hybrid", group)] = cost(hybrid_bytes(group, rings, sub), hybrid_bytes(group, rings, sub,
                                                                                          backward=True))
    return costs


def grid():
    """27 layers: every mask x world x heads, with layout, padding, training and a hybrid mesh varied."""
    for i, (mask_name, world, heads) in enumerate(itertools.product(sorted(MASKS), [2, 4, 8], HEADS)):
        layout = [Layout.CONTIGUOUS, Layout.ZIGZAG][i % 2]
        yield mask_name, world, layout, heads, [64, 61][i // 2 % 2], i % 3 != 0, i % 4 in (1, 2)


def test_the_chosen_strategy_costs_the_fewest_bytes():
    checked = 0
    for mask_name, world, layout, (q_heads, kv_heads), seq_len, training, hybrid in grid():
        shape = LayerShape(1, seq_len, q_heads, kv_heads, 16, world)
        choice = choose_strategy(MASKS[mask_name], shape, layout, training=training, hybrid=hybrid)
        costs = reference_costs(MASKS[mask_name], shape, layout, training, hybrid)
        key = (choice.strategy.value, choice.ulysses_size)
        where = (f"{mask_name}, P={world}, {layout.value}, heads {q_heads}/{kv_heads}, N={seq_len}, "
                 f"training={training}, hybrid={hybrid}")
        assert key in costs, f"{where}: chose {key}, not a candidate of {sorted(costs)}"
        assert costs[key] == min(costs.values()), f"{where}: chose {key} at {costs[key]:,} bytes; {costs}"
        checked += len(set(costs.values())) > 1
    assert checked >= 20, checked  # most of the grid has candidates of different costs


MODEL = ("graph inference(%q: f32[1, {h}, {n}, 16], %k: f32[1, {kv}, {n}, 16]) {{\n"
         '  %out, %lse = attn.sdpa(%q, %k, %k, [], mask="{mask}", score_mod="none", scale=0.25, kv_heads={kv})'
         " : f32[1, {h}, {n}, 16], f32[1, {h}, {n}]\n"
         "  return (%out,)\n}}\n")


@pytest.mark.parametrize("mask_name, world, layout, heads", [
    ("causal", 4, Layout.ZIGZAG, (8, 8)), ("narrow-window", 4, Layout.CONTIGUOUS, (8, 8)),
    ("full", 8, Layout.CONTIGUOUS, (8, 1)), ("causal", 2, Layout.ZIGZAG, (6, 2))])
def test_the_compiler_runs_what_the_cost_model_favours(mask_name, world, layout, heads):
    q_heads, kv_heads = heads
    graph = parse_graph(MODEL.format(h=q_heads, kv=kv_heads, n=64, mask=MASKS[mask_name]))
    ShardSequence(world=world, layout=layout.value, length=64, attention="auto").run(graph)
    (attention,) = [node.op for node in graph.nodes if isinstance(node, Node) and node.op.startswith("attn.")]
    costs = reference_costs(MASKS[mask_name], LayerShape(1, 64, q_heads, kv_heads, 16, world, 4), layout,
                            True, False)
    cheapest = min(costs.values())
    runs = {"ring": "attn.ring", "halo": "attn.ring", "ulysses": "attn.ulysses"}
    assert attention in {runs[name] for (name, _), c in costs.items() if c == cheapest}, (attention, costs)
