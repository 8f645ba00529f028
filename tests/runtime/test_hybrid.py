"""Hybrid (Ulysses 2 x ring 2) attention on 4 real gloo ranks equals one-process float64 attention."""
import pytest
import torch

from seqweave.ir.mask import Causal, Document, SlidingWindow
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward
from seqweave.ir.score_mod import NoScoreMod
from seqweave.ir.sharding import Layout, shard_positions
from seqweave.runtime.hybrid import hybrid_attention_backward, hybrid_attention_forward, make_hybrid_communicators
from seqweave.testing.distributed import run_ranks

WORLD, ULYSSES, LENGTH, SCALE = 4, 2, 32, 0.4
MASKS = [Causal(), Causal() & SlidingWindow(5, 0), Causal() & Document(0)]


def _full_inputs(kv_heads: int):
    generator = torch.Generator().manual_seed(7)
    q, dout = (torch.randn(1, 4, LENGTH, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, kv_heads, LENGTH, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    segments = torch.cumsum(torch.rand(1, LENGTH, generator=generator) < 0.15, dim=1)
    return q, k, v, dout, segments


def hybrid_rank(rank: int, world: int, kv_heads: int) -> list:
    inner, outer = make_hybrid_communicators(ULYSSES, timeout_s=30)
    q, k, v, dout, segments = _full_inputs(kv_heads)
    positions_of = lambda r: shard_positions(Layout.ZIGZAG, r, world, LENGTH)  # noqa: E731
    mine = positions_of(rank)
    local = [t[:, :, mine] for t in (q, k, v, dout)]
    results = []
    for mask in MASKS:
        args = (mask, NoScoreMod(), SCALE, positions_of, [segments])
        out, lse = hybrid_attention_forward(inner, outer, *local[:3], *args)
        grads = hybrid_attention_backward(inner, outer, local[3], *local[:3], out, lse, *args)
        results.append((out, lse, *grads))
    return results


@pytest.mark.parametrize("kv_heads", [2, 1])  # 1: K/V replicated to the 2 ranks of a Ulysses group
def test_hybrid_equals_single_process(kv_heads):
    per_rank = run_ranks(WORLD, hybrid_rank, kv_heads, timeout_s=120)
    q, k, v, dout, segments = _full_inputs(kv_heads)
    for index, mask in enumerate(MASKS):
        out, lse = attention_forward(q, k, v, mask, NoScoreMod(), SCALE, [segments])
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, mask, NoScoreMod(), SCALE, [segments])
        for rank, results in enumerate(per_rank):
            mine = shard_positions(Layout.ZIGZAG, rank, WORLD, LENGTH)
            got = results[index]
            for name, value, expected in zip(("out", "lse", "dq", "dk", "dv"), got, (out, lse, dq, dk, dv)):
                torch.testing.assert_close(value, expected[:, :, mine], atol=1e-10, rtol=1e-10,
                                           msg=lambda m, n=name: f"{mask} rank {rank} {n}: {m}")


def _sent(*comms) -> int:
    return sum(comm.bytes_sent for comm in comms)


def hybrid_bytes_rank(rank: int, world: int, kv_heads: int) -> tuple[int, int]:
    """(forward bytes, backward bytes) this rank sent for one causal hybrid attention."""
    inner, outer = make_hybrid_communicators(ULYSSES, timeout_s=30)
    q, k, v, dout, segments = _full_inputs(kv_heads)
    positions_of = lambda r: shard_positions(Layout.ZIGZAG, r, world, LENGTH)  # noqa: E731
    local = [t[:, :, positions_of(rank)] for t in (q, k, v, dout)]
    args = (Causal(), NoScoreMod(), SCALE, positions_of)
    out, lse = hybrid_attention_forward(inner, outer, *local[:3], *args)
    forward = _sent(inner, outer)
    hybrid_attention_backward(inner, outer, local[3], *local[:3], out, lse, *args)
    return forward, _sent(inner, outer) - forward


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_hybrid_bytes_equal_the_cost_model(kv_heads):
    from seqweave.passes.cost import evaluate_expr, hybrid_bytes
    from seqweave.runtime.hybrid import hybrid_plan

    per_rank = run_ranks(WORLD, hybrid_bytes_rank, kv_heads, timeout_s=120)
    positions_of = lambda r: shard_positions(Layout.ZIGZAG, r, WORLD, LENGTH)  # noqa: E731
    plan = hybrid_plan(Causal(), positions_of, ULYSSES, WORLD // ULYSSES)
    values = dict(B=1, N=LENGTH, Hq=4, Hkv=kv_heads, D=8, P=WORLD, e=8)  # float64
    for index, backward in enumerate((False, True)):
        predicted = evaluate_expr(hybrid_bytes(ULYSSES, WORLD // ULYSSES, plan, backward=backward), **values)
        assert max(sent[index] for sent in per_rank) == predicted, ("backward" if backward else "forward")
