"""Tile schedules: the whole-grid rules agree with `block_class` tile by tile, and the lists the
kernels walk hold exactly the FULL and PARTIAL tiles of each block."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqweave.codegen.triton.schedule import (EMPTY, FULL, PARTIAL, build_schedule, tile_classes,
                                              tile_classes_per_tile)
from seqweave.ir.mask_parser import parse_mask
from seqweave.testing.strategies import structured_masks

shapes = st.tuples(st.integers(1, 90), st.integers(1, 90), st.sampled_from([8, 16, 32]), st.sampled_from([8, 16]),
                   st.integers(0, 50), st.integers(0, 50))


def ragged_free(classes: torch.Tensor, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """The per-tile classes with the kernel's rule applied: ragged FULL tiles are PARTIAL."""
    classes = classes.clone()
    if q_len % block_m:
        classes[-1][classes[-1] == FULL] = PARTIAL
    if kv_len % block_n:
        classes[:, -1][classes[:, -1] == FULL] = PARTIAL
    return classes


@given(st.one_of(structured_masks(), st.just("sinks(2) | sliding_window(3, 4)")), shapes)
def test_structured_grid_rules_equal_block_class(text, shape):
    mask = parse_mask(text)
    q_len, kv_len, block_m, block_n, q_off, kv_off = shape
    slow = tile_classes_per_tile(mask, q_len, kv_len, block_m, block_n, q_off, kv_off)
    fast = tile_classes(mask, q_len, kv_len, block_m, block_n, q_off, kv_off)
    assert torch.equal(fast, ragged_free(slow, q_len, kv_len, block_m, block_n))


def operands_for(seed: int, length: int, packed: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (2, length), generator=generator)
    valid = torch.rand(2, length, generator=generator) < 0.8
    return [torch.sort(ids, 1).values if packed else ids, valid]


@given(st.sampled_from(["causal & document($0)", "padding($1)", "sliding_window(5, 0) & padding($1)",
                        "document($0) | sinks(3)"]), shapes, st.integers(0, 99))
def test_data_grid_rules_equal_block_class_for_packed_documents(text, shape, seed):
    mask = parse_mask(text)
    q_len, kv_len, block_m, block_n, q_off, kv_off = shape
    operands = operands_for(seed, max(q_off + q_len, kv_off + kv_len), packed=True)
    slow = tile_classes_per_tile(mask, q_len, kv_len, block_m, block_n, q_off, kv_off, operands)
    fast = tile_classes(mask, q_len, kv_len, block_m, block_n, q_off, kv_off, operands)
    assert torch.equal(fast, ragged_free(slow, q_len, kv_len, block_m, block_n))


@given(shapes, st.integers(0, 99))
def test_unsorted_document_grid_never_contradicts_block_class(shape, seed):
    mask = parse_mask("document($0)")
    q_len, kv_len, block_m, block_n, q_off, kv_off = shape
    operands = operands_for(seed, max(q_off + q_len, kv_off + kv_len), packed=False)
    slow = tile_classes_per_tile(mask, q_len, kv_len, block_m, block_n, q_off, kv_off, operands)
    fast = tile_classes(mask, q_len, kv_len, block_m, block_n, q_off, kv_off, operands)
    assert not ((fast == EMPTY) & (slow != EMPTY)).any()
    assert not ((fast == FULL) & (slow != FULL)).any()


def walked(lists, owner: int, code: int) -> list[int]:
    return sorted(lists.tiles(owner, 0 if code == FULL else 1))


@given(structured_masks(), shapes)
def test_lists_hold_exactly_the_full_and_partial_tiles(text, shape):
    q_len, kv_len, block_m, block_n, q_off, kv_off = shape
    schedule = build_schedule(parse_mask(text), q_len, kv_len, block_m, block_n, q_off, kv_off)
    for grid, lists in ((schedule.classes, schedule.by_q_block), (schedule.classes.t(), schedule.by_kv_block)):
        for owner in range(grid.shape[0]):
            for code in (FULL, PARTIAL):
                assert walked(lists, owner, code) == torch.nonzero(grid[owner] == code).flatten().tolist()


def test_data_dependent_schedules_are_reused_only_for_the_same_unchanged_operand():
    mask = parse_mask("causal & document($0)")
    ids = torch.tensor([[0] * 20 + [1] * 20])
    first = build_schedule(mask, 40, 40, 8, 8, operands=[ids])
    assert build_schedule(mask, 40, 40, 8, 8, operands=[ids]) is first  # same tensor, unchanged
    assert build_schedule(mask, 32, 32, 8, 8, 8, 8, operands=[ids]) is not first  # other offsets
    ids[0, 20:] = 0  # an in-place write bumps the version counter: classified again
    after = build_schedule(mask, 40, 40, 8, 8, operands=[ids])
    assert after is not first
    assert torch.equal(after.classes, tile_classes(mask, 40, 40, 8, 8, operands=[ids]))
    assert (after.classes != first.classes).any()
    copy = ids.clone()  # equal values, another tensor: never mistaken for the held one
    assert build_schedule(mask, 40, 40, 8, 8, operands=[copy]) is not after


def test_inference_tensors_are_classified_every_call():
    mask = parse_mask("padding($0)")
    with torch.inference_mode():
        valid = torch.ones(1, 24, dtype=torch.bool)
    first = build_schedule(mask, 24, 24, 8, 8, operands=[valid])
    assert build_schedule(mask, 24, 24, 8, 8, operands=[valid]) is not first
    assert torch.equal(first.classes, build_schedule(mask, 24, 24, 8, 8, operands=[valid]).classes)


def test_operands_shorter_than_the_positions_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="covers positions 0..39 but attention reaches position 47"):
        build_schedule(parse_mask("document($0)"), 40, 40, 8, 8, 8, 8, operands=[torch.zeros(1, 40, dtype=torch.int64)])
