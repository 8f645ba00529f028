"""Sequence sharding and the ring plan: layouts partition the sequence, pair classes never
contradict the dense mask, and the ring plan delivers every K/V shard that is needed, to the
step that computes with it, and forwards nothing further."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.ir.mask import And, BlockClass, MaskSpec, Or, dense_mask
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.sharding import (
    MAX_RUNS, Layout, RingPlan, chunks_per_rank, contiguous_runs, pair_class, padded_length, plan_ring,
    shard_positions)
from seqweave.testing.strategies import structured_masks

MAX_LEN = 100  # keeps striped shards (one run per position) under MAX_RUNS x MAX_RUNS block classes
EXAMPLES = settings(max_examples=40, deadline=None)

#: hypothesis favours the first choice of sampled_from / one_of: start where sharding is interesting
WORLD_ORDER = (4, 3, 8, 2, 5, 7, 6, 1)
SHORT = 16

layouts = st.sampled_from(list(Layout))
worlds = st.sampled_from(WORLD_ORDER)
lengths = st.one_of(st.integers(SHORT + 1, MAX_LEN), st.integers(0, SHORT))
window, sinks, chunk = st.integers(0, 40), st.integers(1, 8), st.integers(1, 24)
masks = st.one_of(
    structured_masks(),
    st.tuples(sinks, window, window).map(lambda t: f"sinks({t[0]}) | sliding_window({t[1]}, {t[2]})"),
    st.tuples(chunk, sinks).map(lambda t: f"chunked({t[0]}) | sinks({t[1]})"),
    st.tuples(window, chunk).map(lambda t: f"sliding_window({t[0]}, 0) & chunked({t[1]})"),
    st.tuples(window, window).map(lambda t: f"sliding_window({t[0]}, {t[1]})"),
    sinks.map(lambda n: f"sinks({n})"),
).map(parse_mask)


def all_positions(layout: Layout, world: int, seq_len: int) -> list[torch.Tensor]:
    return [shard_positions(layout, rank, world, seq_len) for rank in range(world)]


def dense_class(mask: MaskSpec, q: torch.Tensor, kv: torch.Tensor) -> BlockClass:
    """The true class of a shard pair, from the dense mask."""
    allowed = mask.evaluate(q, kv)
    if allowed.numel() == 0 or not bool(allowed.any()):
        return BlockClass.EMPTY
    return BlockClass.FULL if bool(allowed.all()) else BlockClass.PARTIAL


# ------------------------------------------------------------------ layouts


@EXAMPLES
@given(layouts, worlds, lengths)
def test_positions_partition_the_sequence(layout: Layout, world: int, length: int) -> None:
    seq_len = padded_length(length, world, layout)
    shards = all_positions(layout, world, seq_len)
    assert all(s.dtype == torch.int64 and s.numel() == seq_len // world for s in shards)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(seq_len))
    for shard in shards:
        runs = contiguous_runs(shard)
        assert torch.equal(torch.cat([torch.arange(a, b) for a, b in runs] or [shard]), shard)


@EXAMPLES
@given(layouts, worlds, lengths)
def test_padded_length_is_the_smallest_valid_multiple(layout: Layout, world: int, length: int) -> None:
    seq_len = padded_length(length, world, layout)
    multiple = world * chunks_per_rank(layout)
    assert seq_len >= length and seq_len % multiple == 0 and seq_len - length < multiple
    shard_positions(layout, world - 1, world, seq_len)  # accepted
    for shorter in range(length, seq_len):  # every length in between is refused
        with pytest.raises(ValueError):
            shard_positions(layout, 0, world, shorter)


@EXAMPLES
@given(worlds, st.integers(1, 12))
def test_zigzag_balances_causal_work(world: int, chunk_len: int) -> None:
    seq_len = 2 * world * chunk_len
    keys = torch.arange(seq_len)
    work = [int(parse_mask("causal").evaluate(q, keys).sum()) for q in all_positions(Layout.ZIGZAG, world, seq_len)]
    assert work == [work[0]] * world
    assert sum(work) == seq_len * (seq_len + 1) // 2


def test_contiguous_causal_work_is_unbalanced() -> None:
    """The control for the zigzag test: without zigzag, later ranks do more causal work."""
    shards = all_positions(Layout.CONTIGUOUS, 4, 32)
    work = [int(parse_mask("causal").evaluate(q, torch.arange(32)).sum()) for q in shards]
    assert work == sorted(work) and work[0] < work[-1]


@pytest.mark.parametrize("layout", list(Layout))
def test_unpadded_length_error_names_the_fix(layout: Layout) -> None:
    bad = 2 * 3 * chunks_per_rank(layout) + 1
    expected = padded_length(bad, 3, layout)
    with pytest.raises(ValueError, match=rf"length {bad} does not split evenly under {layout.value} over 3 ranks; "
                                         rf"pad it to padded_length\(\.\.\.\) = {expected}"):
        shard_positions(layout, 0, 3, bad)
    with pytest.raises(ValueError, match="does not split evenly"):
        plan_ring(parse_mask("causal"), layout, 3, bad)


# --------------------------------------------------------------- pair classes


@EXAMPLES
@given(masks, layouts, worlds, lengths)
def test_pair_class_never_contradicts_dense_mask(mask: MaskSpec, layout: Layout, world: int, length: int) -> None:
    shards = all_positions(layout, world, padded_length(length, world, layout))
    primitive = not isinstance(mask, (And, Or))  # block_class is exact for single structured masks
    for q in shards:
        for kv in shards:
            verdict, truth = pair_class(mask, q, kv), dense_class(mask, q, kv)
            if verdict is not BlockClass.PARTIAL:
                assert verdict is truth, (str(mask), q.tolist(), kv.tolist())
            if primitive:  # interval classification is exact run by run
                assert verdict is truth, (str(mask), q.tolist(), kv.tolist())


@EXAMPLES
@given(masks, worlds, st.integers(0, 40))
def test_pair_class_span_fallback_is_sound(mask: MaskSpec, world: int, extra: int) -> None:
    """Striped shards with more than MAX_RUNS runs are classified by their spans."""
    seq_len = world * (MAX_RUNS + 1) + world * extra
    shards = all_positions(Layout.STRIPED, world, seq_len)
    assert world == 1 or len(contiguous_runs(shards[0])) > MAX_RUNS
    for q in shards:
        for kv in shards:
            verdict = pair_class(mask, q, kv)
            assert verdict is BlockClass.PARTIAL or verdict is dense_class(mask, q, kv), str(mask)


# ------------------------------------------------------------------- ring plan


def simulate_ring(plan: RingPlan) -> list[list[int | None]]:
    """held[t][r]: whose K/V rank r holds at step t, hop by hop through `plan.sends` (None: nothing)."""
    world = plan.world
    held: list[list[int | None]] = [list(range(world))]
    for step, row in enumerate(plan.sends):
        assert len(row) == world
        for rank, sends in enumerate(row):
            assert not sends or held[step][rank] is not None, f"rank {rank} sends at step {step} what it lacks"
        held.append([held[step][(r - 1) % world] if row[(r - 1) % world] else None for r in range(world)])
    return held


@EXAMPLES
@given(masks, layouts, worlds, lengths)
def test_ring_plan_delivers_exactly_what_is_needed(mask: MaskSpec, layout: Layout, world: int, length: int) -> None:
    seq_len = padded_length(length, world, layout)
    shards = all_positions(layout, world, seq_len)
    plan = plan_ring(mask, layout, world, seq_len)
    assert len(plan.sends) == max(world - 1, 0)
    held = simulate_ring(plan)
    for rank in range(world):
        for source in range(world):
            step = (rank - source) % world
            assert plan.source(rank, step) == source
            if bool(mask.evaluate(shards[rank], shards[source]).any()):
                assert plan.computes(rank, step), (str(mask), rank, source)
                assert held[step][rank] == source, (str(mask), rank, source, step)
    assert plan.steps_with_compute() == sum(c is not BlockClass.EMPTY for row in plan.classes for c in row)


@EXAMPLES
@given(masks, layouts, worlds, lengths)
def test_ring_plan_sends_nothing_past_the_last_rank_that_needs_it(mask: MaskSpec, layout: Layout, world: int,
                                                                  length: int) -> None:
    plan = plan_ring(mask, layout, world, padded_length(length, world, layout))
    for step, row in enumerate(plan.sends):
        for rank, sends in enumerate(row):
            later = [plan.computes((rank + hop) % world, step + hop) for hop in range(1, world - step)]
            assert sends == any(later), (str(mask), step, rank)


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("world", [1, 2, 5])
def test_full_mask_plan_is_the_dense_ring(layout: Layout, world: int) -> None:
    plan = plan_ring(parse_mask("full"), layout, world, padded_length(40, world, layout))
    assert plan.sends_total() == world * (world - 1)
    assert plan.steps_with_compute() == world * world


def test_causal_window_under_contiguous_layout_is_a_halo() -> None:
    plan = plan_ring(parse_mask("causal & sliding_window(3, 0)"), Layout.CONTIGUOUS, 4, 32)
    assert plan.sends == ((True, True, True, False), (False,) * 4, (False,) * 4)
    assert dense_mask(parse_mask("causal & sliding_window(3, 0)"), 8, 8, q_offset=8, kv_offset=0).any()
