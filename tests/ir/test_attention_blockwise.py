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
