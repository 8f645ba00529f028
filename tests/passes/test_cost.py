"""Cost model: formulas against numbers worked out by hand, plans against their exact message
counts, and the strategy choice. The arithmetic in these tests is written out independently of
seqweave.passes.cost."""
from __future__ import annotations

import pytest
import sympy
import torch

from seqweave.ir.mask import Causal, Chunked, Document, Full, SlidingWindow, dense_mask
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.score_mod import NoScoreMod
from seqweave.ir.sharding import Layout, padded_length, plan_ring, shard_positions
from seqweave.passes.cost import (
    BATCH, ELEMENT_BYTES, HEAD_DIM, KV_HEADS, Q_HEADS, SEQ_LEN, WORLD, CostEstimate, Strategy, attention_flops,
    evaluate_expr, hybrid_bytes, hybrid_estimate, ring_bytes, ring_estimate, ring_grad_messages, ring_kv_messages,
    ulysses_bytes, ulysses_estimate)
from seqweave.passes.strategy import LayerShape, choose_strategy
from seqweave.ir.mask_pairs import allowed_pairs
from seqweave.runtime.comm import Communicator
from seqweave.runtime.sequence_parallel import (ring_attention_backward, ring_attention_forward,
                                                ulysses_attention_backward, ulysses_attention_forward)
from seqweave.testing.distributed import run_ranks

# Configuration A: GQA with fewer K/V heads than ranks (K/V replicated for Ulysses); bf16 (e = 2), so
# lse and the ring's travelling dK/dV accumulators are fp32 (4 bytes).
A = dict(B=2, N=1024, Hq=8, Hkv=2, D=64, P=4, e=2)
ACC = 4
A_MESSAGE = 2 * 2 * (1024 // 4) * 2 * 64          # K and V of one rank: 2·B·(N/P)·Hkv·D = 131072 elements
A_RING_FWD = 3 * A_MESSAGE * 2                     # (P-1) hops of K/V = 786432 bytes
# backward: K/V again, dK/dV beside each of the P-1 hops, and one return home per rank
A_RING_BWD = 3 * A_MESSAGE * 2 + (3 + 1) * A_MESSAGE * ACC   # = 2883584
# Ulysses: Hkv_eff = max(2, 4) = 4 heads; each rank sends 3/4 of every (B, N/P, heads, ·) slab.
A_TOKENS = 2 * 256                                  # B·N/P
A_ULYSSES_FWD = (3 * A_TOKENS * (8 + 2 * 4) * 64 * 2 // 4     # q, k, v in   = 786432
                 + 3 * A_TOKENS * 8 * 64 * 2 // 4             # out back     = 393216
                 + 3 * A_TOKENS * 8 * ACC // 4)               # lse back     = 12288
A_ULYSSES_BWD = (3 * A_TOKENS * (3 * 8 + 2 * 4) * 64 * 2 // 4  # dout, q, out, k, v in = 1572864
                 + 3 * A_TOKENS * 8 * ACC // 4                # lse in                = 12288
                 + 3 * A_TOKENS * (8 + 2 * 4) * 64 * 2 // 4)  # dq, dk, dv back       = 786432
# Hybrid u=2, r=2: all-to-all among 2 ranks of N/4 tokens each (Hkv_eff = max(2, 2) = 2), then one
# ring hop whose message holds K, V of N/2 tokens and 2/2 = 1 head.
A_HYBRID_A2A_FWD = A_TOKENS * ((8 + 2 * 2) * 64 * 2 + 8 * 64 * 2 + 8 * ACC) // 2       # = 663552
A_HYBRID_A2A_BWD = A_TOKENS * ((3 * 8 + 2 * 2) * 64 * 2 + 8 * ACC + (8 + 2 * 2) * 64 * 2) // 2  # = 1318912
A_HYBRID_MESSAGE = 2 * 2 * 512 * 1 * 64                                                 # = 131072 elements
A_CAUSAL_PAIRS = 1024 * 1025 // 2                            # = 524800


def test_ring_matches_hand_numbers() -> None:
    assert evaluate_expr(ring_bytes(), **A) == A_RING_FWD == 786432
    assert evaluate_expr(ring_bytes(backward=True), **A) == A_RING_BWD == 2883584
    assert evaluate_expr(ring_bytes(total=True), **A) == 4 * A_RING_FWD


def test_ring_on_one_rank_sends_nothing() -> None:
    assert evaluate_expr(ring_bytes(backward=True), **dict(A, P=1)) == 0


def test_ulysses_matches_hand_numbers() -> None:
    assert evaluate_expr(ulysses_bytes(), **A) == A_ULYSSES_FWD == 1191936
    assert evaluate_expr(ulysses_bytes(backward=True), **A) == A_ULYSSES_BWD == 2371584
    assert evaluate_expr(ulysses_bytes(total=True), **A) == 4 * A_ULYSSES_FWD


def test_ulysses_without_replication_when_kv_heads_cover_the_ranks() -> None:
    mha = dict(A, Hkv=8)  # Hkv_eff = max(8, 4) = 8
    assert evaluate_expr(ulysses_bytes(), **mha) == 3 * A_TOKENS * ((8 + 8 + 8 + 8) * 64 * 2 + 8 * ACC) // 4


def test_hybrid_matches_hand_numbers() -> None:
    ring_bwd = A_HYBRID_MESSAGE * 2 + (1 + 1) * A_HYBRID_MESSAGE * ACC  # K/V, dK/dV beside it, return home
    assert evaluate_expr(hybrid_bytes(2, 2), **A) == A_HYBRID_A2A_FWD + A_HYBRID_MESSAGE * 2 == 925696
    assert evaluate_expr(hybrid_bytes(2, 2, backward=True), **A) == A_HYBRID_A2A_BWD + ring_bwd == 2629632


def test_hybrid_degenerates_to_ring_and_ulysses() -> None:
    for world in (2, 4, 8):
        values = dict(A, P=world, N=world * 64)
        assert evaluate_expr(hybrid_bytes(1, world), **values) == evaluate_expr(ring_bytes(), **values)
        assert evaluate_expr(hybrid_bytes(world, 1), **values) == evaluate_expr(ulysses_bytes(), **values)
        for backward in (False, True):
            for u, ring in ((1, ring_bytes(backward=backward)), (world, ulysses_bytes(backward=backward))):
                got = hybrid_bytes(u, world // u, backward=backward, total=True)
                assert evaluate_expr(got, **values) == world * evaluate_expr(ring, **values)


def test_formulas_match_design_numbers_to_beat() -> None:
    """DESIGN.md: ring ≈ 2·B·N·Hkv·d·e, Ulysses ≈ 4·B·N·h·e / P (h = Hq·d, MHA), both up to (P-1)/P;
    Ulysses also returns the lse, one fp32 per token and head."""
    B, N, Hkv, D, P, e = BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM, WORLD, ELEMENT_BYTES
    assert sympy.simplify(ring_bytes() - (P - 1) / P * 2 * B * N * Hkv * D * e) == 0
    mha = ulysses_bytes().subs({Q_HEADS: KV_HEADS}).subs(sympy.Max(KV_HEADS, WORLD), KV_HEADS)
    lse = (P - 1) / P * B * N / P * Hkv * sympy.Max(e, 4)
    assert sympy.simplify(mha - (P - 1) / P * 4 * B * N * Hkv * D * e / P - lse) == 0


def test_attention_flops_causal_by_hand() -> None:
    assert evaluate_expr(attention_flops(Causal()), **A) == 4 * 2 * 8 * 64 * A_CAUSAL_PAIRS == 2149580800
    assert evaluate_expr(attention_flops(Causal(), backward=True), **A) == 10 * 2 * 8 * 64 * A_CAUSAL_PAIRS
    assert evaluate_expr(attention_flops(Full()), **A) == 4 * 2 * 8 * 64 * 1024 * 1024


def test_sliding_window_pairs_by_hand() -> None:
    # causal window of 3 earlier tokens over N = 10: diagonals 0..3 hold 10 + 9 + 8 + 7 pairs.
    assert allowed_pairs(parse_mask("causal & sliding_window(3, 0)"), 10) == 10 + 9 + 8 + 7
    # two-sided window (2, 1) over N = 4: diagonals -2..1 hold 2 + 3 + 4 + 3 pairs.
    assert allowed_pairs(SlidingWindow(2, 1), 4) == 2 + 3 + 4 + 3
    # a window wider than the sequence is the full square.
    assert allowed_pairs(SlidingWindow(50, 50), 6) == 36
    assert sympy.expand(allowed_pairs(SlidingWindow(3, 0)) - (4 * SEQ_LEN - 6)) == 0  # symbolic N > 3


@pytest.mark.parametrize("text", ["full", "causal", "sliding_window(7, 3)", "causal & sliding_window(40, 0)",
                                  "chunked(13)", "causal & chunked(9)", "causal & (sliding_window(5, 0) | sinks(3))",
                                  "sinks(2) | sliding_window(0, 4)"])
@pytest.mark.parametrize("n", [1, 29, 300])
def test_allowed_pairs_equal_dense_count(text: str, n: int) -> None:
    mask = parse_mask(text)
    assert allowed_pairs(mask, n) == int(dense_mask(mask, n, n).sum())


def test_data_mask_pairs_average_over_the_batch() -> None:
    segments = torch.tensor([[0] * 5 + [1] * 3, [0] * 8])  # pairs: 25 + 9 = 34 and 64
    assert allowed_pairs(Document(0), 8, operands=[segments]) == sympy.Rational(34 + 64, 2)
    assert allowed_pairs(Document(0), 8) == 64  # without its tensor: the upper bound, every pair
    with pytest.raises(ValueError, match="integer seq_len"):
        allowed_pairs(Chunked(4))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("window", [1, 17, 63])
def test_causal_window_narrower_than_a_shard_is_one_hop_per_rank(world: int, window: int) -> None:
    shard = 64
    plan = plan_ring(parse_mask(f"causal & sliding_window({window}, 0)"), Layout.CONTIGUOUS, world, world * shard)
    # every rank forwards its own shard to its successor once; the last rank's successor is rank 0,
    # which sees nothing later than itself, so it sends nothing.
    assert ring_kv_messages(plan) == (1,) * (world - 1) + (0,)
    # backward: the owner's dK/dV go out with its K/V and come back from its successor.
    assert ring_grad_messages(plan) == (1,) + (2,) * (world - 2) + (1,)
    values = dict(B=2, N=world * shard, Hkv=2, D=64, e=2)
    message = 2 * 2 * shard * 2 * 64  # K and V: 2·B·(N/P)·Hkv·D elements
    assert evaluate_expr(ring_bytes(plan), **values) == message * 2
    assert evaluate_expr(ring_bytes(plan, total=True), **values) == (world - 1) * message * 2
    assert plan.sends_total() == world - 1
    busiest_grads = 2 if world > 2 else 1
    assert evaluate_expr(ring_bytes(plan, backward=True), **values) == message * 2 + busiest_grads * message * ACC
    assert ring_estimate(Causal() & SlidingWindow(window, 0), plan).strategy == "halo"


def test_window_one_past_the_shard_needs_two_hops() -> None:
    # source s is needed by s+1 and s+2: ranks 1 and 2 send their own shard and forward the one
    # before it, rank 0 only its own (rank 3's shard is needed by nobody).
    plan = plan_ring(parse_mask("causal & sliding_window(65, 0)"), Layout.CONTIGUOUS, 4, 256)
    assert ring_kv_messages(plan) == (1, 2, 2, 0)


def paths(plan) -> list[int]:
    """Hops each source's K/V travel, walking plan.sends (independent of the cost model)."""
    hops = []
    for source in range(plan.world):
        step = 0
        while step < plan.world - 1 and plan.sends[step][(source + step) % plan.world]:
            step += 1
        hops.append(step)
    return hops


@pytest.mark.parametrize("text", ["full", "causal", "chunked(24)", "causal & sliding_window(30, 0)"])
@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("world", [1, 2, 5, 8])
def test_sympy_expression_equals_plan_count(text: str, layout: Layout, world: int) -> None:
    seq_len = world * 2 * 24
    plan = plan_ring(parse_mask(text), layout, world, seq_len)
    values = dict(B=1, N=seq_len, Hkv=4, D=16, e=2)
    message = 2 * 1 * (seq_len // world) * 4 * 16
    hops = paths(plan)
    assert sum(hops) == plan.sends_total()
    assert evaluate_expr(ring_bytes(plan, total=True), **values) == plan.sends_total() * message * 2
    homes = sum(h > 0 for h in hops)
    backward = plan.sends_total() * message * 2 + (plan.sends_total() + homes) * message * ACC
    assert evaluate_expr(ring_bytes(plan, backward=True, total=True), **values) == backward
    busiest = max((sum(row[r] for row in plan.sends) for r in range(world)), default=0)
    assert evaluate_expr(ring_bytes(plan), **values) == busiest * message * 2
    if text == "full":  # nothing to skip: the plan is the dense ring
        for backward in (False, True):
            assert evaluate_expr(ring_bytes(plan, backward=backward), **values) == \
                evaluate_expr(ring_bytes(backward=backward), **values, P=world)


def test_estimate_evaluates_every_field() -> None:
    estimate = ring_estimate(Causal())
    assert isinstance(estimate, CostEstimate) and estimate.strategy == "ring"
    assert estimate.evaluate(**A) == {"forward_bytes": A_RING_FWD, "backward_bytes": A_RING_BWD,
                                      "forward_flops": 4 * 2 * 8 * 64 * A_CAUSAL_PAIRS,
                                      "backward_flops": 10 * 2 * 8 * 64 * A_CAUSAL_PAIRS}
    assert ulysses_estimate(Causal()).evaluate(**A)["forward_bytes"] == A_ULYSSES_FWD
    assert hybrid_estimate(Causal(), 2, 2).evaluate(**A)["backward_bytes"] == 2629632
    chunked = ring_estimate(Chunked(100), seq_len=1024).evaluate(**A)  # N fixed at 1024: 10 chunks of 100 + 24
    assert chunked["forward_flops"] == 4 * 2 * 8 * 64 * (10 * 100 * 100 + 24 * 24)


def test_evaluate_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="still depends on"):
        ring_estimate(Causal()).evaluate(B=1)
    with pytest.raises(ValueError, match="unknown symbol"):
        ring_estimate(Causal()).evaluate(**A, heads=3)
    with pytest.raises(ValueError, match="multiple of P"):
        evaluate_expr(ring_bytes(), B=1, N=1023, Hkv=1, D=1, e=1, P=4)  # 3·2·1023/4 bytes


def test_hybrid_rejects_a_plan_for_the_wrong_world() -> None:
    with pytest.raises(ValueError, match="plan_ring"):
        hybrid_bytes(2, 2, plan_ring(Causal(), Layout.ZIGZAG, 4, 64))


def test_choose_ulysses_for_many_heads_and_large_world() -> None:
    shape = LayerShape(batch=1, seq_len=65536, q_heads=32, kv_heads=32, head_dim=128, world=16)
    choice = choose_strategy(Causal(), shape, Layout.ZIGZAG, training=False)
    ring = 15 * 2 * 1 * 4096 * 32 * 128 * 2                      # (P-1)·2·B·(N/P)·Hkv·D·e = 1006632960
    # (P-1)/P·B·(N/P)·[(2Hq + 2Hkv)·D·e + Hq·4]: q, k, v in, out and fp32 lse back
    ulysses = 15 * (1 * 4096 * ((32 + 32 + 32 + 32) * 128 * 2 + 32 * 4)) // 16
    costs = dict(choice.candidates)
    assert costs["ring"] == ring and costs["ulysses"] == ulysses == 126320640
    assert choice.strategy is Strategy.ULYSSES and choice.ulysses_size == 16
    assert choice.reason.startswith("ulysses sends the fewest bytes")
    assert choice.estimate.evaluate(**shape.values(choice.seq_len))["forward_bytes"] == ulysses


def test_choose_refuses_ulysses_for_indivisible_heads() -> None:
    shape = LayerShape(batch=1, seq_len=32768, q_heads=6, kv_heads=2, head_dim=128, world=4)
    choice = choose_strategy(Causal(), shape, Layout.ZIGZAG)
    assert choice.strategy is not Strategy.ULYSSES
    assert "ulysses" not in dict(choice.candidates)
    assert "ulysses refused: Hq=6 is not divisible by P=4" in choice.reason


def test_choose_halo_for_a_narrow_causal_window() -> None:
    shape = LayerShape(batch=1, seq_len=131072, q_heads=32, kv_heads=8, head_dim=128, world=8)
    choice = choose_strategy(parse_mask("causal & sliding_window(4095, 0)"), shape, Layout.CONTIGUOUS)
    message = 2 * 1 * 16384 * 8 * 128
    assert choice.strategy is Strategy.HALO and choice.plan is not None
    # forward: one K/V hop; backward: K/V again, the owner's dK/dV out beside it and a neighbour's home
    assert dict(choice.candidates)["halo"] == message * 2 + (message * 2 + 2 * message * ACC)


def test_choose_pads_the_length_and_handles_one_rank() -> None:
    shape = LayerShape(batch=1, seq_len=1000, q_heads=4, kv_heads=4, head_dim=8, world=3)
    choice = choose_strategy(Full(), shape, Layout.ZIGZAG)
    assert choice.seq_len == 1002  # next multiple of 2·3
    alone = choose_strategy(Full(), LayerShape(1, 7, 4, 4, 8, 1), Layout.ZIGZAG)
    assert alone.strategy is Strategy.RING and dict(alone.candidates) == {"ring": 0}


# ----------------------------------------------- against the runtime's byte counters

TRAFFIC_WORLD, TRAFFIC_LENGTH, TRAFFIC_Q_HEADS, TRAFFIC_HEAD_DIM = 4, 45, 4, 8  # bf16: e = 2
TRAFFIC_CASES = (  # scheme, mask, layout, kv heads
    ("ring", "causal & sliding_window(5, 0)", Layout.CONTIGUOUS, 2),  # halo
    ("ring", "causal", Layout.ZIGZAG, 2),
    ("ring", "chunked(8)", Layout.CONTIGUOUS, 1),  # shards of 12: some go nowhere, one goes 3 hops
    ("ulysses", "causal", Layout.ZIGZAG, 1),        # K/V heads replicated 1 -> 4
    ("ulysses", "sliding_window(6, 2)", Layout.STRIPED, 4),
)


def _traffic(comm: Communicator, scheme: str, text: str, layout: Layout, kv_heads: int) -> tuple[int, int]:
    """Bytes this rank sends in one forward and one backward of the runtime's attention."""
    seq_len = padded_length(TRAFFIC_LENGTH, comm.world, layout)

    def positions_of(rank: int) -> torch.Tensor:
        return shard_positions(layout, rank, comm.world, seq_len)

    gen = torch.Generator().manual_seed(comm.rank)
    local = seq_len // comm.world
    q, dout, k, v = (torch.randn(1, heads, local, TRAFFIC_HEAD_DIM, generator=gen).to(torch.bfloat16)
                     for heads in (TRAFFIC_Q_HEADS, TRAFFIC_Q_HEADS, kv_heads, kv_heads))
    common: tuple = (parse_mask(text), NoScoreMod(), TRAFFIC_HEAD_DIM ** -0.5)
    forward, backward = ulysses_attention_forward, ulysses_attention_backward
    if scheme == "ring":
        forward, backward = ring_attention_forward, ring_attention_backward
        common += (plan_ring(common[0], layout, comm.world, seq_len),)
    start = comm.bytes_sent
    out, lse = forward(comm, q, k, v, *common, positions_of)
    middle = comm.bytes_sent
    backward(comm, dout, q, k, v, out, lse, *common, positions_of)
    return middle - start, comm.bytes_sent - middle


def traffic_worker(rank: int, world: int, cases: tuple) -> list[tuple[int, int]]:
    """Entry point on each gloo rank: (forward, backward) bytes sent for every case."""
    comm = Communicator(timeout_s=30)
    return [_traffic(comm, *case) for case in cases]


def _modelled(scheme: str, text: str, layout: Layout, backward: bool, total: bool):
    if scheme == "ulysses":
        return ulysses_bytes(backward=backward, total=total)
    plan = plan_ring(parse_mask(text), layout, TRAFFIC_WORLD, padded_length(TRAFFIC_LENGTH, TRAFFIC_WORLD, layout))
    return ring_bytes(plan, backward=backward, total=total)


def test_bytes_equal_the_runtime_counters() -> None:
    """The model counts exactly what runtime/sequence_parallel.py sends, on real gloo ranks."""
    per_rank = run_ranks(TRAFFIC_WORLD, traffic_worker, TRAFFIC_CASES, timeout_s=120)
    for index, (scheme, text, layout, kv_heads) in enumerate(TRAFFIC_CASES):
        values = dict(B=1, N=padded_length(TRAFFIC_LENGTH, TRAFFIC_WORLD, layout), Hq=TRAFFIC_Q_HEADS,
                      Hkv=kv_heads, D=TRAFFIC_HEAD_DIM, P=TRAFFIC_WORLD, e=2)
        for phase, backward in enumerate((False, True)):
            sent = [rank[index][phase] for rank in per_rank]
            case = (scheme, text, layout.value, "backward" if backward else "forward", sent)
            assert max(sent) == evaluate_expr(_modelled(scheme, text, layout, backward, False), **values), case
            assert sum(sent) == evaluate_expr(_modelled(scheme, text, layout, backward, True), **values), case


def test_data_masks_without_operands_count_an_upper_bound():
    """Padding / documents read as Full when their tensors are unknown (compile time): an upper bound."""
    from seqweave.ir.mask import Causal, Document, Padding, SlidingWindow
    from seqweave.ir.mask_pairs import structural_bound

    assert structural_bound(Causal() & Padding(0)) == Causal()
    assert structural_bound(Causal() & SlidingWindow(3, 0) & Document(0)) == Causal() & SlidingWindow(3, 0)
    assert allowed_pairs(Causal() & Padding(0), 8) == 8 * 9 // 2
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    assert allowed_pairs(Causal() & Document(0), 8, operands=[segments]) < allowed_pairs(Causal() & Document(0), 8)
