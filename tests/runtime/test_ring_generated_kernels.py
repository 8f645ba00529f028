"""Ring and Ulysses attention on real gloo ranks with the generated Triton kernels as local tiles.

The ranks run `attention_kernels.GENERATED` under Triton's CPU interpreter: zigzag shards are
split into contiguous runs, every ring step evaluates the mask at the keys' global positions,
and the merged out / lse and the gradients must equal single-device float64 attention.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from seqweave.ir.mask import Causal, Document, SlidingWindow  # noqa: E402
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward  # noqa: E402
from seqweave.ir.score_mod import NoScoreMod  # noqa: E402
from seqweave.ir.sharding import Layout, plan_ring, shard_positions  # noqa: E402
from seqweave.testing.distributed import run_ranks  # noqa: E402

WORLD, B, HQ, HKV, D, LENGTH, SCALE = 2, 1, 4, 2, 16, 64, 0.3
MASKS = {"causal-document": Causal() & Document(0), "window": Causal() & SlidingWindow(20, 0)}
NAMES = ("out", "lse", "dq", "dk", "dv")


def inputs() -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(11)
    shapes = {"q": HQ, "k": HKV, "v": HKV, "dout": HQ}
    tensors = {n: torch.randn(B, h, LENGTH, D, generator=generator, dtype=torch.float64) for n, h in shapes.items()}
    segments = torch.tensor([0] * 21 + [1] * 30 + [2] * (LENGTH - 51)).unsqueeze(0)
    return tensors, (segments,)


def rank_worker(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    os.environ["SEQWEAVE_TRITON_INTERPRET"] = "1"  # set before this process imports triton
    os.environ["TRITON_INTERPRET"] = "1"
    from seqweave.codegen.attention_kernels import GENERATED
    from seqweave.codegen.triton import attention as triton_attention
    from seqweave.runtime.comm import Communicator

    launches = []
    launch = triton_attention.forward
    triton_attention.forward = lambda *a, **kw: launches.append(1) or launch(*a, **kw)
    from seqweave.runtime.sequence_parallel import ring_attention_backward, ring_attention_forward

    comm, (tensors, operands) = Communicator(timeout_s=60), inputs()
    positions_of = lambda r: shard_positions(Layout.ZIGZAG, r, world, LENGTH)  # noqa: E731
    q, k, v, dout = (tensors[n][:, :, positions_of(rank)].float() for n in ("q", "k", "v", "dout"))
    results = {}
    for name, mask in MASKS.items():
        common = (mask, NoScoreMod(), SCALE, plan_ring(mask, Layout.ZIGZAG, world, LENGTH), positions_of)
        out, lse = ring_attention_forward(comm, q, k, v, *common, operands, kernels=GENERATED)
        grads = ring_attention_backward(comm, dout, q, k, v, out, lse, *common, operands, kernels=GENERATED)
        results[name] = dict(zip(NAMES, (out, lse, *grads)), positions=positions_of(rank))
    results["launches"] = len(launches)
    return results


@pytest.mark.slow
def test_ring_with_generated_kernels_matches_float64():
    per_rank = run_ranks(WORLD, rank_worker, timeout_s=240)
    assert all(r["launches"] > 0 for r in per_rank)  # the generated kernels ran, not the reference
    tensors, operands = inputs()
    for name, mask in MASKS.items():
        out, lse = attention_forward(tensors["q"], tensors["k"], tensors["v"], mask, NoScoreMod(), SCALE, operands)
        grads = attention_backward(tensors["dout"], tensors["q"], tensors["k"], tensors["v"], out, lse, mask,
                                   NoScoreMod(), SCALE, operands)
        want = dict(zip(NAMES, (out, lse, *grads)))
        for rank_result in per_rank:
            got, where = rank_result[name], rank_result[name]["positions"]
            for key in NAMES:
                torch.testing.assert_close(got[key].double(), want[key][:, :, where], atol=3e-5, rtol=1e-5,
                                           msg=lambda m, key=key: f"{name} {key}: {m}")
