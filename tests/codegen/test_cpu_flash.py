"""CPU attention on PyTorch's fused flash kernel (codegen/cpu_flash.py) against an explicit float64 softmax.

Most cases shrink the plan's blocks (16 query rows, 4-key tiles) so that lengths of a few dozen
tokens exercise everything the 512-row blocks do at long context: several blocks, FULL runs
split off, EMPTY gaps, dense masks per block, LSE merges.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.codegen import attention_kernels, cpu_flash, cpu_flash_plan
from seqweave.codegen.runs import strided_runs
from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward, merge_partials
from seqweave.ir.sharding import Layout, shard_positions
from seqweave.testing.strategies import mask_specs

NONE, SCALE = parse_score_mod("none"), 0.3
F32 = dict(atol=2e-5, rtol=1e-5)
F64 = dict(atol=1e-10, rtol=1e-10)


@contextlib.contextmanager
def small_blocks(block_q: int = 16, tile_kv: int = 4, min_split: int = 8):
    """Plan with tiny blocks (the plan cache keys on the sizes, so no stale plan is reused)."""
    with mock.patch.multiple(cpu_flash_plan, BLOCK_Q=block_q, TILE_KV=tile_kv, MIN_SPLIT=min_split):
        yield


@pytest.fixture(autouse=True)
def fused_kernel_on(monkeypatch):
    """The fused kernel is the default; a SEQWEAVE_CPU_ATTENTION=reference left in the environment
    must not turn these tests into checks of the reference."""
    monkeypatch.delenv(cpu_flash.ENV, raising=False)


@pytest.fixture
def launches():
    """cpu_flash's kernel call counter, zeroed for the test."""
    cpu_flash.launches.clear()
    yield cpu_flash.launches
    cpu_flash.launches.clear()


def tensors(q_len: int, kv_len: int, heads: tuple[int, int] = (4, 2), d: int = 8, seed: int = 0):
    """float64 q, k, v, dout (GQA by default: 4 query heads over 2 kv heads)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, heads[0], q_len, d), (2, heads[1], kv_len, d), (2, heads[1], kv_len, d), (2, heads[0], q_len, d)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]


def dense_attention(q, k, v, allowed: torch.Tensor, scale: float = SCALE):
    """Plain float64 softmax attention over an explicit mask; rows that see nothing: out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    rows = allowed.any(-1, keepdim=True)
    s = torch.where(allowed, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    s = torch.where(rows, s, 0.0)
    p = torch.softmax(s, -1) * rows
    return p @ v, torch.where(rows.squeeze(-1), torch.logsumexp(s, -1), float("-inf"))


def expected(q, k, v, dout, mask: MaskSpec, operands=(), q_pos=None, kv_pos=None):
    """(out, lse, (dq, dk, dv)) of the dense float64 attention, gradients by autograd."""
    q_pos = torch.arange(q.shape[2]) if q_pos is None else q_pos
    kv_pos = torch.arange(k.shape[2]) if kv_pos is None else kv_pos
    allowed = mask.evaluate(q_pos, kv_pos, operands)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = dense_attention(*leaves, allowed)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), lse.detach(), grads


def run(q, k, v, dout, mask: MaskSpec, operands=(), q_pos=None, kv_pos=None, dtype=torch.float32):
    """cpu_flash forward and backward in `dtype`."""
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    out, lse = cpu_flash.forward(q, k, v, mask, NONE, SCALE, operands, q_pos, kv_pos)
    grads = cpu_flash.backward(dout, q, k, v, out, lse, mask, NONE, SCALE, operands, q_pos, kv_pos)
    return out, lse, grads


def assert_matches(got, want, tol) -> None:
    out, lse, grads = got
    want_out, want_lse, want_grads = want
    torch.testing.assert_close(out.double(), want_out, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **tol)  # -inf where the row sees nothing
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, **tol)


def segments(length: int, sizes: list[int]) -> torch.Tensor:
    """[2, length] packed document ids (documents of `sizes`, the last one cut or extended)."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids = torch.cat([ids, ids.new_full((max(0, length - len(ids)),), len(sizes))])[:length]
    return torch.stack([ids, ids.flip(0).max() - ids.flip(0)])  # batch 1: the same cut, mirrored


MASKS = ["full", "causal", "sliding_window(5, 0)", "sliding_window(3, 9)", "causal & sinks(3)",
         "causal & (sliding_window(6, 0) | sinks(2))", "chunked(7)", "causal & chunked(20)",
         "causal & document($0)", "sliding_window(8, 8) & padding($0)", "queries_from(23) & causal"]


@pytest.mark.parametrize("text", MASKS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32), (torch.float64, F64)], ids=["f32", "f64"])
def test_masks_match_a_dense_float64_softmax(text, dtype, tol, launches):
    q, k, v, dout = tensors(67, 67)
    operands = ()
    if "document" in text:
        operands = (segments(67, [9, 30, 1, 20]),)
    elif "padding" in text:
        operands = ((torch.arange(67) % 11 != 3).long().expand(2, -1).contiguous(),)
    mask = parse_mask(text)
    with small_blocks():
        got = run(q, k, v, dout, mask, operands, dtype=dtype)
    assert_matches(got, expected(q, k, v, dout, mask, operands), tol)
    assert launches["forward"] > 0 and launches["backward"] > 0


def test_rows_that_see_no_key_give_out_zero_lse_minus_inf_and_no_gradient(launches):
    q, k, v, dout = tensors(40, 40)
    mask = parse_mask("queries_from(23) & sliding_window(2, 2)")
    with small_blocks():
        out, lse, (dq, dk, dv) = run(q, k, v, dout, mask)
    assert bool((out[:, :, :23] == 0).all()) and bool(torch.isneginf(lse[:, :, :23]).all())
    assert bool((dq[:, :, :23] == 0).all()) and all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))


def test_odd_lengths_with_real_block_sizes_run_few_kernel_calls(launches):
    """At the shipped sizes a causal call is one kernel call, a window one call per query block."""
    q, k, v, dout = tensors(1100, 1100, heads=(2, 1), d=8)
    causal = parse_mask("causal")
    assert_matches(run(q, k, v, dout, causal), expected(q, k, v, dout, causal), F32)
    assert launches == {"forward": 1, "backward": 1}
    window = parse_mask("sliding_window(300, 0)")
    launches.clear()
    assert_matches(run(q, k, v, dout, window), expected(q, k, v, dout, window), F32)
    blocks = -(-1100 // cpu_flash_plan.BLOCK_Q)
    assert launches == {"forward": blocks, "backward": blocks}


def test_zigzag_positions_split_into_runs():
    """Two query chunks and keys from two zigzag shards: run x run calls, merged exactly."""
    q_pos = shard_positions(Layout.ZIGZAG, 0, 2, 96)  # 0..23 and 72..95
    kv_pos = torch.cat([shard_positions(Layout.ZIGZAG, 1, 2, 96), q_pos])
    q, k, v, dout = tensors(48, 96)
    for text in ("causal", "causal & sliding_window(30, 0)", "causal & document($0)"):
        operands = (segments(96, [10, 50, 5]),) if "document" in text else ()
        mask = parse_mask(text)
        with small_blocks():
            got = run(q, k, v, dout, mask, operands, q_pos, kv_pos)
        assert_matches(got, expected(q, k, v, dout, mask, operands, q_pos, kv_pos), F32)


def test_ring_steps_with_keys_before_or_after_the_queries(launches):
    """Keys all before the queries: one unmasked call. All after: nothing visible, no call."""
    q, k, v, dout = tensors(40, 40)
    mask = parse_mask("causal")
    q_pos, before, after = torch.arange(40, 80), torch.arange(0, 40), torch.arange(80, 120)
    with small_blocks():
        got = run(q, k, v, dout, mask, (), q_pos, before)
    assert_matches(got, expected(q, k, v, dout, mask, (), q_pos, before), F32)
    assert launches == {"forward": 1, "backward": 1}
    with small_blocks():
        out, lse, grads = run(q, k, v, dout, mask, (), q_pos, after)
    assert launches == {"forward": 1, "backward": 1}  # no new call
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    assert all(bool((g == 0).all()) for g in grads)


def test_backward_with_merged_out_and_lse_adds_each_part_share():
    """Keys split over two calls (a ring): forward each, merge, backward each with the merged
    out / lse; the summed gradients are those of the whole attention."""
    q, k, v, dout = (t.float() for t in tensors(50, 50))
    mask, kv_pos = parse_mask("causal & sliding_window(20, 0)"), torch.arange(50)
    halves = [(slice(0, 23), kv_pos[:23]), (slice(23, 50), kv_pos[23:])]
    with small_blocks():
        parts = [cpu_flash.forward(q, k[:, :, s], v[:, :, s], mask, NONE, SCALE, (), None, pos) for s, pos in halves]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [cpu_flash.backward(dout, q, k[:, :, s], v[:, :, s], out, lse, mask, NONE, SCALE, (), None, pos)
                 for s, pos in halves]
    want_out, want_lse, (dq, dk, dv) = expected(q.double(), k.double(), v.double(), dout.double(), mask)
    torch.testing.assert_close(out.double(), want_out, **F32)
    torch.testing.assert_close((grads[0][0] + grads[1][0]).double(), dq, **F32)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 2).double(), dk, **F32)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 2).double(), dv, **F32)


@pytest.mark.parametrize("heads", [(4, 1), (6, 2), (3, 3)], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("native", [True, False], ids=["native-gqa", "repeated-kv"])
def test_gqa_with_and_without_the_kernel_reading_kv_heads_itself(heads, native, monkeypatch):
    monkeypatch.setattr(cpu_flash, "kernel_takes_gqa", lambda: native)
    q, k, v, dout = tensors(33, 45, heads=heads)
    mask = parse_mask("sliding_window(4, 12)")
    with small_blocks():
        got = run(q, k, v, dout, mask)
    assert_matches(got, expected(q, k, v, dout, mask), F32)


def test_bfloat16_keeps_the_reference_dtypes():
    q, k, v, dout = tensors(45, 45)
    mask = parse_mask("causal & sliding_window(10, 0)")
    with small_blocks():
        out, lse, grads = run(q, k, v, dout, mask, dtype=torch.bfloat16)
    ref_out, ref_lse = attention_forward(*(t.bfloat16() for t in (q, k, v)), mask, NONE, SCALE)
    assert (out.dtype, lse.dtype, lse.shape) == (ref_out.dtype, ref_lse.dtype, ref_lse.shape)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    want_out, want_lse, want_grads = expected(q, k, v, dout, mask)
    torch.testing.assert_close(out.double(), want_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=3e-2, rtol=1e-2)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=6e-2, rtol=6e-2)


@settings(max_examples=60)
@given(mask=mask_specs(), q_len=st.integers(1, 41), kv_len=st.integers(1, 41), offsets=st.tuples(
       st.integers(0, 20), st.integers(0, 20)), data=st.data())
def test_any_mask_and_lengths_match_the_float64_reference(mask, q_len, kv_len, offsets, data):
    """Any MaskSpec (document / padding read operand $0: small ints over the positions) at odd
    lengths and offset queries / keys equals the blockwise float64 reference, forward and backward."""
    q_pos, kv_pos = torch.arange(offsets[0], offsets[0] + q_len), torch.arange(offsets[1], offsets[1] + kv_len)
    assert_matches_the_reference(mask, q_pos, kv_pos, data)


def assert_matches_the_reference(mask: MaskSpec, q_pos: torch.Tensor, kv_pos: torch.Tensor, data) -> None:
    """cpu_flash at these positions (tiny blocks; document / padding ids drawn from `data`)
    equals the blockwise float64 reference, forward and backward."""
    q, k, v, dout = tensors(len(q_pos), len(kv_pos), seed=len(q_pos) * 100 + len(kv_pos))
    length = int(max(q_pos.max(), kv_pos.max())) + 1
    ids = data.draw(st.lists(st.integers(0, 3), min_size=length, max_size=length))
    operands = (torch.tensor([ids, sorted(ids)]),)
    with small_blocks(block_q=8, tile_kv=4, min_split=8):
        got = run(q, k, v, dout, mask, operands, q_pos, kv_pos)
    want_out, want_lse = attention_forward(q, k, v, mask, NONE, SCALE, operands, q_pos, kv_pos)
    want = attention_backward(dout, q, k, v, want_out, want_lse, mask, NONE, SCALE, operands, q_pos, kv_pos)
    assert_matches(got, (want_out, want_lse, want), F32)


def test_dispatch_runs_the_fused_kernel_on_cpu_and_the_reference_for_score_mods(launches, monkeypatch):
    monkeypatch.delenv("SEQWEAVE_TRITON_INTERPRET", raising=False)
    q, k, v, dout = (t.float() for t in tensors(20, 20))
    mask = parse_mask("causal")
    out, lse = attention_kernels.forward(q, k, v, mask, NONE, SCALE)
    attention_kernels.backward(dout, q, k, v, out, lse, mask, NONE, SCALE)
    assert launches == {"forward": 1, "backward": 1}
    softcap = parse_score_mod("softcap(5.0)")
    got = attention_kernels.forward(q, k, v, mask, softcap, SCALE)
    assert launches == {"forward": 1, "backward": 1}  # a score mod the kernel cannot express: reference
    torch.testing.assert_close(got[0], attention_forward(q, k, v, mask, softcap, SCALE)[0])
    assert cpu_flash.NAME in attention_kernels.kernels_in_use("cpu")


def test_the_environment_can_force_the_reference(launches, monkeypatch):
    monkeypatch.delenv("SEQWEAVE_TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(cpu_flash.ENV, "reference")
    q, k, v, _ = (t.float() for t in tensors(20, 20))
    attention_kernels.forward(q, k, v, parse_mask("causal"), NONE, SCALE)
    assert not launches and "reference" in attention_kernels.kernels_in_use("cpu")
    assert cpu_flash.NAME not in attention_kernels.kernels_in_use("cpu")


def test_calls_it_cannot_run_are_refused_by_name():
    q, k, v, _ = (t.float() for t in tensors(8, 8))
    with pytest.raises(ValueError, match="fall back to the reference"):
        cpu_flash.forward(q, k, v, parse_mask("causal"), parse_score_mod("softcap(5.0)"), SCALE)
    assert not cpu_flash.handles(q, k, v[..., :4], NONE)  # head dims differ


def test_plans_build_masks_per_block_only():
    """A window at 4k tokens: no dense mask wider than the block's visible keys, never N x N."""
    span = cpu_flash_plan.Span(4096, 4096, 0, 0)
    pieces = cpu_flash_plan.plan(parse_mask("sliding_window(1023, 0)"), span, (), torch.float32)
    masked = [p for p in pieces if p.bias is not None]
    assert masked and all(p.bias.shape[-2] <= cpu_flash_plan.BLOCK_Q for p in masked)
    assert all(p.bias.shape[-1] <= 1024 + cpu_flash_plan.BLOCK_Q + cpu_flash_plan.TILE_KV for p in masked)
    whole = cpu_flash_plan.plan(parse_mask("causal"), span, (), torch.float32)
    assert [(p.kind, p.q0, p.q1, p.k0, p.k1) for p in whole] == [(cpu_flash_plan.CAUSAL, 0, 4096, 0, 4096)]


@pytest.mark.parametrize("sizes", [(16, 4, 8), (10, 4, 8), (6, 8, 4)], ids=["aligned", "ragged", "wide-tiles"])
@pytest.mark.parametrize("text", ["causal", "causal | sinks(3)", "causal & sliding_window(200, 0)"])
def test_whole_call_causal_only_where_the_mask_is_exactly_causal(sizes, text, launches):
    """Query blocks that do not start on a tile edge still verify the whole diagonal."""
    q, k, v, dout = tensors(45, 45)
    mask = parse_mask(text)
    with small_blocks(*sizes):
        got = run(q, k, v, dout, mask)
    assert_matches(got, expected(q, k, v, dout, mask), F32)
    whole = text != "causal | sinks(3)"  # query 0 sees keys 1, 2; the window is wider than the sequence
    assert (launches["forward"] == 1) == whole


def test_one_call_over_some_of_the_keys_still_returns_gradients_for_all_of_them():
    """A single kernel call that skips trailing EMPTY keys: dk / dv keep every key (zeros there)."""
    q, k, v, dout = tensors(2, 5)
    mask = parse_mask("sliding_window(0, 0)")
    with small_blocks(block_q=8, tile_kv=4, min_split=8):
        got = run(q, k, v, dout, mask)
    assert_matches(got, expected(q, k, v, dout, mask), F32)


def test_strided_runs_find_each_layouts_progressions():
    striped = shard_positions(Layout.STRIPED, 1, 4, 32)  # 1, 5, 9, ...
    assert strided_runs(striped, 8) == [(0, 8, 1, 4)]
    assert strided_runs(shard_positions(Layout.ZIGZAG, 1, 4, 32), 8) == [(0, 4, 4, 1), (4, 4, 24, 1)]
    # a step that is not positive ends a run; the break between runs joins nothing
    assert strided_runs(torch.tensor([0, 5, 6, 7, 7, 3, 4]), 7) == [(0, 2, 0, 5), (2, 2, 6, 1), (4, 1, 7, 1),
                                                                     (5, 2, 3, 1)]
    assert strided_runs(None, 5) == [(0, 5, 0, 1)] and strided_runs(torch.tensor([9]), 1) == [(0, 1, 9, 1)]


@pytest.mark.parametrize("kv_rank", [0, 1, 3], ids=["keys-before", "same-rank", "keys-after"])
def test_striped_shards_are_one_run_each_and_few_calls(kv_rank, launches):
    """A striped ring step (queries of rank 1, keys of rank kv_rank, 4 ranks) is one run pair:
    a kernel call per block at most, not one per pair of positions (which made the striped ring
    of `seqweave demo --sp 4` crawl for hours); the same rank's causal step is one causal call."""
    q_pos, kv_pos = (shard_positions(Layout.STRIPED, r, 4, 4 * 96) for r in (1, kv_rank))
    q, k, v, dout = tensors(96, 96)
    for text in ("causal", "causal & sliding_window(30, 0)", "causal & document($0)", "chunked(40)"):
        operands = (segments(4 * 96, [100, 200, 20]),) if "document" in text else ()
        mask = parse_mask(text)
        launches.clear()
        with small_blocks():
            got = run(q, k, v, dout, mask, operands, q_pos, kv_pos)
        assert_matches(got, expected(q, k, v, dout, mask, operands, q_pos, kv_pos), F32)
        assert launches["forward"] <= 3 * -(-96 // 16), (text, launches)  # a few pieces per 16-row block
        if text == "causal" and kv_rank == 1:
            assert launches == {"forward": 1, "backward": 1}


def test_positions_without_a_stride_pattern_run_the_reference(launches):
    """Shuffled positions would be a launch per position pair: the blockwise reference runs."""
    gen = torch.Generator().manual_seed(3)
    q_pos, kv_pos = torch.randperm(40, generator=gen), torch.randperm(40, generator=gen)
    q, k, v, dout = tensors(40, 40)
    mask = parse_mask("causal & sliding_window(12, 0)")
    got = run(q, k, v, dout, mask, (), q_pos, kv_pos)
    assert not launches
    assert_matches(got, expected(q, k, v, dout, mask, (), q_pos, kv_pos), F32)


@settings(max_examples=40)
@given(mask=mask_specs(), q_len=st.integers(1, 30), kv_len=st.integers(1, 30),
       starts=st.tuples(st.integers(0, 6), st.integers(0, 6)), strides=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       data=st.data())
def test_any_mask_on_strided_positions_matches_the_float64_reference(mask, q_len, kv_len, starts, strides, data):
    """Runs of any stride (striped shards, and strides a layout never makes) with any MaskSpec."""
    q_pos = starts[0] + strides[0] * torch.arange(q_len)
    kv_pos = starts[1] + strides[1] * torch.arange(kv_len)
    assert_matches_the_reference(mask, q_pos, kv_pos, data)
