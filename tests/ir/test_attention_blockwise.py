"""The CPU attention reference is blockwise: no op inside it ever produces an N x N tensor,
and EMPTY tiles are never computed."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqweave.ir.mask import Causal, SlidingWindow
from seqweave.ir.ops.attn_reference import BLOCK_KV, BLOCK_Q, attention_backward, attention_forward
from seqweave.ir.score_mod import NoScoreMod

SEQ = 1024
B, HQ, HKV, D = 1, 2, 1, 16


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns, and the matmul count."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.matmul):
            self.matmuls += 1
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def _qkv():
    generator = torch.Generator().manual_seed(0)
    shapes = [(B, HQ, SEQ, D), (B, HKV, SEQ, D), (B, HKV, SEQ, D)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def test_forward_and_backward_never_build_a_seq_by_seq_tensor():
    q, k, v = _qkv()
    with LargestTensor() as probe:
        out, lse = attention_forward(q, k, v, Causal(), NoScoreMod(), 0.25)
        attention_backward(torch.ones_like(out), q, k, v, out, lse, Causal(), NoScoreMod(), 0.25)
    assert probe.largest < SEQ * SEQ
    assert probe.largest <= max(B * HQ * BLOCK_Q * BLOCK_KV, q.numel())


def test_sliding_window_visits_only_tiles_near_the_diagonal():
    q, k, v = _qkv()
    with LargestTensor() as causal:
        attention_forward(q, k, v, Causal(), NoScoreMod(), 0.25)
    with LargestTensor() as window:
        attention_forward(q, k, v, Causal() & SlidingWindow(BLOCK_KV - 1, 0), NoScoreMod(), 0.25)
    blocks = SEQ // BLOCK_Q
    # Causal visits blocks*(blocks+1)/2 tiles, the window 2 per query block but the first: 2 matmuls each.
    assert causal.matmuls == 2 * blocks * (blocks + 1) // 2
    assert window.matmuls == 2 * (2 * blocks - 1)


def _zigzag_positions(rank: int, world: int, seq: int) -> torch.Tensor:
    """Chunks rank and 2*world-1-rank of 2*world equal chunks (independent of seqweave's own layout code)."""
    chunk = seq // (2 * world)
    first, second = rank * chunk, (2 * world - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def test_zigzag_shards_merged_over_kv_blocks_equal_full_attention():
    """Each q shard attends to every kv shard at its global positions; LSE merging equals one pass."""
    from seqweave.ir.ops.attn_reference import merge_partials

    world, seq = 4, 64
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, seq, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, 2, seq, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = Causal() & SlidingWindow(20, 0)
    full_out, full_lse = attention_forward(q, k, v, mask, NoScoreMod(), 0.3)
    for rank in range(world):
        q_pos = _zigzag_positions(rank, world, seq)
        out = torch.zeros(1, 4, q_pos.numel(), 8, dtype=torch.float64)
        lse = torch.full((1, 4, q_pos.numel()), float("-inf"))
        for source in range(world):
            kv_pos = _zigzag_positions(source, world, seq)
            part = attention_forward(q[:, :, q_pos], k[:, :, kv_pos], v[:, :, kv_pos], mask, NoScoreMod(), 0.3,
                                     q_positions=q_pos, kv_positions=kv_pos)
            out, lse = merge_partials(out, lse, *part)
        torch.testing.assert_close(out, full_out[:, :, q_pos], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse, full_lse[:, :, q_pos], atol=1e-5, rtol=1e-6)
